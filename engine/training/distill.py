"""Distilling the query tower's text encoder for text-only queries (``engine.model.text_student``).

After training (and after the private blocks are fitted), the query tower's text-only vectors of
the full backbone are the teacher: ``TextStudent``'s layers, initialised as copies of some of the
backbone's layers, are trained so that the query tower's text-only vector through them has
cosine 1 with the teacher's, ``loss = mean(1 - cos(student, teacher))``, on the texts shoppers
send: the training products' titles, every typed query of the training pairs, and every brand +
type query and attribute phrase the training products' facets allow. Everything else is frozen
(backbone embeddings, fusion encoder, private blocks), so item vectors and queries with a photo
do not change. A seeded held-out slice of the texts (5 %) measures the cosine reached. Source:
our choice (issue 11); a student started from teacher layers (Sanh et al., 2019, §3), a cosine
loss on the final embedding as in sentence-embedding distillation (Reimers & Gurevych, 2020, §2).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from engine.catalog.shopper_queries import attribute_phrases, brand_queries, product_facets


BF16_EPOCHS, FP32_EPOCHS = 8.0, 3.0  # DistillConfig.epochs None: per CPU (our choice, measured)
# "auto" keeps a student only at this held-out cosine or above (our choice: the fashion runs reached
# 0.980-0.986 and scored within 0.6 points of the full backbone; a 300-product catalogue, 48 steps,
# reached 0.927)
MIN_HOLDOUT_COSINE = 0.97


@dataclass(frozen=True)
class DistillConfig:
    """Distillation settings (our choice; measured on the fashion catalogue, docs/results.md).

    epochs: passes over the texts, capped at ``max_steps`` steps of ``batch_size`` texts (batches of
    texts of similar token counts, in a seeded order reshuffled every pass); None (default): 8 where
    the CPU runs bf16 natively (``engine.cpu_features.bf16_is_fast``), else 3, fp32 steps costing
    about 2.5x (on the fashion catalogue: 167 s for 8 passes in bf16 on AMX, about 116 s for 3 in fp32
    on the AVX2 path; 3 passes score within 0.4 points of 8 on every text task, docs/results.md);
    lr: AdamW peak learning rate (one-cycle schedule, 10 % warm-up); holdout: share of the texts
    kept out of training to measure the cosine (at least 1, at most 1,000 texts); seed: the
    split's and the batches' seed; min_holdout_cosine: with ``--query-text-layers auto``, a student
    whose held-out cosine mean stays below it is dropped and text-only queries keep the full
    backbone (``distill_after_training``). ValueError on a non-positive value, holdout outside
    [0, 0.5] or min_holdout_cosine outside [0, 1].
    """

    epochs: float | None = None
    max_steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3
    holdout: float = 0.05
    seed: int = 0
    min_holdout_cosine: float = MIN_HOLDOUT_COSINE

    def __post_init__(self) -> None:
        if min(8.0 if self.epochs is None else self.epochs, self.max_steps, self.batch_size, self.lr) <= 0:
            raise ValueError(f"distillation epochs, max_steps, batch_size and lr must be > 0, got {self}")
        if not 0.0 <= self.holdout <= 0.5:
            raise ValueError(f"distillation holdout must lie in [0, 0.5], got {self.holdout}")
        if not 0.0 <= self.min_holdout_cosine <= 1.0:
            raise ValueError(f"min_holdout_cosine must lie in [0, 1], got {self.min_holdout_cosine}")


def distillation_texts(products: Sequence, pairs: Sequence) -> list[str]:
    """Distinct texts to distil on, sorted: titles, the typed queries of text-only ``pairs``
    (``TrainingPair`` with ``query_text`` and no ``query_image``), and every brand + type query and
    attribute phrase of each product's facets (``engine.catalog.shopper_queries``)."""
    texts = {p.title for p in products if p.title}
    texts.update(q.query_text for q in pairs if q.query_text and not q.query_image)
    for p in products:
        facets = product_facets(p.attributes, p.title)
        texts.update(text for text, _ in brand_queries(facets) + attribute_phrases(facets))
    return sorted(t for t in texts if t.strip())


def attach_text_student(model, layers: Sequence[int]):
    """A copy of ``model`` whose query tower has a ``TextStudent`` over the text backbone's
    ``layers`` (copies of the backbone's layers, not yet distilled; a student ``model`` already
    has is dropped); every other weight is ``model``'s. Raises ``engine.model.text_student.TextStudentError`` (a ValueError) on bad layers."""
    from engine.model.towers import TwoTowerModel

    new = TwoTowerModel(replace(model.config, query_text_layers=list(layers)), model.backbones)
    state = {k: v for k, v in model.state_dict().items() if ".text_student." not in k}  # a student starts anew
    missing, unexpected = new.load_state_dict(state, strict=False)
    if unexpected or any(".text_student." not in k for k in missing):
        raise ValueError(f"model and config differ beyond the text student: missing {missing}, unexpected {unexpected}")
    new.eval()
    return new


def teacher_vectors(tower, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """``float32 (n, d)``: ``tower``'s text-only vectors of ``texts`` through the full backbone."""
    student, tower.text_student = tower.text_student, None
    try:
        return tower.encode(list(texts), None, view="text", batch_size=batch_size)
    finally:
        tower.text_student = student


def distill_text_student(model, texts: Sequence[str], config: DistillConfig = DistillConfig(),
                         progress: bool = True) -> dict:
    """Train ``model.query_tower.text_student`` in place (module docstring).

    Args:
        model: a ``TwoTowerModel`` whose query tower has a text student (``attach_text_student``).
        texts: the texts to distil on (``distillation_texts``), at least 2 distinct.

    Returns:
        ``{"layers", "texts", "epochs", "steps", "batch_size", "lr", "precision", "seconds", "final_loss",
        "holdout": {"texts", "cosine_mean", "cosine_min", "cosine_p1"}}`` (cosines to the teacher's
        text-only vectors of the held-out texts; ``holdout`` None when no text is held out).

    Raises:
        ValueError: no text student, or fewer than 2 texts.
    """
    from tqdm import tqdm

    from engine.cpu_features import bf16_is_fast

    tower = model.query_tower
    student = tower.text_student
    if student is None:
        raise ValueError("the query tower has no text student to distil (attach_text_student first)")
    texts = list(dict.fromkeys(texts))
    if len(texts) < 2:
        raise ValueError(f"distillation needs at least 2 distinct texts, got {len(texts)}")
    start = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(texts))
    held = min(1000, max(1, round(config.holdout * len(texts)))) if config.holdout > 0 else 0
    held_idx, train_idx = order[:held], order[held:]
    targets = torch.from_numpy(teacher_vectors(tower, texts))
    # length-bucketed batches (texts of similar token counts together: little padding), in a seeded
    # order that is reshuffled every pass; each text's loss is its own, so bucketing biases nothing
    lengths = np.asarray(tower.backbones.text.token_lengths([texts[i] for i in train_idx]))
    by_length = train_idx[np.argsort(lengths, kind="stable")]
    batches = [by_length[i:i + config.batch_size] for i in range(0, len(by_length), config.batch_size)]
    bf16 = bf16_is_fast()
    epochs = config.epochs if config.epochs is not None else (BF16_EPOCHS if bf16 else FP32_EPOCHS)
    steps = max(1, min(config.max_steps, math.ceil(epochs * len(batches))))
    frozen = [p for p in tower.fusion.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    params = list(student.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=steps, pct_start=0.1)
    loss_value = float("nan")
    try:
        with torch.enable_grad():
            for step in tqdm(range(steps), desc="distil query text encoder", unit="step", disable=not progress):
                if step % len(batches) == 0:
                    passes = rng.permutation(len(batches))
                batch = batches[passes[step % len(batches)]]
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    vectors = _student_vectors(tower, [texts[i] for i in batch])
                loss = (1.0 - (vectors * targets[batch]).sum(dim=-1)).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                loss_value = float(loss.detach())
    finally:
        for p in params:
            p.requires_grad_(False)
        for p in frozen:
            p.requires_grad_(True)
    holdout = None
    if held:
        got = tower.encode([texts[i] for i in held_idx], None, view="text", batch_size=256)
        cos = (got * targets[held_idx].numpy()).sum(axis=1)
        holdout = {"texts": int(held), "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
                   "cosine_p1": float(np.quantile(cos, 0.01))}
    return {"layers": list(student.keep), "texts": len(texts), "epochs": epochs, "steps": steps,
            "batch_size": config.batch_size,
            "lr": config.lr, "precision": "bf16" if bf16 else "fp32", "seconds": time.perf_counter() - start,
            "final_loss": loss_value, "holdout": holdout}


def _student_vectors(tower, texts: list[str]) -> torch.Tensor:
    """``float32 (B, d)`` unit text-only vectors of ``texts`` through the student (differentiable)."""
    tokens, mask = tower.backbones.text.encode(texts, model=tower.text_model("text"))
    b = tokens.shape[0]
    image = tokens.new_zeros((b, 1, tower.backbones.image.hidden_size))
    vectors = tower.encode_tokens(tokens, mask, image, torch.zeros(b, 1, dtype=torch.bool),
                                  torch.ones(b, dtype=torch.bool), torch.zeros(b, dtype=torch.bool))
    return F.normalize(vectors.float(), dim=-1)


def resolve_layers(choice, teacher) -> tuple[list[int] | None, str | None]:
    """``--query-text-layers``: ``"auto"`` (the first and the last layer of a backbone with at
    least 4 layers; fewer: no student, with the reason), ``"none"`` / None (no student), or indices.
    Returns ``(layers or None, reason when auto declined)``. Raises TextStudentError on bad
    indices or a backbone without a layer stack (asked for explicitly)."""
    from engine.model.text_student import check_layers, first_and_last_layer, layer_stack

    if choice is None or choice == "none":
        return None, None
    if choice == "auto":
        try:
            count = len(layer_stack(teacher)[1])
        except ValueError as exc:
            return None, str(exc)
        if count < 4:
            return None, f"the text backbone has {count} layers (auto distils backbones of 4 or more)"
        return first_and_last_layer(teacher), None
    return check_layers(choice, len(layer_stack(teacher)[1])), None


def distill_after_training(model, choice, products: Sequence, pairs: Sequence, config: DistillConfig,
                           progress: bool = True):
    """The training job's last step: ``(model with a distilled text student, summary)``, or
    ``(model, None)`` when ``choice`` asks for none, or ``(model, {"layers": None, "reason": ..})``
    when auto declines: a backbone it cannot distil (``resolve_layers``), or a student whose
    held-out cosine mean stays below ``config.min_holdout_cosine`` (too few texts or steps; the
    summary then keeps the attempt under "declined"). Explicit layers always keep the student."""
    layers, reason = resolve_layers(choice, model.backbones.text.model)
    if layers is None:
        return model, None if reason is None else {"layers": None, "reason": reason}
    student = attach_text_student(model, layers)
    summary = distill_text_student(student, distillation_texts(products, pairs), config, progress)
    held = summary.get("holdout")
    if choice == "auto" and held is not None and held["cosine_mean"] < config.min_holdout_cosine:
        reason = (f"the distilled text encoder reached a held-out cosine of {held['cosine_mean']:.4f} < "
                  f"{config.min_holdout_cosine} ({summary['steps']} steps over {summary['texts']} texts): "
                  "text-only queries keep the full text backbone")
        return model, {"layers": None, "reason": reason, "declined": summary}
    return student, summary
