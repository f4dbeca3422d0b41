"""Retrieval metrics over a whole candidate pool: Recall@k, MRR, nDCG@k, Precision@k.

Exact (flat) scoring by inner product, in query chunks so a large pool never needs the full
score matrix at once (chunked evaluation as in sentence-transformers' IR evaluator).
Protocol: M-BEER (UniECS, arXiv:2508.13843), restated in METHOD.md §4.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def rank_of_targets(queries: np.ndarray, candidates: np.ndarray, targets: np.ndarray,
                    chunk: int = 1024, with_ties: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """1-based rank of each query's one relevant candidate under inner-product scoring.

    queries ``float32 (n, d)``, candidates ``float32 (m, d)``, targets ``int64 (n,)`` (index into
    candidates). Ties count against the target (rank = 1 + number of candidates scoring
    ``>=`` the target, itself excluded), so a constant model gets the worst rank, not the best.
    Returns ``int64 (n,)`` in ``[1, m]``; with ``with_ties``, ``(ranks, tied)``: ``tied`` ``int64 (n,)``
    the candidates scoring exactly the target's score, itself excluded (``instance_metrics`` then
    averages over the orders of the tied candidates).
    """
    n = queries.shape[0]
    ranks = np.empty(n, dtype=np.int64)
    tied = np.empty(n, dtype=np.int64)
    for start in range(0, n, chunk):
        ranks[start:start + chunk], tied[start:start + chunk] = ranks_from_scores(
            queries[start:start + chunk] @ candidates.T, targets[start:start + chunk])
    return (ranks, tied) if with_ties else ranks


def ranks_from_scores(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``rank_of_targets`` on a score matrix ``(n, m)`` (any ranking, e.g. two stages): ``(ranks
    int64 (n,), tied int64 (n,))``, ties counted against the target as there."""
    own = scores[np.arange(len(targets)), targets][:, None]
    return (scores >= own).sum(axis=1).astype(np.int64), (scores == own).sum(axis=1).astype(np.int64) - 1


def mean_per_metric(per_query: dict[str, np.ndarray]) -> dict[str, float]:
    """``{metric: mean over its queries}`` of a ``{metric: float (n,)}`` per-query result."""
    return {name: float(np.mean(values)) for name, values in per_query.items()}


def instance_per_query(ranks: np.ndarray, tied: np.ndarray | None = None,
                       ks: Sequence[int] = (1, 5, 10)) -> dict[str, np.ndarray]:
    """Recall@k and reciprocal rank of each query: ``instance_metrics`` before the mean.

    Same arguments as ``instance_metrics``. Returns ``{"recall@1": float64 (n,), ..., "mrr": float64 (n,)}``,
    each value in ``[0, 1]`` (fractional where the target ties with other candidates). The paired
    comparisons of ``engine.evaluation.significance`` read these.
    Raises ValueError on an empty ``ranks``.
    """
    ranks = np.asarray(ranks, dtype=np.int64)
    if ranks.size == 0:
        raise ValueError("instance_metrics needs at least one query")
    tied = np.zeros_like(ranks) if tied is None else np.asarray(tied, dtype=np.int64)
    first = ranks - tied  # best rank the target can take among its ties
    out = {f"recall@{k}": np.clip((k - first + 1) / (tied + 1), 0.0, 1.0) for k in ks}
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, int(ranks.max()) + 1))])
    out["mrr"] = (harmonic[ranks] - harmonic[first - 1]) / (tied + 1)
    return out


def instance_metrics(ranks: np.ndarray, tied: np.ndarray | None = None,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k (share of queries whose target ranks ``<= k``) and MRR (mean of ``1/rank``, untruncated).

    ranks: ``int (n,)``, 1-based, ties counted against the target (``rank_of_targets``). tied:
    optional ``int (n,)``, candidates with exactly the target's score; given, each metric is its
    expectation over the random orders of the tied candidates (the target equally likely at each
    rank from ``ranks - tied`` to ``ranks``; McSherry & Najork, "Computing information retrieval
    performance measures efficiently in the presence of tied scores", ECIR 2008): two products
    with the same title and the same photo bytes score the same for every query, and neither
    should count as found at rank 1 for sure nor as missed for sure. A constant model still gets
    Recall@1 = 1 / m. Returns ``{"recall@1": .., ..., "mrr": ..}`` in ``[0, 1]``.
    Raises ValueError on an empty ``ranks``.
    """
    return mean_per_metric(instance_per_query(ranks, tied, ks))


def top_k_indices(queries: np.ndarray, candidates: np.ndarray, k: int,
                  exclude: np.ndarray | None = None, chunk: int = 1024) -> np.ndarray:
    """Indices of the ``k`` best candidates per query, best first (inner product, exact).

    exclude: optional ``int64 (n,)``, one candidate index per query left out of its ranking
    (``-1``: none). Returns ``int64 (n, k)``.
    """
    n, m = queries.shape[0], candidates.shape[0]
    k = min(k, m)
    out = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, chunk):
        out[start:start + chunk] = top_k_from_scores(queries[start:start + chunk] @ candidates.T, k,
                                                     None if exclude is None else exclude[start:start + chunk])
    return out


def top_k_from_scores(scores: np.ndarray, k: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """``top_k_indices`` on a score matrix ``(n, m)`` (changed in place where ``exclude`` names a
    candidate): ``int64 (n, min(k, m))``, best first."""
    k = min(k, scores.shape[1])
    if exclude is not None:
        rows = np.nonzero(exclude >= 0)[0]
        scores[rows, exclude[rows]] = -np.inf
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def ndcg_at_k(relevant_in_top: np.ndarray, n_relevant: np.ndarray, k: int = 10) -> np.ndarray:
    """Binary-relevance nDCG@k per query (Järvelin & Kekäläinen 2002).

    relevant_in_top: ``bool (n, k)``, whether the result at rank ``r`` is relevant;
    n_relevant: ``int (n,)`` relevant candidates in the pool (ideal ranking puts
    ``min(k, n_relevant)`` of them first). DCG = Σ rel_r / log2(r + 1). Queries with no
    relevant candidate get 0. Returns ``float64 (n,)``.
    """
    rel = np.asarray(relevant_in_top, dtype=np.float64)[:, :k]
    discounts = 1.0 / np.log2(np.arange(2, rel.shape[1] + 2))
    dcg = (rel * discounts).sum(axis=1)
    ideal_n = np.minimum(np.asarray(n_relevant), k)
    cum = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))])
    idcg = cum[ideal_n]
    return np.where(idcg > 0, dcg / np.where(idcg > 0, idcg, 1.0), 0.0)


def precision_at_k(relevant_in_top: np.ndarray, k: int = 10) -> np.ndarray:
    """Precision@k per query: relevant results among the first ``k``, divided by ``k``. ``float64 (n,)``."""
    rel = np.asarray(relevant_in_top, dtype=np.float64)[:, :k]
    return rel.sum(axis=1) / float(k)


def attribute_per_query(queries: np.ndarray, candidates: np.ndarray, query_groups: np.ndarray,
                        candidate_groups: np.ndarray, exclude: np.ndarray | None = None,
                        k: int = 10) -> dict[str, np.ndarray]:
    """nDCG@k and Precision@k of each query: ``attribute_metrics`` before the mean.

    Same arguments as ``attribute_metrics``. Returns ``{"ndcg@k": float64 (n,), "precision@k": float64 (n,)}``.
    Raises ValueError when there is no query.
    """
    if queries.shape[0] == 0:
        raise ValueError("attribute_metrics needs at least one query")
    return attribute_per_query_of_top(top_k_indices(queries, candidates, k, exclude), query_groups,
                                      candidate_groups, exclude, k)


def attribute_per_query_of_top(top: np.ndarray, query_groups: np.ndarray, candidate_groups: np.ndarray,
                               exclude: np.ndarray | None = None, k: int = 10) -> dict[str, np.ndarray]:
    """``attribute_per_query`` of rankings already made: ``top`` ``int64 (n, <= k)``, each query's
    best candidates first (``top_k_from_scores`` of any ranking, e.g. two stages)."""
    rel = candidate_groups[top] == query_groups[:, None]  # [n, k]
    counts = np.array([(candidate_groups == g).sum() for g in query_groups], dtype=np.int64)
    if exclude is not None:
        ex_ok = exclude >= 0
        counts -= (ex_ok & (candidate_groups[np.where(ex_ok, exclude, 0)] == query_groups)).astype(np.int64)
    if top.shape[1] < k:
        rel = np.pad(rel, ((0, 0), (0, k - top.shape[1])))
    return {f"ndcg@{k}": ndcg_at_k(rel, counts, k), f"precision@{k}": precision_at_k(rel, k)}


def attribute_metrics(queries: np.ndarray, candidates: np.ndarray, query_groups: np.ndarray,
                      candidate_groups: np.ndarray, exclude: np.ndarray | None = None,
                      k: int = 10) -> dict[str, float]:
    """Attribute-level nDCG@k and Precision@k: a candidate is relevant when its group equals the query's.

    queries ``float32 (n, d)``, candidates ``float32 (m, d)``, query_groups ``int64 (n,)``,
    candidate_groups ``int64 (m,)`` (``-1``: in no group, never relevant), exclude ``int64 (n,)``
    (a candidate left out per query, ``-1`` none; it does not count as relevant either).
    Returns ``{"ndcg@k": .., "precision@k": ..}`` (means over queries). Raises ValueError when
    there is no query.
    """
    return mean_per_metric(attribute_per_query(queries, candidates, query_groups, candidate_groups, exclude, k))


__all__ = ["rank_of_targets", "ranks_from_scores", "top_k_from_scores", "attribute_per_query_of_top",
           "mean_per_metric", "instance_per_query", "instance_metrics", "top_k_indices", "ndcg_at_k",
           "precision_at_k", "attribute_per_query", "attribute_metrics"]
