"""How many of the model's dimensions an index version stores (our choice, issues 11 and 12).

The item tower's cross-modal block (``engine.model.cross_block``) scores items that lack a title
or a photo; an item with both carries only the block's two null axes, which no query vector uses,
so its block adds exactly 0 to every query's score. When every indexed item has both modalities
(the fashion catalogue), the block is dead weight in the index: 256 of 896 dimensions, 32 of 112
PQ codes per item and over a quarter of the refine stage's arithmetic. Such a version stores the first
``dim - p`` dimensions only and records the model's width as ``query_dim``; the search keeps the
same first dimensions of every query vector (``indexer.search_checks.check_queries``). Scores are
unchanged: the dropped dimensions add exactly 0 to every dot product.

A version built this way cannot take an upsert without a title or a photo (its block would not
be dead): ``indexer.incremental`` refuses it with a message asking for a full build.
"""
from __future__ import annotations

import numpy as np


def dead_block_columns(model) -> np.ndarray:
    """Columns of ``model``'s item vectors (``int64``) that hold the cross-modal block's canonical
    variates (both slots, not the null axes); empty when the model has no such block. The block
    is the last one of the vector (``engine.model.fusion.FusionEncoder.forward``)."""
    block = getattr(model.item_tower.fusion, "cross_modal", None)
    if block is None:
        return np.zeros(0, dtype=np.int64)
    start = int(model.dim) - block.dim
    k = block.k
    return start + np.concatenate([np.arange(k), np.arange(k + 1, 2 * k + 1)]).astype(np.int64)


def stored_width(model, vectors: np.ndarray) -> int:
    """Dimensions an index version of ``vectors`` (float32 ``(n, model.dim)``, the item tower's)
    needs: ``model.dim``, or ``model.dim - p`` when the model has a cross-modal block of width ``p``
    whose variates are exactly 0 on every row (every item has a title and a photo)."""
    columns = dead_block_columns(model)
    if not len(columns) or not len(vectors) or np.any(vectors[:, columns] != 0):
        return int(model.dim)
    return int(model.dim) - model.item_tower.fusion.cross_modal.dim


def stored_vectors(model, vectors: np.ndarray, queries, manifest_extra: dict, log) -> tuple[np.ndarray, object]:
    """``(vectors, queries)`` cut to ``stored_width`` (queries: None, one float32 ``(q, model.dim)``
    array or ``{kind: array}``, the recall sample); records ``query_dim`` in ``manifest_extra`` and
    says so through ``log`` when it cuts, else returns both unchanged."""
    width = stored_width(model, vectors)
    if width == vectors.shape[1]:
        return vectors, queries
    log(f"index: every item has a title and a photo: storing {width} of the model's {vectors.shape[1]} dimensions "
        "(the cross-modal block adds 0 to their scores; indexer/served_width.py)")
    manifest_extra["query_dim"] = int(vectors.shape[1])

    def cut(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x[:, :width])

    if isinstance(queries, dict):
        queries = {kind: cut(q) for kind, q in queries.items()}
    elif queries is not None:
        queries = cut(queries)
    return cut(vectors), queries
