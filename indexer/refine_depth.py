"""The refine depth (``k_factor``) an index version serves by default, chosen at build time.

The refine step re-scores the IVF-PQ round's top ``k * k_factor`` candidates with the exact
fp16 vectors (``indexer.refine``). Past some depth, more candidates find nothing new: the
probed lists hold few items, or the PQ order already puts the true top k near the front. A
deeper refine then costs search time for no recall. On the fashion index (11,882 items,
IVF256,PQ80x8, 640-d, 600 typed queries through the query tower, nprobe 16) recall@10 against
exact search was 0.9528 / 0.9738 / 0.9835 / 0.9837 / 0.9837 at k_factor 3 / 5 / 10 / 20 / 50,
and a search batch of 8 queries took 0.97 ms at k_factor 5 against 2.18 ms at 50 (one thread,
AMX Xeon); over gRPC on the AVX2 path, text queries at concurrency 8 went from p50 15.5 to
14.2 ms with k_factor 10 (docs/serving.md).

So when the build is not given a ``k_factor``, ``choose_k_factor`` picks the smallest of
``K_FACTOR_CANDIDATES`` whose refined recall@k on every query set (item sample, each query
kind's query-tower sample), at every nprobe the version serves by default, is within
``K_FACTOR_TOLERANCE`` of the deepest candidate's. Source: our choice (the same rule as
nprobe's, which the build also measures rather than fixes).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from indexer.recall import recall_at_k

K_FACTOR_CANDIDATES = (5, 10, 20, 50)
K_FACTOR_MAX = K_FACTOR_CANDIDATES[-1]  # also the depth nprobe is chosen with
K_FACTOR_TOLERANCE = 0.002  # recall@k points (of 1.0) a shallower refine may lose against K_FACTOR_MAX


def choose_k_factor(index, sets: dict[str, tuple[np.ndarray, np.ndarray]], nprobes: Sequence[int], k: int, *,
                    candidates: Sequence[int] = K_FACTOR_CANDIDATES,
                    tolerance: float = K_FACTOR_TOLERANCE) -> tuple[int, dict[int, float]]:
    """The default refine depth of a version.

    index: the open ``IndexVersion``. sets: ``{name: (queries float32 (q, d), exact top-k ids
    int64 (q, k))}``. nprobes: the nprobe values the version serves by default (the default and
    each query kind's). k: the k of recall@k.

    Returns ``(k_factor, {k_factor: worst recall@k over sets and nprobes})``, the dict holding
    every candidate measured (ascending, stopping at the chosen one, plus the deepest).
    Raises ValueError for no candidates or a candidate < 1.
    """
    depths = sorted(set(int(c) for c in candidates))
    if not depths or depths[0] < 1:
        raise ValueError(f"k_factor candidates must be >= 1, got {list(candidates)}")

    def worst(k_factor: int) -> float:
        recalls = [recall_at_k(index.search_ids(queries, k, nprobe=nprobe, refine=True, k_factor=k_factor)[1],
                               exact, k)
                   for queries, exact in sets.values() for nprobe in nprobes]
        return min(recalls) if recalls else 1.0

    measured = {depths[-1]: worst(depths[-1])}
    for k_factor in depths[:-1]:
        measured[k_factor] = worst(k_factor)
        if measured[k_factor] >= measured[depths[-1]] - tolerance:
            return k_factor, dict(sorted(measured.items()))
    return depths[-1], dict(sorted(measured.items()))
