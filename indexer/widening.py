"""Exact k: widen a dense search until it returns ``min(k, matching items)`` hits.

An IVF search only sees the items of the lists it probes (nprobe of nlist per shard), and
the refine step only re-ranks those: ``top_k = 1000`` with 4 of 256 lists probed over the
11,882-product fashion index returned 158 hits. So (our choice):

1. **Plan.** The lists hold ``candidates / nlist`` items each on average (candidates: the
   allowed items, or all). When the asked nprobe cannot be expected to hold ``PLAN_MARGIN``
   times the hits wanted, the first round probes enough lists to; when that is a quarter of
   the lists or more (``EXACT_SHARE``), it scans exactly instead (the fp16 vectors of every
   allowed item: never misses, and cheaper than an IVF round that large with refine).
2. **Widen.** A query that still came back short (unbalanced lists) is searched again with
   ``WIDEN_FACTOR`` times the lists, then exactly. Only the short queries of a batch are.

Refine depth: the IVF round hands the refine step its top ``k * k_factor`` candidates, but
the probed lists cannot hold more than the ``nprobe`` largest lists of each shard together
(``ProbeCapacity``). Asking for more only grows faiss's result heaps (B = 5 queries at k = 100,
nprobe 5 on the fashion index: 2.4 ms with k_factor 50 = 5,000 slots for at most 617 items,
0.5 ms with 700 slots), so ``refine_k_factor`` caps k_factor there: every probed item is still
re-scored, so the hits are the same.

Each query's ``nprobe`` of its last IVF round, whether it was served exactly and whether it
was widened (planned or re-searched) are reported (``SearchServed``).
``bench/bench_exact_k.py`` measures the cost.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import faiss
import numpy as np

PLAN_MARGIN = 2.0
WIDEN_FACTOR = 4
EXACT_SHARE = 4  # probing >= 1 / EXACT_SHARE of the lists: scan exactly instead

# (rows of the query batch, nprobe, exact) -> (scores float32 (r, k), internal ids int64 (r, k), -1 padded)
SearchRows = Callable[[np.ndarray, int, bool], tuple[np.ndarray, np.ndarray]]


@dataclass
class SearchServed:
    """Results of a widened search and how each query was served.

    scores: ``float32 (n, k)`` (``-inf`` padding); ids: ``int64 (n, k)`` internal ids (``-1``
    padding); product_ids: n lists of k (``None`` padding; filled by ``IndexVersion``);
    nprobe: ``int32 (n,)`` lists probed per shard in the query's last IVF round (0 when only
    the exact scan ran); exact: ``bool (n,)`` served by the exact scan; widened: ``bool (n,)``
    more lists than asked, or the exact scan, were needed for the hits wanted.
    """

    scores: np.ndarray
    ids: np.ndarray
    nprobe: np.ndarray
    exact: np.ndarray
    widened: np.ndarray
    product_ids: list[list[str | None]] | None = None


class ProbeCapacity:
    """The most items ``nprobe`` lists per shard can hold: the sum over shards of their
    ``nprobe`` largest inverted lists. ``list_sizes``: one ``int (nlist,)`` array per shard."""

    def __init__(self, list_sizes: list[np.ndarray]):
        self._cumulative = [np.cumsum(np.sort(np.asarray(s, dtype=np.int64))[::-1]) for s in list_sizes]

    @classmethod
    def of_shards(cls, shards: list) -> "ProbeCapacity | None":
        """From faiss IVF shards' inverted lists; None when a shard is not IVF."""
        sizes = []
        for shard in shards:
            try:
                ivf = faiss.extract_index_ivf(shard)
            except RuntimeError:
                return None
            sizes.append(np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64))
        return cls(sizes)

    def items(self, nprobe: int) -> int:
        """Upper bound on the candidates one query's IVF round at ``nprobe`` (>= 1) can see."""
        return int(sum(c[min(nprobe, c.size) - 1] for c in self._cumulative if c.size))


def refine_k_factor(k: int, k_factor: int, nprobe: int, capacity: ProbeCapacity | None) -> int:
    """``k_factor`` (>= 1), lowered to the smallest value whose ``k * k_factor`` candidates still
    cover every item ``nprobe`` lists can hold (module docstring; None: no cap known)."""
    if capacity is None:
        return k_factor
    return max(1, min(k_factor, math.ceil(capacity.items(nprobe) / max(k, 1))))


def planned_nprobe(want: int, nprobe: int, nlist: int, candidates: int) -> tuple[int, bool]:
    """``(nprobe, exact)`` of the first round: lists expected to hold ``PLAN_MARGIN * want``
    of ``candidates`` items (at least the asked ``nprobe``), or exact from a quarter of the lists."""
    per_list = max(candidates / max(nlist, 1), 1e-9)
    probe = min(nlist, max(nprobe, math.ceil(PLAN_MARGIN * want / per_list)))
    return probe, probe * EXACT_SHARE >= nlist and probe > nprobe


def widened_search(search_rows: SearchRows, n_queries: int, want: int, nprobe: int, nlist: int,
                   exact_first: bool, candidates: int) -> SearchServed:
    """Search every query (first round planned, see the module docstring); search the ones
    with fewer than ``want`` hits again, wider.

    search_rows: runs one round for some rows of the batch. want: hits each query must get
    (``min(k, candidates)``). nprobe: the asked lists per shard. nlist: lists per shard.
    exact_first: the first round is exact anyway (e.g. a small allowed set). candidates:
    items the search may return (allowed, or all).
    """
    rows = np.arange(n_queries)
    probe, exact_now = (nprobe, True) if exact_first else planned_nprobe(want, nprobe, nlist, candidates)
    scores, ids = search_rows(rows, probe, exact_now)
    used = np.full(n_queries, 0 if exact_now else probe, dtype=np.int32)
    exact = np.full(n_queries, exact_now, dtype=bool)
    widened = np.full(n_queries, not exact_first and (exact_now or probe > nprobe), dtype=bool)
    short = np.empty(0, np.int64) if exact_now else rows[(ids >= 0).sum(axis=1) < want]
    widened[short] = True
    while short.size:
        probe = min(probe * WIDEN_FACTOR, nlist)
        go_exact = probe * EXACT_SHARE >= nlist
        s, i = search_rows(short, probe, go_exact)
        scores[short], ids[short] = s, i
        if go_exact:
            exact[short] = True
            used[short] = 0
            break
        used[short] = probe
        short = short[(i >= 0).sum(axis=1) < want]
    return SearchServed(scores, ids, used, exact, widened)
