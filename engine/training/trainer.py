"""The training loop: two-stage alignment on cached backbone tokens, exact resume.

- Stage 1 (Beyond Text, two-stage alignment; METHOD.md §2): the query aligned with the
  product text view and with the product image view separately (unimodal views T, V only;
  ``engine.training.losses.stage1_losses``).
- Stage 2 (UniECS; METHOD.md §2): the full loss CMAL + CLAL + IMCL on all views including the
  fused view F, combined by ``LossWeighting`` (uncertainty weighting, our choice, or static).

Backbones stay frozen (their tokens come from ``engine.tokens.cache``); the fusion encoders
of both towers, the logit scale and the loss weights are trained. Optimiser and schedule
follow the UniECS reference code (METHOD.md §5): AdamW (0.9, 0.98, eps 1e-6), weight decay
0.01 (not on biases, norms, learned vectors, logit scale or loss weights), linear warm-up then
cosine decay (per stage, our choice), gradient clipping (our choice: global norm 1.0).

Exact resume: a checkpoint holds the weights, loss weights, optimiser and scheduler states,
the step and the trainer's own torch RNG state (the process-wide generator is never
reseeded); the data order is a pure function of (seed, epoch), so a
run stopped after step k and resumed ends in the same state as an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from engine.training.losses import (
    LOSS_NAMES, STAGE1_LOSS_NAMES, LossConfig, LossWeighting, stage1_losses, stage2_losses,
)
from engine.tokens.cache import TokenTable
from engine.tokens.views import TokenBatch, encode_views

CHECKPOINT_FILE = "checkpoint.pt"
GAIN_PARAMETERS = ("residual_gain", "solo_gain", "deep_gain")  # engine/model/fusion.py


@dataclass
class TrainConfig:
    """Trainer settings (defaults: our choice for a 2-core CPU; METHOD.md §5 for the optimiser).

    steps: total optimiser steps (stage 1 + stage 2). stage1_steps: steps of stage 1.
    batch_size: pairs per step (in-batch negatives). lr: peak learning rate.
    warmup_fraction: share of each stage spent in linear warm-up.
    weighting: ``"uncertainty"`` or ``"static"``; static_weights: ``{term: weight}``.
    checkpoint_every: steps between checkpoints (and one at the end).
    stop_after: stop (with a checkpoint) once this step is reached, as if interrupted.
    log_every: steps between progress-bar updates of the loss (every step is logged to file).
    precision: ``"fp32"``, or ``"bf16"``: the towers' forward pass under CPU bfloat16 autocast
        (losses, optimiser and weights stay float32; our choice, measured about 1.5-2x faster
        per step on a CPU with AVX512-BF16, slower on one without).
    augment_p: when the data has augmented query photos, the probability that a query photo
        is replaced by one of its views, drawn uniformly, per pair and step (seeded by
        ``(seed, step)``, so resume stays exact); the item side keeps the clean photo. Our
        choice: 0.8 (a fifth of the steps still see the catalogue's own pixels).
    gain_lr_scale: the fusion output's scalar gains (``GAIN_PARAMETERS``) train at ``lr * gain_lr_scale``,
        no decay (our choice: AdamW moves a scalar about ``lr`` a step); 1: one rate for all.
    logit_scale_lr_scale: the learnable logit scale (METHOD.md §1.6, its log is the parameter)
        trains at ``lr * logit_scale_lr_scale``, no decay. Our choice: at 1 AdamW moves its
        log about ``lr`` a step, so over the CPU recipe's 384 steps the scale cannot leave
        [10 / 1.2, 10 * 1.2] whatever the gradient says.
    """

    steps: int = 200
    stage1_steps: int = 40
    batch_size: int = 128
    lr: float = 5e-4
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float = 1.0
    seed: int = 0
    weighting: str = "uncertainty"
    static_weights: dict[str, float] | None = None
    loss: LossConfig = field(default_factory=LossConfig)
    checkpoint_every: int = 100
    stop_after: int | None = None
    log_every: int = 10
    precision: str = "fp32"
    augment_p: float = 0.8
    gain_lr_scale: float = 1.0
    logit_scale_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if not 0.0 <= self.augment_p <= 1.0:
            raise ValueError(f"augment_p must lie in [0, 1], got {self.augment_p}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainingData:
    """Training pairs as rows of the token tables (``-1``: modality absent).

    q_text / q_image / item_text / item_image: ``int64 (P,)`` rows in ``texts`` / ``images``.
    item: ``int64 (P,)`` product index of the item; query_product: ``int64 (P,)`` product the
    query was made from (``-1`` none); item_group: ``int64 (P,)`` attribute group of the item
    (``-1`` none); query_group: ``int64 (P,)`` group for attribute-level pairs (``-1``:
    instance-level pair). kinds: ``(P,)`` pair kinds, for the log.

    Optional (shopper and composed pairs, ``engine.training.pairs.shopper_pairs``): relevance_keys
    ``int64 (S, N)``: key id of product ``n`` under facet spec ``s`` (``-1``: none);
    query_spec / query_key ``int64 (P,)``: the pair's spec and key (``-1``: none); an item is
    relevant to such a query when its key under the query's spec equals the query's key.
    aug_images: table of augmented query photos (``engine.tokens.augment_cache``); q_image_aug
    ``int64 (P, V)``: rows of the query photo's V augmented views in it (``-1``: none).
    """

    texts: TokenTable
    images: TokenTable
    q_text: np.ndarray
    q_image: np.ndarray
    item_text: np.ndarray
    item_image: np.ndarray
    item: np.ndarray
    query_product: np.ndarray
    item_group: np.ndarray
    query_group: np.ndarray
    kinds: np.ndarray
    relevance_keys: np.ndarray | None = None
    query_spec: np.ndarray | None = None
    query_key: np.ndarray | None = None
    aug_images: TokenTable | None = None
    q_image_aug: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.item.shape[0])

    def false_negatives(self, idx: np.ndarray) -> torch.Tensor:
        """``bool (B, B)``: item ``j`` is relevant to query ``i`` too (same product, the query's own
        product, or the same attribute group for an attribute-level pair)."""
        item, qp = self.item[idx], self.query_product[idx]
        ig, qg = self.item_group[idx], self.query_group[idx]
        fn = (item[None, :] == item[:, None]) | ((qp[:, None] >= 0) & (item[None, :] == qp[:, None]))
        fn |= (qg[:, None] >= 0) & (ig[None, :] == qg[:, None])
        if self.relevance_keys is not None and self.query_spec is not None:
            spec, key = self.query_spec[idx], self.query_key[idx]
            item_keys = self.relevance_keys[np.maximum(spec, 0)][:, item]  # [B, B]: item j under query i's spec
            fn |= (spec[:, None] >= 0) & (item_keys == key[:, None])
        np.fill_diagonal(fn, False)
        return torch.from_numpy(fn)


def _lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up then cosine decay to 0, restarted at the stage boundary (our choice)."""
    if step < config.stage1_steps:
        pos, length = step, config.stage1_steps
    else:
        pos, length = step - config.stage1_steps, config.steps - config.stage1_steps
    warm = max(1, int(round(config.warmup_fraction * length)))
    if pos < warm:
        return (pos + 1) / warm
    progress = (pos - warm) / max(1, length - warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    """Runs ``TrainConfig.steps`` steps of two-stage training of ``model`` on ``data``.

    out_dir receives ``checkpoint.pt`` and ``train_log.jsonl`` (one JSON line per step: stage,
    lr, loss, each term, each weight, logit scale, seconds).
    """

    def __init__(self, model, data: TrainingData, config: TrainConfig, out_dir: str | Path,
                 progress: bool = True):
        if len(data) < 2:
            raise ValueError(f"training needs at least 2 pairs, got {len(data)}")
        if not 0 <= config.stage1_steps <= config.steps:
            raise ValueError(f"stage1_steps must lie in [0, steps], got {config.stage1_steps} of {config.steps}")
        self.model, self.data, self.config = model, data, config
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self.batch_size = min(config.batch_size, len(data))
        self.batches_per_epoch = max(1, len(data) // self.batch_size)
        # The trainer's own torch RNG stream (dropout etc.), seeded here and swapped in around
        # each step: the process-wide generator is left as it was (our choice).
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(config.seed)
            self.weighting = torch.nn.ModuleDict({
                "stage1": LossWeighting(STAGE1_LOSS_NAMES, config.weighting,
                                        _subset(config.static_weights, STAGE1_LOSS_NAMES)),
                "stage2": LossWeighting(LOSS_NAMES, config.weighting, _subset(config.static_weights, LOSS_NAMES)),
            })
            self._rng_state = torch.get_rng_state()
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=config.lr, betas=tuple(config.betas),
                                           eps=config.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: _lr_factor(s, config))
        self.step = 0
        model.clamp_logit_scale_()  # e.g. an init_model saved with another cap

    def _param_groups(self) -> list[dict]:
        decay, no_decay, gains, logit = [], [], [], []
        scaled = self.config.gain_lr_scale != 1.0
        logit_scaled = self.config.logit_scale_lr_scale != 1.0
        own = [(n, p) for n, p in self.model.named_parameters()
               if p.requires_grad and not n.startswith(("text_backbone.", "image_backbone."))]
        seen: set[int] = set()
        for name, p in own:
            if id(p) in seen:
                continue
            seen.add(id(p))
            if scaled and name.rsplit(".", 1)[-1] in GAIN_PARAMETERS:
                gains.append(p)
                continue
            if logit_scaled and name == "log_logit_scale":
                logit.append(p)
                continue
            (decay if p.ndim >= 2 else no_decay).append(p)
        no_decay += [p for p in self.weighting.parameters() if p.requires_grad]
        scaled_group = [{"params": gains, "weight_decay": 0.0, "lr": self.config.lr * self.config.gain_lr_scale}]
        logit_group = [{"params": logit, "weight_decay": 0.0, "lr": self.config.lr * self.config.logit_scale_lr_scale}]
        return [{"params": decay, "weight_decay": self.config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0}] + (scaled_group if scaled else []) + \
            (logit_group if logit_scaled else [])

    # ------------------------------------------------------------------ data order

    def batch_indices(self, step: int) -> np.ndarray:
        """Pair indices of ``step``: epoch ``e`` is a permutation seeded by ``(seed, e)``."""
        epoch, i = divmod(step, self.batches_per_epoch)
        perm = np.random.default_rng([self.config.seed, epoch]).permutation(len(self.data))
        return perm[i * self.batch_size:(i + 1) * self.batch_size]

    # ------------------------------------------------------------------ one step

    @contextlib.contextmanager
    def _own_rng(self):
        """Run with the trainer's RNG stream as torch's CPU generator; restore the global one after."""
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._rng_state)
            try:
                yield
            finally:
                self._rng_state = torch.get_rng_state()

    def train_step(self) -> dict:
        """One optimiser step; returns its log record."""
        with self._own_rng():
            return self._train_step()

    def _train_step(self) -> dict:
        cfg, data = self.config, self.data
        start = time.perf_counter()
        stage = 1 if self.step < cfg.stage1_steps else 2
        idx = self.batch_indices(self.step)
        q, augmented = self.query_batch(idx)
        it = TokenBatch.gather(data.texts, data.images, data.item_text[idx], data.item_image[idx])
        fn = data.false_negatives(idx)
        views = ("T", "V") if stage == 1 else ("F", "T", "V")
        self.model.train()
        amp = (torch.autocast("cpu", dtype=torch.bfloat16) if cfg.precision == "bf16"
               else contextlib.nullcontext())
        with amp:
            q_emb, q_ok = encode_views(self.model.query_tower, q, views)
            i_emb, i_ok = encode_views(self.model.item_tower, it, views)
        # losses in float32 on re-normalised rows (bf16 rows are only unit to ~3 digits)
        emb = {**{v + "q": _unit_rows(e) for v, e in q_emb.items()}, **{v + "i": _unit_rows(e) for v, e in i_emb.items()}}
        ok = {**{v + "q": m for v, m in q_ok.items()}, **{v + "i": m for v, m in i_ok.items()}}
        scale = self.model.logit_scale  # kept <= config.logit_scale_max on the parameter
        if stage == 1:
            terms = stage1_losses(emb, scale, fn, ok)
            weighting = self.weighting["stage1"]
        else:
            terms = stage2_losses(emb, scale, cfg.loss, fn, ok)
            weighting = self.weighting["stage2"]
        loss = weighting(terms)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {self.step}: loss is {loss.item()} (terms {({k: v.item() for k, v in terms.items()})})")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.model.clamp_logit_scale_()  # the one cap, on the parameter (its gradient never vanishes)
        weighting.clamp_()  # uncertainty weights stay in LOG_VAR_RANGE
        self.scheduler.step()
        self.step += 1
        return {"step": self.step, "stage": stage, "lr": lr, "loss": float(loss.detach()),
                "terms": {k: float(v.detach()) for k, v in terms.items()}, "weights": weighting.weights(),
                "logit_scale": float(scale.detach()), "grad_norm": float(grad_norm),
                "batch": int(len(idx)), "augmented_photos": augmented, "seconds": time.perf_counter() - start}

    def query_batch(self, idx: np.ndarray) -> tuple[TokenBatch, int]:
        """Query tokens of the pairs ``idx`` at the current step, each query photo swapped for one
        of its augmented views with probability ``augment_p``; returns ``(batch, photos swapped)``."""
        data = self.data
        text_rows, photo_rows = data.q_text[idx], data.q_image[idx]
        if data.aug_images is None or data.q_image_aug is None or self.config.augment_p == 0:
            return TokenBatch.gather(data.texts, data.images, text_rows, photo_rows), 0
        rng = np.random.default_rng([self.config.seed, self.step, 7])
        swap = rng.random(len(idx)) < self.config.augment_p
        views = data.q_image_aug[idx, rng.integers(data.q_image_aug.shape[1], size=len(idx))]
        swap &= (views >= 0) & (photo_rows >= 0)
        tt, tm, ht = data.texts.gather(text_rows)
        it, im, hi = _gather_either(data.images, np.where(swap, -1, photo_rows), data.aug_images, np.where(swap, views, -1))
        return TokenBatch(tt, tm, ht, it, im, hi), int(swap.sum())

    # ------------------------------------------------------------------ loop

    def run(self) -> dict:
        """Train from the current step to ``steps`` (or ``stop_after``); returns a summary."""
        cfg = self.config
        end = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
        log_path = self.out_dir / "train_log.jsonl"
        _truncate_log(log_path, self.step)
        start, first = time.perf_counter(), self.step
        last: dict = {}
        with open(log_path, "a", encoding="utf-8") as log, \
                tqdm(total=end, initial=self.step, unit="step", desc="train", disable=not self.progress) as bar:
            while self.step < end:
                last = self.train_step()
                log.write(json.dumps(last) + "\n")
                log.flush()
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == end:
                    bar.set_postfix(stage=last["stage"], loss=f"{last['loss']:.3f}",
                                    **{k: f"{v:.3f}" for k, v in last["terms"].items()})
                if self.step % cfg.checkpoint_every == 0 and self.step < end:
                    self.save_checkpoint()
        self.save_checkpoint()
        seconds = time.perf_counter() - start
        done = self.step - first
        return {"steps": self.step, "steps_this_run": done, "train_seconds": seconds,
                "pairs_per_s": done * self.batch_size / seconds if seconds > 0 else None,
                "final": last, "pairs": len(self.data), "batch_size": self.batch_size}

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict:
        return {"step": self.step, "model": self.model.trainable_state_dict(),
                "weighting": self.weighting.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "torch_rng": self._rng_state.clone(),
                "config": self.config.to_dict(), "pairs": len(self.data)}

    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """Write the full training state (atomic rename). Returns the path."""
        path = Path(path) if path else self.out_dir / CHECKPOINT_FILE
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save(self.state(), tmp)
        os.replace(tmp, path)
        return path

    def load_checkpoint(self, path: str | Path | None = None) -> int:
        """Restore the state saved by ``save_checkpoint``; returns the step reached.

        Raises ValueError when the checkpoint was made with other pairs or batch settings.
        """
        path = Path(path) if path else self.out_dir / CHECKPOINT_FILE
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved = state["config"]
        for key in ("seed", "batch_size", "steps", "stage1_steps"):
            if saved[key] != getattr(self.config, key):
                raise ValueError(f"checkpoint {path} was made with {key}={saved[key]}, this run has "
                                 f"{getattr(self.config, key)}; resume with the same settings")
        if state["pairs"] != len(self.data):
            raise ValueError(f"checkpoint {path} was made on {state['pairs']} pairs, this run has {len(self.data)}")
        missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
        if unexpected or any(not k.startswith(("text_backbone.", "image_backbone.")) for k in missing):
            raise ValueError(f"checkpoint {path} does not match the model (unexpected {unexpected[:3]})")
        self.weighting.load_state_dict(state["weighting"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._rng_state = state["torch_rng"].clone()
        self.step = int(state["step"])
        return self.step


def _gather_either(a: TokenTable, a_rows: np.ndarray, b: TokenTable, b_rows: np.ndarray):
    """Rows from table ``a`` or table ``b`` (``-1``: not from that one) → ``(tokens float32 (B, L, H),
    mask bool (B, L), present bool (B,))``, as ``TokenTable.gather``."""
    at, am, ap = a.gather(a_rows)
    bt, bm, bp = b.gather(b_rows)
    width = max(at.shape[1], bt.shape[1])
    tokens = at.new_zeros((len(a_rows), width, at.shape[2]))
    mask = torch.zeros((len(a_rows), width), dtype=torch.bool)
    tokens[:, :at.shape[1]], mask[:, :am.shape[1]] = at, am
    tokens[bp, :bt.shape[1]], mask[bp, :bm.shape[1]] = bt[bp], bm[bp]  # rows of b are empty in a
    return tokens, mask, ap | bp


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """float32 copy of ``x`` with rows re-normalised (all-zero rows of absent views stay zero)."""
    if x.dtype == torch.float32:
        return x
    return torch.nn.functional.normalize(x.float(), dim=-1)


def _subset(weights: dict[str, float] | None, names: tuple[str, ...]) -> dict[str, float] | None:
    if weights is None:
        return None
    return {k: v for k, v in weights.items() if k in names}


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log lines of steps ``<= step`` (a resumed run rewrites what follows)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))
