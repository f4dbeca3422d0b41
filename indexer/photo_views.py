"""The encode stage's item photo views: ``engine.model.item_views`` on the vectors of an index build.

A model whose config sets ``item_photo_views`` K > 0 gets, after its chunks are encoded, every indexed
product with a usable photo refined: the image-private part of its vector also reads K augmented views
of the photo (``engine.model.item_views``). Called by ``indexer.encode.encode_products`` (full and
incremental builds alike). Source: our choice (issue 12 item 1).
"""
from __future__ import annotations

import time
from typing import Callable, Sequence


def add_item_views(model, photos: Sequence[str | None], result, token_cache: str | None,
                   log: Callable[[str], None]) -> None:
    """Refine ``result.vectors`` (``indexer.encode.EncodeResult``, float32 (n, d)) in place with the model's
    item photo views; ``photos``: per indexed row, the photo it was encoded from or None. The views' tokens
    are read from / cached under ``token_cache`` (None: a temporary folder). Records ``result.item_views``
    (``{"views", "photos", "unreadable", "seconds"}``) and logs one line; does nothing for a model without
    views (``item_photo_views`` 0)."""
    if not int(getattr(model.config, "item_photo_views", 0) or 0):
        return
    from engine.tokens.item_views import apply_item_views

    t0 = time.perf_counter()
    result.vectors, stats = apply_item_views(model, result.vectors, photos, token_cache)
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    result.item_views = stats
    log(f"encode: item photo views: {stats['views']} augmented views of {stats['photos']} photos "
        f"({stats['unreadable']} unreadable, left with the catalogue photo alone) in {stats['seconds']:.1f} s")
