"""Photo-only queries ranked in two stages: the product in the photo first, then similar products
(our choice, issue 12 item 4).

Why: a photo-only query vector is almost all image-private block (``engine.model.private_block``:
the query tower's image gain on whitened photo features; mean block norms on the fashion test
pool: fused part F 0.16, image-private 0.99). That block finds the product in a shopper's photo
(augmented photo Recall@1 93.30 % over 11,882 products), but it also ranks every *other* product
by instance features, so the products after the first share fewer attributes with the photo
than under the average of the model's own views (i2m attribute nDCG@10 22.75 against 24.55, and
31.96 for the linear two-tower). The fused part alone ranks them by type, colour and gender
(36.69) but finds the product itself less often (i2m Recall@1 95.25 against 99.20). No single
weight of the block gives both (``bench/bench_private_weight.py``); two stages do:

1. **instance stage**: the whole query vector; its ``n`` best products lead the list;
2. **similar stage**: the query vector without its image-private block (those columns zeroed,
   re-normalised: the fused part F, and the cross-modal block where the model has one); its
   ranking fills the list after them, skipping those ``n``.

A stage-1 hit keeps its whole-vector score, a stage-2 hit its similar-stage cosine; the two scales
differ, so scores compare within a stage only. Text and text + photo queries are one stage, as
before. Figures (demo model, fashion test pool; docs/results.md "Photo queries in two stages"):
``n = 1`` keeps i2m Recall@1 (99.20) and gives i2m attribute nDCG@10 36.75; augmented photo
Recall@1 stays 93.30, Recall@5 / @10 fall from 98.40 / 99.00 to 95.90 / 96.65 (a product the
instance stage missed must be found by the similar stage). ``n`` = 3 (a probe): nDCG@10 33.12,
Recall@5 / @10 97.55 / 98.20.
"""
from __future__ import annotations

import numpy as np

# the instance stage's depth: how many whole-vector hits lead a photo query's list (our choice:
# one, "the product in the photo, then products like it"; 0 turns the two stages off)
INSTANCE_FIRST = 1


def instance_columns(model) -> tuple[int, int] | None:
    """``(start, stop)``: the columns of ``model``'s query vectors that hold the query tower's
    image-private block (``engine.model.private_block``; layout ``[F | image-private | ...]``), or
    None when it has none (no second stage: CLIP-family models, models without the block)."""
    fusion = getattr(getattr(model, "query_tower", None), "fusion", None)
    if fusion is None or getattr(fusion, "private", None) is None:
        return None
    start = int(fusion.merge.out_features)
    return start, start + int(fusion.private.dim)


def without_instance(vectors: np.ndarray, columns: tuple[int, int]) -> np.ndarray:
    """The similar stage's query vectors: ``vectors`` ``float32 (n, D)`` with ``columns``
    (``instance_columns``) zeroed, each row re-normalised (a zero row stays zero). Returns
    ``float32 (n, D)``, a copy. Raises ValueError when the columns do not lie inside ``[0, D)``
    or leave nothing."""
    vectors = np.asarray(vectors, dtype=np.float32)
    start, stop = columns
    if not (0 <= start < stop <= vectors.shape[1]) or stop - start == vectors.shape[1]:
        raise ValueError(f"instance columns must lie in [0, {vectors.shape[1]}) and leave some, got {columns}")
    out = vectors.copy()
    out[:, start:stop] = 0.0
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def merge_instance_first(first_ids: np.ndarray, first_scores: np.ndarray, rest_ids: np.ndarray,
                         rest_scores: np.ndarray, n: int, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """One query's two-stage list: the first ``n`` valid hits of the instance stage, then the similar
    stage's hits that are not among them, cut to ``depth``.

    first_ids / rest_ids ``int64 (a,)`` / ``(b,)`` best first (``-1``: no hit, skipped), with their
    ``float32`` scores. Returns ``(ids int64 (m,), scores float32 (m,))``, ``m <= depth``, no id twice.
    Raises ValueError on ``n < 0`` or ``depth < 0``.
    """
    if n < 0 or depth < 0:
        raise ValueError(f"n and depth must be >= 0, got {n}, {depth}")
    keep = np.asarray(first_ids) >= 0
    lead_ids, lead_scores = np.asarray(first_ids)[keep][:n], np.asarray(first_scores)[keep][:n]
    rest_ids, rest_scores = np.asarray(rest_ids), np.asarray(rest_scores)
    fresh = (rest_ids >= 0) & ~np.isin(rest_ids, lead_ids)
    ids = np.concatenate([lead_ids, rest_ids[fresh]]).astype(np.int64)[:depth]
    scores = np.concatenate([lead_scores, rest_scores[fresh]]).astype(np.float32)[:depth]
    return ids, scores


def instance_first_scores(full_scores: np.ndarray, part_scores: np.ndarray, n: int) -> np.ndarray:
    """A score matrix whose descending order per row is the two-stage ranking (exact evaluation).

    full_scores / part_scores ``(q, m)``: the whole vector's and the similar stage's scores of every
    candidate (cosines, in ``[-1, 1]``). The candidates scoring at least the ``n``-th best
    ``full_scores`` of their row (more than ``n`` where candidates tie there) get ``3 + full score``,
    above every similar-stage score and in their whole-vector order, ties kept (so a tie counts
    against the target, as in ``engine.evaluation.ranking_metrics``); the rest keep their
    similar-stage score. Returns ``float64 (q, m)``. Raises ValueError on shapes that differ or ``n < 0``.
    """
    if full_scores.shape != part_scores.shape or n < 0:
        raise ValueError(f"need two score matrices of one shape and n >= 0, got {full_scores.shape}, "
                         f"{part_scores.shape}, n {n}")
    out = np.asarray(part_scores, dtype=np.float64).copy()
    n = min(n, out.shape[1])
    if n == 0:
        return out
    full = np.asarray(full_scores, dtype=np.float64)
    nth = -np.partition(-full, n - 1, axis=1)[:, n - 1:n]
    lead = full >= nth
    out[lead] = 3.0 + full[lead]
    return out


__all__ = ["INSTANCE_FIRST", "instance_columns", "without_instance", "merge_instance_first", "instance_first_scores"]
