"""Argument checks of ``IndexVersion.search`` (query vectors, k, nprobe): each raises
``SearchArgumentError`` with the reason. Source: our choice."""
from __future__ import annotations

import numpy as np

from indexer.errors import SearchArgumentError

# the library's limit on k (the gRPC server's own, lower one: server.service.MAX_REQUEST_TOP_K)
MAX_SEARCH_K = 10_000


def check_queries(queries: np.ndarray, dim: int, query_dim: int | None = None) -> np.ndarray:
    """``queries`` as C-contiguous float32 (n, dim) (a (dim,) vector is taken as n = 1).
    ``query_dim``: the model's width where the index version stores only its first ``dim``
    dimensions (``indexer.served_width``): queries of that width keep their first ``dim``.
    Raises SearchArgumentError for another shape, n = 0, a non-float dtype or NaN / inf."""
    q = np.asarray(queries)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim == 2 and query_dim is not None and query_dim > dim and q.shape[1] == query_dim:
        q = q[:, :dim]
    if q.ndim != 2 or q.shape[1] != dim:
        shapes = f"(n, {dim})" if query_dim in (None, dim) else f"(n, {query_dim}) or (n, {dim})"
        raise SearchArgumentError(f"queries must have shape {shapes}, got {np.asarray(queries).shape}")
    if q.shape[0] == 0:
        raise SearchArgumentError("queries is empty (n = 0)")
    if not np.issubdtype(q.dtype, np.floating):
        raise SearchArgumentError(f"queries must be floating point, got {q.dtype}")
    q = np.ascontiguousarray(q, dtype=np.float32)
    if not np.isfinite(q).all():
        raise SearchArgumentError("queries contain NaN or infinite values")
    return q


def check_k(k: int) -> int:
    """``k`` as int; raises SearchArgumentError unless an integer in [1, MAX_SEARCH_K]."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_SEARCH_K:
        raise SearchArgumentError(f"k (top_k) must be an integer in [1, {MAX_SEARCH_K}], got {k!r}")
    return int(k)


def check_nprobe(nprobe: int | None, default: int, nlist: int) -> int:
    """``nprobe`` clipped to ``nlist`` (None: ``default``); raises SearchArgumentError unless an integer >= 1."""
    if nprobe is None:
        return default
    if isinstance(nprobe, bool) or not isinstance(nprobe, (int, np.integer)) or nprobe < 1:
        raise SearchArgumentError(f"nprobe must be an integer >= 1, got {nprobe!r}")
    return int(min(nprobe, nlist))
