"""The item photo views' tokens: pooled features of augmented views of catalogue photos, and the item vectors with them.

``engine.model.item_views`` holds the arithmetic (module docstring there: what the views are and what
they measured); this module reads the views' backbone tokens from the augmented token caches
(``engine.tokens.augment_cache``: the training job's, a previous build's), runs the backbone only for
the photos none holds, and applies the views to item vectors. Used by the indexer's encode stage
(``indexer.photo_views``) and the evaluation. Source: our choice (issue 12 item 1).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from engine.model.augment import AugmentConfig
from engine.model.fusion import gem_pool
from engine.model.item_views import image_private_span, refine_with_views
from engine.tokens.augment_cache import cache_augmented_images, find_view_rows, reuse_key
from engine.tokens.cache import file_stat


def view_features(backbones, photos: Sequence[str], views: int, seed: int, gem_p: float, cache_root: str | Path, *,
                  batch_size: int = 512, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """GeM-pooled (exponent ``gem_p``) backbone features of ``views`` augmented views of each photo
    (``engine.model.augment``: default ``AugmentConfig``, view seeds from ``seed``).

    Views already in an augmented token cache under ``cache_root`` (the training job's, a previous
    build's) are read where they lie; the photos that lack one get a cache of their own there
    (``cache_augmented_images``). Returns ``(features float32 (views, n, H), ok bool (n,))``; a photo
    that cannot be read has ``ok`` False (its rows are zeros).
    """
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
    """Item vectors with the model's item photo views (``engine.model.item_views``); unchanged when the model
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
