"""Dense vs lexical vs hybrid retrieval on the robustness text queries (issue 14 item 5).

The same three rankings the server's ``retrieval`` modes produce (``server.retrieval``),
computed here over the evaluation's candidates, so ``ecsearch eval --robust N`` compares them:

- **dense**: query tower text view T against the item vectors F (exact inner product; the
  trained row of ``engine.evaluation.robustness``);
- **lexical**: BM25 over the candidates' title + attribute values (``engine.retrieval.lexical``,
  the index the indexer writes into every index version);
- **hybrid**: the dense and the lexical top ``HYBRID_CANDIDATES`` fused by reciprocal rank
  fusion (k = 60, weights 1), as ``RETRIEVAL_HYBRID`` with default options does; and with the
  lexical ranking weighted 2 (``hybrid.lexical_weight = 2`` in a request); and by weighted
  min-max score fusion, weights 1 (``hybrid.fusion = FUSION_WEIGHTED``);
- **ceiling**: every relevant candidate first: Precision@10 below 1 where a query has fewer
  than 10 relevant candidates, the most any ranking can reach.

A query with fewer than k lexical hits is padded with non-relevant slots (precision counts
them as misses). Source: our choice (protocol); RRF: Cormack et al., SIGIR 2009.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from engine.evaluation.ranking_metrics import ndcg_at_k, precision_at_k, top_k_indices
from engine.retrieval.fusion import reciprocal_rank_fusion, weighted_score_fusion
from engine.retrieval.lexical import LexicalIndex, product_text

HYBRID_CANDIDATES = 100  # = server.retrieval.HYBRID_MIN_CANDIDATES (the server's default depth at top_k <= 100)
DENSE_LABEL = "dense: trained (text T -> item F)"
LEXICAL_LABEL = "lexical: BM25 (title + attribute values)"
HYBRID_LABEL = "hybrid: RRF(dense, BM25), k = 60"
HYBRID_LEXICAL2_LABEL = "hybrid: RRF, lexical weight 2"
HYBRID_WEIGHTED_LABEL = "hybrid: weighted min-max scores, weights 1"
CEILING_LABEL = "ceiling: every relevant candidate first"


def lexical_index(products: Sequence) -> LexicalIndex:
    """BM25 over ``products`` (objects with ``title`` and ``attributes``); document i = product i."""
    return LexicalIndex.build([product_text(p.title, p.attributes) for p in products])


def ranked_metrics(top: np.ndarray, relevant: np.ndarray, keys: np.ndarray, k: int = 10) -> dict[str, float]:
    """Precision@k and nDCG@k of ranked candidate lists ``int64 (a, >= k)`` (``-1``: no hit).
    relevant: ``bool (g, m)``; keys: ``int64 (a,)`` row of ``relevant`` for each query."""
    top = top[:, :k]
    rel = relevant[keys[:, None], np.maximum(top, 0)] & (top >= 0)
    counts = relevant.sum(axis=1)[keys]
    return {f"precision@{k}": float(precision_at_k(rel, k).mean()), f"ndcg@{k}": float(ndcg_at_k(rel, counts, k).mean())}


def _pad(ids: np.ndarray, k: int) -> np.ndarray:
    out = np.full(k, -1, dtype=np.int64)
    out[:min(k, ids.size)] = ids[:k]
    return out


def retrieval_rows(texts: Sequence[str], queries: np.ndarray, candidates: np.ndarray, lexical: LexicalIndex,
                   relevant: np.ndarray, keys: np.ndarray, k: int = 10) -> dict[str, dict[str, float]]:
    """``{label: {"precision@k", "ndcg@k"}}`` for dense, lexical and hybrid retrieval of the
    query ``texts`` (dense vectors ``queries float32 (a, d)`` against ``candidates float32 (m, d)``)."""
    depth = max(k, HYBRID_CANDIDATES)
    dense = top_k_indices(queries, candidates, depth)
    lexical_hits = [lexical.search(text, depth) for text in texts]  # (scores, ids) per query
    lexical_top = np.stack([_pad(ids, depth) for _, ids in lexical_hits])
    fused = {HYBRID_LABEL: (1.0, 1.0), HYBRID_LEXICAL2_LABEL: (1.0, 2.0)}
    rows = {DENSE_LABEL: ranked_metrics(dense, relevant, keys, k),
            LEXICAL_LABEL: ranked_metrics(lexical_top, relevant, keys, k)}
    for label, weights in fused.items():
        hybrid = [_pad(reciprocal_rank_fusion([dense[row], lexical_top[row][lexical_top[row] >= 0]], weights)[0], k)
                  for row in range(len(texts))]
        rows[label] = ranked_metrics(np.stack(hybrid), relevant, keys, k)
    dense_scores = np.einsum("ad,akd->ak", queries, candidates[dense])
    weighted = [_pad(weighted_score_fusion([(dense[row], dense_scores[row]), lexical_hits[row][::-1]],
                                           (1.0, 1.0))[0], k) for row in range(len(texts))]
    rows[HYBRID_WEIGHTED_LABEL] = ranked_metrics(np.stack(weighted), relevant, keys, k)
    rows[CEILING_LABEL] = ceiling_metrics(relevant, keys, k)
    return rows


def ceiling_metrics(relevant: np.ndarray, keys: np.ndarray, k: int = 10) -> dict[str, float]:
    """Precision@k and nDCG@k of the ideal ranking (every relevant candidate first): the most any
    ranking can score on these judgements (``relevant bool (g, m)``, ``keys int64 (a,)``)."""
    ideal = np.stack([_pad(np.flatnonzero(relevant[key]), k) for key in keys])
    return ranked_metrics(ideal, relevant, keys, k)
