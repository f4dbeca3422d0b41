"""engine.evaluation.ranking_metrics against hand-computed values on toy rankings."""
from __future__ import annotations

import math

import numpy as np
import pytest

from engine.evaluation.ranking_metrics import (
    attribute_metrics, instance_metrics, ndcg_at_k, precision_at_k, rank_of_targets, top_k_indices,
)


def test_ranks_recall_and_mrr_on_a_toy_ranking():
    # 3 candidates on the unit circle-ish; scores are easy to read by hand
    candidates = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]], dtype=np.float32)
    queries = np.array([[1.0, 0.1], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    targets = np.array([0, 1, 2])
    # q0 scores: 1.0, 0.1, 0.77 -> target 0 rank 1
    # q1 scores: 1.0, 0.0, 0.7  -> target 1 rank 3
    # q2 scores: 0.0, 1.0, 0.7  -> target 2 rank 2
    ranks = rank_of_targets(queries, candidates, targets, chunk=2)
    assert ranks.tolist() == [1, 3, 2]
    m = instance_metrics(ranks, ks=(1, 2, 3))
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@2"] == pytest.approx(2 / 3)
    assert m["recall@3"] == pytest.approx(1.0)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)


def test_ties_count_against_the_target():
    candidates = np.ones((4, 2), dtype=np.float32)
    ranks = rank_of_targets(np.ones((1, 2), dtype=np.float32), candidates, np.array([2]))
    assert ranks.tolist() == [4]


def test_tied_candidates_share_the_ranks_they_tie_for():
    # q0: all four candidates tie (a constant model): the target is at rank 1..4 with equal chance.
    # q1: candidate 0 scores above the target (2), candidate 1 ties with it: rank 2 or 3.
    candidates = np.array([[2.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    queries = np.array([[0.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    ranks, tied = rank_of_targets(queries, candidates, np.array([2, 2]), chunk=1, with_ties=True)
    assert ranks.tolist() == [4, 3] and tied.tolist() == [3, 1]
    m = instance_metrics(ranks, tied, ks=(1, 2, 3))
    assert m["recall@1"] == pytest.approx((1 / 4 + 0) / 2)
    assert m["recall@2"] == pytest.approx((2 / 4 + 1 / 2) / 2)
    assert m["recall@3"] == pytest.approx((3 / 4 + 1) / 2)
    assert m["mrr"] == pytest.approx(((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4 + (1 / 2 + 1 / 3) / 2) / 2)
    # without ties the expectation is the plain metric
    plain = instance_metrics(np.array([1, 3, 2]), np.zeros(3, dtype=np.int64), ks=(1, 2))
    assert plain == instance_metrics(np.array([1, 3, 2]), ks=(1, 2))


def test_ndcg_and_precision_hand_computed():
    rel = np.array([[True, False, True, False], [False, False, False, False]])
    # q0: DCG = 1/log2(2) + 1/log2(4) = 1.5 ; 3 relevant in pool -> IDCG@4 = 1 + 1/log2(3) + 1/2
    idcg = 1 + 1 / math.log2(3) + 0.5
    got = ndcg_at_k(rel, np.array([3, 0]), k=4)
    assert got[0] == pytest.approx(1.5 / idcg)
    assert got[1] == 0.0
    assert precision_at_k(rel, k=4).tolist() == [0.5, 0.0]


def test_top_k_with_exclusion():
    candidates = np.array([[1.0], [0.5], [0.2], [0.9]], dtype=np.float32)
    q = np.array([[1.0], [1.0]], dtype=np.float32)
    top = top_k_indices(q, candidates, 2, exclude=np.array([0, -1]))
    assert top.tolist() == [[3, 1], [0, 3]]


def test_attribute_metrics_hand_computed():
    # pool: groups 7,7,8,7 ; scores for the single query (group 7): 0.9, 0.1, 0.8, 0.5
    candidates = np.array([[0.9], [0.1], [0.8], [0.5]], dtype=np.float32)
    q = np.array([[1.0]], dtype=np.float32)
    cg = np.array([7, 7, 8, 7])
    m = attribute_metrics(q, candidates, np.array([7]), cg, k=2)
    # top-2: cand 0 (rel), cand 2 (not) -> DCG = 1 ; 3 relevant -> IDCG@2 = 1 + 1/log2(3)
    assert m["ndcg@2"] == pytest.approx(1 / (1 + 1 / math.log2(3)))
    assert m["precision@2"] == pytest.approx(0.5)
    # excluding candidate 0: top-2 = 2 (not), 3 (rel) -> DCG = 1/log2(3); 2 relevant left
    m = attribute_metrics(q, candidates, np.array([7]), cg, exclude=np.array([0]), k=2)
    assert m["ndcg@2"] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    with pytest.raises(ValueError):
        instance_metrics(np.array([], dtype=np.int64))
