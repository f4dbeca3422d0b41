"""The searches of one micro-batch: the post-encode search stage of the query server's ``MicroBatcher``.

After the query tower has encoded a batch, one job in the search thread pool searches for
every request of the batch and hands the hits back with the vectors (``server.batching``).
Requests without metadata filters that search the same index version with the same top_k
and nprobe share one faiss call (``IndexVersion.search`` over all their vectors: faiss
searches each row on its own, so every request gets the hits it would get alone).
Unfiltered hybrid requests share one faiss call for their dense sides in the same way, then
get their lexical side and fusion one by one. Filtered, paged and lexical requests are searched
one by one (``server.retrieval.run_job``), since each has its own allowed set, window or text. A
request's failure fails that request alone.

Measured on the fashion index (2 shards, nprobe 4, one thread): 5 unfiltered queries take
0.13 ms in one faiss call; searched alone, each takes ~0.18 ms (0.04 ms in faiss, the rest
Python around it). Source: our choice.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from server.filters import FilteredSearchResult, dense_served, found_hits
from server.retrieval import SearchJob, run_job

__all__ = ["SearchJob", "search_batch"]


def search_batch(jobs: Sequence[SearchJob], vectors: np.ndarray) -> list[FilteredSearchResult | Exception]:
    """Search every job with its query vector.

    Args:
        jobs: one ``SearchJob`` per query.
        vectors: ``float32 (B, d)`` query embeddings, row i for ``jobs[i]``.

    Returns:
        One ``FilteredSearchResult`` per job, or the exception its search raised (e.g.
        ``indexer.errors.SearchArgumentError``). In a shared call, ``search_ms`` is the
        shared call's time and ``metadata_ms`` the job's own record reads.
    """
    results: list[FilteredSearchResult | Exception | None] = [None] * len(jobs)
    groups: dict[tuple[int, int, int | None], list[int]] = {}
    hybrid: dict[tuple[int, int, int | None], list[int]] = {}
    for row, job in enumerate(jobs):
        if job.plain:
            groups.setdefault((id(job.index), job.top_k, job.nprobe), []).append(row)
        elif job.hybrid_unfiltered:
            hybrid.setdefault((id(job.index), job.dense_depth, job.nprobe), []).append(row)
        else:
            results[row] = _one(job, vectors[row])
    for rows in hybrid.values():
        _hybrid_shared(jobs, vectors, rows, results)
    for rows in groups.values():
        if len(rows) == 1:
            results[rows[0]] = _one(jobs[rows[0]], vectors[rows[0]])
            continue
        try:
            _shared(jobs, vectors, rows, results)
        except Exception:  # e.g. one bad vector: search them alone, so only its request fails
            for row in rows:
                results[row] = _one(jobs[row], vectors[row])
    return results


def _one(job: SearchJob, vector: np.ndarray) -> FilteredSearchResult | Exception:
    try:
        return run_job(job, vector)
    except Exception as exc:
        return exc


def _hybrid_shared(jobs: Sequence[SearchJob], vectors: np.ndarray, rows: list[int],
                   results: list[FilteredSearchResult | Exception | None]) -> None:
    """Unfiltered hybrid jobs on one index version with one dense depth and nprobe: their dense
    sides in one search call, then each job's lexical side and fusion on its own."""
    shared = None
    if len(rows) > 1:
        first = jobs[rows[0]]
        try:
            t0 = time.perf_counter()
            served = first.index.search_served(np.ascontiguousarray(vectors[rows], dtype=np.float32),
                                               first.dense_depth, nprobe=first.nprobe, names=False)
            shared = (served, (time.perf_counter() - t0) * 1e3)
        except Exception:  # e.g. one bad vector: search them alone, so only its request fails
            shared = None
    for n, row in enumerate(rows):
        try:
            results[row] = run_job(jobs[row], vectors[row], None if shared is None else (shared[0], n, shared[1]))
        except Exception as exc:
            results[row] = exc


def _shared(jobs: Sequence[SearchJob], vectors: np.ndarray, rows: list[int],
            results: list[FilteredSearchResult | Exception | None]) -> None:
    """Unfiltered jobs on one index version with one top_k and nprobe: one search call."""
    first = jobs[rows[0]]
    t0 = time.perf_counter()
    served = first.index.search_served(np.ascontiguousarray(vectors[rows], dtype=np.float32), first.top_k,
                                       nprobe=first.nprobe)
    search_ms = (time.perf_counter() - t0) * 1e3
    for n, row in enumerate(rows):
        job = jobs[row]
        t1 = time.perf_counter()
        hits = found_hits(job.index, served.product_ids[n], served.scores[n], job.cache)
        results[row] = FilteredSearchResult(hits, search_ms=search_ms,
                                            metadata_ms=(time.perf_counter() - t1) * 1e3, allowed_count=None,
                                            total_hits=len(hits), dense=dense_served(served, n))
