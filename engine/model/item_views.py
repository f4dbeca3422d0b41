"""Item photo views: the item tower's image-private block reads the catalogue photo and K augmented views of it.

A shopper's photo of a product differs from the catalogue's (a crop, a tilt, another exposure,
JPEG); the query tower's image-private block whitens its GeM-pooled backbone features
(``engine.model.private_block``), and the item's block part is the same map of the catalogue photo.
Database-side augmentation (our choice, issue 12 item 1; after the query-side views of training,
``engine.training.augment_cache``) moves the item's part towards where such queries land: with
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
vectors are built from a catalogue: the indexer's encode stage (``indexer.encode``) and the
evaluation (``engine.evaluation``). Their tokens are cached like the training views
(``cache_augmented_images``), so a rebuild does not run the backbone on them again.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from engine.model.augment import AugmentConfig
from engine.model.fusion import gem_pool


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


def view_features(backbones, photos: Sequence[str], views: int, seed: int, gem_p: float, cache_root: str | Path, *,
                  batch_size: int = 512, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """GeM-pooled (exponent ``gem_p``) backbone features of ``views`` augmented views of each photo
    (``engine.model.augment``: default ``AugmentConfig``, view seeds from ``seed``).

    Views already in an augmented token cache under ``cache_root`` (the training job's, a previous
    build's) are read where they lie; the photos that lack one get a cache of their own there
    (``cache_augmented_images``). Returns ``(features float32 (views, n, H), ok bool (n,))``; a photo
    that cannot be read has ``ok`` False (its rows are zeros).
    """
    from engine.tokens.cache import file_stat
    from engine.training.augment_cache import cache_augmented_images, find_view_rows, reuse_key

    config, root = AugmentConfig(), Path(cache_root)
    photos = [str(p) for p in photos]
    unique = list(dict.fromkeys(photos))
    files = [file_stat(p) for p in unique]
    shared = reuse_key(backbones, seed, config)
    found = find_view_rows(root, shared, unique, files, views)
    missing = sorted({i // views for i in range(len(unique) * views) if i not in found})
    if missing:
        cache_augmented_images(backbones, [unique[i] for i in missing], root, views=views, seed=seed, config=config,
                               progress=progress)
        found = find_view_rows(root, shared, unique, files, views)
    by_table: dict[int, tuple[object, list[tuple[int, int]]]] = {}
    for target, (table, row) in found.items():
        by_table.setdefault(id(table), (table, []))[1].append((target, row))
    hidden = next(iter(by_table.values()))[0].hidden_size if by_table else 1
    pooled = np.zeros((len(unique) * views, hidden), np.float32)
    done = np.zeros(len(unique) * views, dtype=bool)
    for table, pairs in by_table.values():
        pairs.sort(key=lambda pair: pair[1])
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            tokens, mask, _ = table.gather(np.array([row for _, row in chunk], dtype=np.int64))
            targets = np.array([t for t, _ in chunk], dtype=np.int64)
            pooled[targets] = gem_pool(tokens, mask, gem_p).float().numpy()
            done[targets] = True
    where = {p: i for i, p in enumerate(unique)}
    index = np.array([where[p] for p in photos], dtype=np.int64)
    per_view = pooled.reshape(len(unique), views, -1)[index].transpose(1, 0, 2)
    ok = done.reshape(len(unique), views).all(axis=1)[index]
    return np.ascontiguousarray(per_view), ok


def apply_item_views(model, vectors: np.ndarray, photos: Sequence[str | None], cache_root: str | Path | None, *,
                     progress: bool = True) -> tuple[np.ndarray, dict]:
    """Item vectors with the model's item photo views (module docstring); unchanged when the model
    has none (``item_photo_views`` 0) or no image-private block.

    Args:
        vectors: float32 ``(n, d)`` item-tower vectors. photos: per row, the photo the vector was
            encoded from, or None (no photo: the row is left as it is).
        cache_root: token cache root for the views (None: a temporary folder, views not kept).
    Returns:
        ``(vectors float32 (n, d), stats)``, stats ``{"views": K, "photos": rows refined,
        "unreadable": rows whose views could not be made (left as they are)}``.
    """
    k = int(getattr(model.config, "item_photo_views", 0) or 0)
    span = image_private_span(model.item_tower)
    stats = {"views": k, "photos": 0, "unreadable": 0}
    rows = np.array([i for i, p in enumerate(photos) if p is not None], dtype=np.int64)
    if k <= 0 or span is None or len(rows) == 0:
        return np.asarray(vectors, dtype=np.float32), stats
    with tempfile.TemporaryDirectory(prefix="ecsearch-views-") as tmp:
        block = model.item_tower.fusion.private
        feats, ok = view_features(model.backbones, [str(photos[i]) for i in rows], k,
                                  int(model.config.item_photo_views_seed), float(block.gem_p), cache_root or tmp,
                                  progress=progress)
    out = np.asarray(vectors, dtype=np.float32).copy()
    good = rows[ok]
    out[good] = refine_with_views(out[good], feats[:, ok], block.weight.double().cpu().numpy(),
                                  block.bias.double().cpu().numpy(), span)
    stats.update(photos=int(len(good)), unreadable=int((~ok).sum()))
    return out, stats
