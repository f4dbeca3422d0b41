"""Exact k: widen a dense search until it returns ``min(k, matching items)`` hits.

An IVF search only sees the items of the lists it probes (nprobe of nlist per shard), and
the refine step only re-ranks those: ``top_k = 1000`` with 4 of 256 lists probed over the
11,882-product fashion index returned 158 hits. Here a query that came back short is
searched again with 4x the lists (16, 64, ...), and once 4x would reach nlist, exactly
(a scan of every allowed item's fp16 vector, which never misses). Only the short queries
of a batch are searched again. Each query's ``nprobe`` of its last IVF round and whether it
was served exactly are reported (``SearchServed``). ``bench/bench_index.py`` measures what
the widening costs. Source: our choice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

WIDEN_FACTOR = 4

# (rows of the query batch, nprobe, exact) -> (scores float32 (r, k), internal ids int64 (r, k), -1 padded)
SearchRows = Callable[[np.ndarray, int, bool], tuple[np.ndarray, np.ndarray]]


@dataclass
class SearchServed:
    """Results of a widened search and how each query was served.

    scores: ``float32 (n, k)`` (``-inf`` padding); ids: ``int64 (n, k)`` internal ids (``-1``
    padding); product_ids: n lists of k (``None`` padding; filled by ``IndexVersion``);
    nprobe: ``int32 (n,)`` lists probed per shard in the query's last IVF round (0 when the
    first round was already exact); exact: ``bool (n,)`` served by the exact scan; widened:
    ``bool (n,)`` the first round held too few and the query was searched again.
    """

    scores: np.ndarray
    ids: np.ndarray
    nprobe: np.ndarray
    exact: np.ndarray
    widened: np.ndarray
    product_ids: list[list[str | None]] | None = None


def widened_search(search_rows: SearchRows, n_queries: int, want: int, nprobe: int, nlist: int,
                   exact_first: bool) -> SearchServed:
    """Search every query; search the ones with fewer than ``want`` hits again, wider.

    search_rows: runs one round for some rows of the batch. want: hits each query must get
    (``min(k, matching items)``). nprobe: the first round's lists per shard. nlist: lists
    per shard. exact_first: the first round is already exact (e.g. a small allowed set).
    """
    rows = np.arange(n_queries)
    scores, ids = search_rows(rows, nprobe, exact_first)
    used = np.full(n_queries, 0 if exact_first else nprobe, dtype=np.int32)
    exact = np.full(n_queries, exact_first, dtype=bool)
    short = np.empty(0, np.int64) if exact_first else rows[(ids >= 0).sum(axis=1) < want]
    widened = np.zeros(n_queries, dtype=bool)
    widened[short] = True
    probe = nprobe
    while short.size:
        go_exact = probe * WIDEN_FACTOR >= nlist
        probe = probe if go_exact else probe * WIDEN_FACTOR
        s, i = search_rows(short, probe, go_exact)
        scores[short], ids[short] = s, i
        if go_exact:
            exact[short] = True
            break
        used[short] = probe
        short = short[(i >= 0).sum(axis=1) < want]
    return SearchServed(scores, ids, used, exact, widened)
