"""Photo-only queries in two stages (engine/retrieval/instance_first.py): the merge, the exact
scores the evaluation ranks by, the model's columns, and the served row of the nine scenarios."""
from __future__ import annotations

import numpy as np
import pytest

from engine.catalog import read_catalog
from engine.evaluation.evaluate import SERVED_FORM, build_pool, embed_pool, score_per_query
from engine.evaluation.ranking_metrics import rank_of_targets, top_k_indices
from engine.retrieval.instance_first import (instance_columns, instance_first_scores, merge_instance_first,
                                             without_instance)
from tests.test_private_block import _with_block
from tests.tiny_models import make_tiny_model


def test_without_instance_zeroes_the_block_and_renormalises():
    v = np.array([[3.0, 4.0, 5.0, 5.0], [0.0, 0.0, 1.0, 0.0]], dtype=np.float32)
    out = without_instance(v, (2, 4))
    np.testing.assert_allclose(out, [[0.6, 0.8, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], atol=1e-7)
    assert out.dtype == np.float32 and v[0, 2] == 5.0  # a copy
    for bad in ((0, 4), (2, 5), (3, 3), (-1, 2)):
        with pytest.raises(ValueError, match="instance columns"):
            without_instance(v, bad)


def test_merge_puts_the_instance_hits_first_once_and_keeps_depth():
    first_ids, first_scores = np.array([7, 3, -1]), np.array([0.9, 0.8, -1.0], np.float32)
    rest_ids, rest_scores = np.array([3, 5, 7, 1, 2, -1]), np.array([0.7, 0.6, 0.5, 0.4, 0.3, 0.0], np.float32)
    ids, scores = merge_instance_first(first_ids, first_scores, rest_ids, rest_scores, 1, 4)
    assert ids.tolist() == [7, 3, 5, 1] and scores.tolist() == pytest.approx([0.9, 0.7, 0.6, 0.4])
    ids, _ = merge_instance_first(first_ids, first_scores, rest_ids, rest_scores, 2, 10)
    assert ids.tolist() == [7, 3, 5, 1, 2]  # no id twice, no -1
    ids, _ = merge_instance_first(first_ids, first_scores, rest_ids, rest_scores, 0, 3)
    assert ids.tolist() == [3, 5, 7]  # n = 0: the similar stage alone
    # the similar stage searched to depth always fills depth: at most n of its hits are dropped
    ids, _ = merge_instance_first(np.array([9]), np.array([1.0]), np.arange(5), np.zeros(5), 1, 5)
    assert ids.tolist() == [9, 0, 1, 2, 3]
    with pytest.raises(ValueError, match=">= 0"):
        merge_instance_first(first_ids, first_scores, rest_ids, rest_scores, -1, 3)


def test_scores_order_the_two_stages_and_keep_ties_against_the_target():
    full = np.array([[0.2, 0.9, 0.5, 0.9], [0.1, 0.3, 0.8, 0.2]])
    part = np.array([[0.7, 0.1, 0.6, 0.0], [0.5, 0.4, 0.3, 0.9]])
    s = instance_first_scores(full, part, 1)
    # row 0: two candidates tie at the best whole-vector score: both lead, still tied
    assert np.argsort(-s[0], kind="stable").tolist() == [1, 3, 0, 2] and s[0, 1] == s[0, 3]
    assert np.argsort(-s[1], kind="stable").tolist() == [2, 3, 0, 1]
    np.testing.assert_allclose(instance_first_scores(full, part, 0), part)
    with pytest.raises(ValueError, match="one shape"):
        instance_first_scores(full, part[:, :3], 1)


def test_columns_are_the_image_private_block_of_a_model_that_has_one(tiny_backbone_dir):
    assert instance_columns(make_tiny_model(tiny_backbone_dir)) is None  # no block: one stage
    model = _with_block(tiny_backbone_dir)
    assert instance_columns(model) == (32, 40)  # [F (32) | image-private (8)]


def test_served_row_ranks_photo_queries_in_two_stages_and_the_rest_as_fused(fashion_dir, tiny_backbone_dir, tmp_path):
    """The eval's served row against a brute-force two-stage ranking of the same vectors: the same
    rank of each product under its own photo, the same top 10 of each attribute query, and the
    fused row's figures on every scenario whose query has text."""
    model = _with_block(tiny_backbone_dir)
    pool = build_pool(read_catalog(fashion_dir, limit=120).products, model.backbones, str(tmp_path), progress=False)
    emb = embed_pool(model, pool)
    assert emb.instance == (32, 40)
    fused, served = score_per_query(emb, pool, "fused"), score_per_query(emb, pool, SERVED_FORM)
    for s in ("t2t", "t2i", "t2m", "m2t", "m2i", "m2m"):
        for metric, values in fused[s].items():
            np.testing.assert_array_equal(served[s][metric], values)
    q, items = emb.query["V"], emb.item["F"]
    n = len(pool.products)
    rest = without_instance(q, (32, 40))
    ranks = []
    for i in range(n):  # brute force: the whole vector's best, then the rest by the similar stage
        lead = int(np.argmax(q[i] @ items.T))
        order = [lead] + [j for j in np.argsort(-(rest[i] @ items.T), kind="stable") if j != lead]
        ranks.append(order.index(i) + 1)
    ranks = np.array(ranks)
    one_stage = rank_of_targets(q, items, np.arange(n))
    assert np.array_equal(ranks == 1, one_stage == 1)  # the instance stage keeps every rank 1
    np.testing.assert_allclose(served["i2m"]["recall@5"], (ranks <= 5).astype(float))
    np.testing.assert_allclose(served["i2m"]["mrr"], 1.0 / ranks)
    # attribute queries: the representative is left out, then the two stages
    lead = top_k_indices(q[pool.query_reps], items, 1, pool.query_reps)[:, 0]
    for a in range(len(pool.query_reps)):
        expected = [lead[a]] + [j for j in top_k_indices(rest[pool.query_reps[a]][None], items, 11,
                                                         np.array([pool.query_reps[a]]))[0] if j != lead[a]][:9]
        relevant = pool.groups[expected] == pool.query_groups[a]
        assert served["i2m"]["precision@10"][a] == pytest.approx(relevant.mean())
