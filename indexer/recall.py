"""Exact (brute-force) inner-product search and recall@k, to measure ANN loss.

Source: the standard definition (faiss ``contrib/evaluation.py`` ``knn_intersection_measure``):
recall@k = mean over queries of ``|ANN top-k ∩ exact top-k| / k``.
"""
from __future__ import annotations

import faiss
import numpy as np


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int, chunk_rows: int = 131072,
                 ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product.

    vectors: (n, d) float16/float32 (a memmap is fine; read chunk by chunk).
    queries: float32 (q, d). ids: optional int64 (n,) ids returned instead of row numbers.
    Returns ``(scores float32 (q, k), ids int64 (q, k))``, best first, ``-inf`` / ``-1``
    where n < k.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    n = vectors.shape[0]
    best_s = np.full((q.shape[0], k), -np.inf, dtype=np.float32)
    best_i = np.full((q.shape[0], k), -1, dtype=np.int64)
    for start in range(0, n, chunk_rows):
        block = np.ascontiguousarray(vectors[start:start + chunk_rows], dtype=np.float32)
        kk = min(k, block.shape[0])
        scores, rows = faiss.knn(q, block, kk, metric=faiss.METRIC_INNER_PRODUCT)  # BLAS + heap
        all_s = np.concatenate([best_s, scores], axis=1)
        all_i = np.concatenate([best_i, np.where(rows >= 0, rows + start, -1)], axis=1)
        top = np.argpartition(-all_s, kth=k - 1, axis=1)[:, :k]
        best_s = np.take_along_axis(all_s, top, axis=1)
        best_i = np.take_along_axis(all_i, top, axis=1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    best_s = np.take_along_axis(best_s, order, axis=1)
    best_i = np.take_along_axis(best_i, order, axis=1)
    if ids is not None:
        best_i = np.where(best_i >= 0, np.asarray(ids, dtype=np.int64)[np.maximum(best_i, 0)], -1)
    return best_s, best_i


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean ``|found[:, :k] ∩ truth[:, :k]| / k`` over rows (``-1`` entries never match)."""
    hits = 0
    for f, t in zip(np.asarray(found)[:, :k], np.asarray(truth)[:, :k]):
        t_set = set(int(x) for x in t if x >= 0)
        hits += sum(1 for x in f if x >= 0 and int(x) in t_set)
    return hits / (k * len(found)) if len(found) else float("nan")
