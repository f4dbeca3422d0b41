"""Item photo views: the item tower's image-private block reads the catalogue photo and K augmented views of it.

A shopper's photo of a product differs from the catalogue's (a crop, a tilt, another exposure,
JPEG); the query tower's image-private block whitens its GeM-pooled backbone features
(``engine.model.private_block``), and the item's block part is the same map of the catalogue photo.
Database-side augmentation (our choice, issue 12 item 1; after the query-side views of training,
``engine.tokens.augment_cache``) moves the item's part towards where such queries land: with
``ModelConfig.item_photo_views`` = K > 0, an item's image-private part becomes

    unit( unit(W g_0 + b) + Σ_{v=1..K} unit(W g_v + b) ) · s

where ``g_0`` is the catalogue photo's pooled feature (the part the tower wrote), ``g_v`` that of
seeded augmented view ``v`` (``engine.model.augment``, default ``AugmentConfig``, view seeds
``view_seed(item_photo_views_seed, photo, v)``), ``W, b`` the item tower's block projection and
``s`` the part's norm in the tower's unit vector (so the vector stays unit length). Nothing else in
the vector changes: text-only and photo + text queries give the block a zero gain (a text query)
or their own (photo + text: gain 0 in the recipe), so only photo-only queries rank differently.

Measured (docs/results.md, "Item photo views"): on 2,000 augmented test photos against the 11,882
products, ``var/model_cross``'s Recall@1 87.15 % → 90.35 % (K = 1) → 91.90 % (K = 2) → 93.40 % (K = 3,
the ``ecsearch train`` default).

The tower's own forward is unchanged (one photo per item); the views are applied where item
vectors are built from a catalogue: the indexer's encode stage (``indexer.photo_views``) and the
evaluation (``engine.evaluation``), through ``engine.tokens.item_views``, which reads the views'
tokens from the augmented token caches. This module holds the arithmetic.
"""
from __future__ import annotations

import numpy as np


def image_private_span(tower) -> tuple[int, int] | None:
    """``(start, stop)`` of the image-private block's own part (without its null axis) in ``tower``'s
    output vectors, or None when the tower has no image-private block."""
    fusion = tower.fusion
    block = getattr(fusion, "private", None)
    if block is None:
        return None
    start = fusion.merge.out_features
    return start, start + block.dim - 1


def refine_with_views(vectors: np.ndarray, view_features: np.ndarray, weight: np.ndarray, bias: np.ndarray,
                      span: tuple[int, int]) -> np.ndarray:
    """The image-private parts of ``vectors`` with their views added (module docstring).

    Args:
        vectors: float32 ``(n, d)`` item vectors whose rows all have a photo (their part is not e_null).
        view_features: float ``(K, n, H)`` pooled backbone features of the K views of each row's photo.
        weight / bias: the block's projection, ``(p - 1, H)`` and ``(p - 1,)``.
        span: ``(start, stop)`` of the part in the vectors, ``stop - start == p - 1``.
    Returns:
        float32 ``(n, d)``: a copy; each row's part is the unit sum of its own direction and its views'
        whitened directions, scaled to the part's old norm.
    Raises:
        ValueError: mismatched shapes, or a row whose part is zero.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    feats = np.asarray(view_features, dtype=np.float64)
    start, stop = span
    if feats.ndim != 3 or feats.shape[1] != len(vectors) or tuple(weight.shape) != (stop - start, feats.shape[2]):
        raise ValueError(f"view features {feats.shape} do not fit {len(vectors)} vectors and a projection "
                         f"{tuple(weight.shape)} over span {span}")
    part = vectors[:, start:stop].astype(np.float64)
    norm = np.linalg.norm(part, axis=1, keepdims=True)
    if (norm <= 0).any():
        raise ValueError(f"{int((norm <= 0).sum())} rows have no image-private part (no photo)")
    total = part / norm
    for view in feats:
        y = view @ np.asarray(weight, dtype=np.float64).T + np.asarray(bias, dtype=np.float64)
        total += y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    out = vectors.copy()
    out[:, start:stop] = (total / np.linalg.norm(total, axis=1, keepdims=True) * norm).astype(np.float32)
    return out
