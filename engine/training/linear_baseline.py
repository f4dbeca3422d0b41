"""The trained CLIP-style linear two-tower baseline (issue 12 item 5b; our choice of details).

One linear projection per modality on the frozen backbones' mean-pooled, L2-normalised
features (mean of the MiniLM tokens, mean of the EfficientNet tokens; the same pooling as
``engine.evaluation.evaluate.raw_backbone_rows``), shared by queries and items as in CLIP (Radford et
al. 2021). Views: T = unit(W_t t), V = unit(W_v v), and a sample with both modalities is
the normalised average unit(T + V) (a linear two-tower has no fusion).

Training: the towers' own pairs (``engine.training.trainer.TrainingData``, augmented query photos
swapped in with the same ``augment_p``), the same number of steps, batch size, learning rate,
warm-up + cosine schedule and seed as the towers (``TrainConfig``); loss = the mean of three
in-batch InfoNCE terms with the false-negative mask of the towers' training: (query T, item
V), (query V, item T) (the CLIP image-text term) and (query, item) with both sides in their
available form. Learnable logit scale, initial 10, capped at e^3 (METHOD.md §1.6).
Stored in the model folder as ``linear_baseline.safetensors`` + ``linear_baseline.json``;
they are not part of the model's fingerprint.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from engine.training.losses import info_nce
from engine.tokens.cache import TokenTable
from engine.tokens.views import mean_pooled

WEIGHTS = "linear_baseline.safetensors"
META = "linear_baseline.json"
LOGIT_SCALE_MAX = math.exp(3.0)


class LinearTwoTower(nn.Module):
    """``text_proj (Ht → d)``, ``image_proj (Hi → d)`` and a logit scale."""

    def __init__(self, text_hidden: int, image_hidden: int, dim: int = 256):
        super().__init__()
        self.text_proj = nn.Linear(text_hidden, dim)
        self.image_proj = nn.Linear(image_hidden, dim)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def views(self, text: torch.Tensor, image: torch.Tensor, has_text: torch.Tensor,
              has_image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pooled features ``text float32 (B, Ht)``, ``image float32 (B, Hi)`` and presence
        ``bool (B,)`` → ``{"T", "V", "F": float32 (B, d)}`` unit rows (T / V zero where absent;
        F = unit(T + V), i.e. the present view for a one-modality sample)."""
        t = F.normalize(self.text_proj(text), dim=-1) * has_text[:, None].float()
        v = F.normalize(self.image_proj(image), dim=-1) * has_image[:, None].float()
        return {"T": t, "V": v, "F": F.normalize(t + v, dim=-1)}

    @torch.inference_mode()
    def embed(self, text: np.ndarray, image: np.ndarray) -> dict[str, np.ndarray]:
        """``{"T", "V", "F": float32 (n, d)}`` of samples with both modalities (numpy in, numpy out)."""
        n = len(text)
        ones = torch.ones(n, dtype=torch.bool)
        out = self.views(torch.from_numpy(text), torch.from_numpy(image), ones, ones)
        return {k: v.numpy() for k, v in out.items()}

    def embed_text(self, text: np.ndarray) -> np.ndarray:
        """Pooled text features ``float32 (n, Ht)`` → T view ``float32 (n, d)`` unit rows."""
        with torch.inference_mode():
            return F.normalize(self.text_proj(torch.from_numpy(text)), dim=-1).numpy()

    def embed_image(self, image: np.ndarray) -> np.ndarray:
        """Pooled image features ``float32 (n, Hi)`` → V view ``float32 (n, d)`` unit rows."""
        with torch.inference_mode():
            return F.normalize(self.image_proj(torch.from_numpy(image)), dim=-1).numpy()


def _features(table: TokenTable, rows: np.ndarray) -> np.ndarray:
    """Pooled features of ``rows`` (``-1`` → zeros): ``float32 (n, H)``."""
    out = np.zeros((len(rows), table.hidden_size), np.float32)
    ok = rows >= 0
    if ok.any():
        unique, inverse = np.unique(rows[ok], return_inverse=True)  # each cached row pooled once
        out[ok] = mean_pooled(table, unique)[inverse]
    return out


def train_linear_baseline(data, config, dim: int = 256) -> tuple[LinearTwoTower, dict]:
    """Train the baseline on ``data`` (``TrainingData``) with ``config`` (``TrainConfig``: steps,
    batch_size, lr, warmup_fraction, weight_decay, seed, augment_p, logit_scale_lr_scale). Returns ``(model, summary)``
    with summary ``{"steps", "seconds", "final_loss"}``. Raises ValueError with fewer than 2 pairs."""
    if len(data) < 2:
        raise ValueError(f"the linear baseline needs at least 2 pairs, got {len(data)}")
    start = time.perf_counter()
    q_t, q_v = _features(data.texts, data.q_text), _features(data.images, data.q_image)
    i_t, i_v = _features(data.texts, data.item_text), _features(data.images, data.item_image)
    aug = None
    if data.aug_images is not None and data.q_image_aug is not None and config.augment_p > 0:
        aug = data.q_image_aug
        aug_rows = np.unique(aug[aug >= 0])
        aug_feat = _features(data.aug_images, aug_rows)
        aug_index = {int(r): k for k, r in enumerate(aug_rows)}
    with torch.random.fork_rng(devices=[]):  # its own stream: the global generator is left alone
        torch.default_generator.manual_seed(config.seed)
        model = LinearTwoTower(data.texts.hidden_size, data.images.hidden_size, dim)
    scale_lr = config.lr * config.logit_scale_lr_scale  # as the towers'
    rest = [p for p in model.parameters() if p is not model.log_logit_scale]
    opt = torch.optim.AdamW([{"params": rest}, {"params": [model.log_logit_scale], "lr": scale_lr}],
                            lr=config.lr, weight_decay=config.weight_decay)
    warm = max(1, int(round(config.warmup_fraction * config.steps)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else
                                              0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, config.steps - warm)))))
    rng = np.random.default_rng([config.seed, 5])
    b = min(config.batch_size, len(data))
    loss = torch.tensor(0.0)
    for step in range(config.steps):
        idx = rng.choice(len(data), size=b, replace=False)
        qv = q_v[idx].copy()
        if aug is not None:
            views = aug[idx, rng.integers(aug.shape[1], size=b)]
            swap = (rng.random(b) < config.augment_p) & (views >= 0) & (data.q_image[idx] >= 0)
            for k in np.nonzero(swap)[0]:
                qv[k] = aug_feat[aug_index[int(views[k])]]
        q = model.views(torch.from_numpy(q_t[idx]), torch.from_numpy(qv), torch.from_numpy(data.q_text[idx] >= 0),
                        torch.from_numpy(data.q_image[idx] >= 0))
        c = model.views(torch.from_numpy(i_t[idx]), torch.from_numpy(i_v[idx]),
                        torch.from_numpy(data.item_text[idx] >= 0), torch.from_numpy(data.item_image[idx] >= 0))
        fn = data.false_negatives(idx)
        scale = model.log_logit_scale.exp()
        qt_ok, qv_ok = torch.from_numpy(data.q_text[idx] >= 0), torch.from_numpy(data.q_image[idx] >= 0)
        it_ok, iv_ok = torch.from_numpy(data.item_text[idx] >= 0), torch.from_numpy(data.item_image[idx] >= 0)
        loss = (info_nce(q["T"], c["V"], scale, fn, qt_ok, iv_ok) + info_nce(q["V"], c["T"], scale, fn, qv_ok, it_ok)
                + info_nce(q["F"], c["F"], scale, fn)) / 3.0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.log_logit_scale.clamp_(max=math.log(LOGIT_SCALE_MAX))
    model.eval()
    return model, {"steps": config.steps, "batch_size": b, "seconds": time.perf_counter() - start,
                   "final_loss": float(loss.detach())}


def save_linear_baseline(model: LinearTwoTower, folder: str | Path, summary: dict) -> None:
    """Write ``linear_baseline.safetensors`` and ``linear_baseline.json`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS))
    meta = {"text_hidden": model.text_proj.in_features, "image_hidden": model.image_proj.in_features,
            "dim": model.text_proj.out_features, **summary}
    (folder / META).write_text(json.dumps(meta, indent=2) + "\n")


def load_linear_baseline(folder: str | Path) -> LinearTwoTower | None:
    """The baseline stored in ``folder``, or None when the folder has none."""
    folder = Path(folder)
    if not (folder / WEIGHTS).is_file() or not (folder / META).is_file():
        return None
    meta = json.loads((folder / META).read_text())
    model = LinearTwoTower(meta["text_hidden"], meta["image_hidden"], meta["dim"])
    model.load_state_dict(load_file(str(folder / WEIGHTS)))
    return model.eval()


LINEAR_ROW = "baseline: linear two-tower (CLIP-style, trained; m = average)"


def linear_embeddings(model: LinearTwoTower, texts: TokenTable, images: TokenTable, text_rows: np.ndarray,
                      image_rows: np.ndarray) -> dict[str, np.ndarray]:
    """``{"T", "V", "F": float32 (n, d)}`` of cached samples with both modalities."""
    return model.embed(mean_pooled(texts, text_rows), mean_pooled(images, image_rows))
