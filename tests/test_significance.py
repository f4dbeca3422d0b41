"""Paired comparisons between evaluation rows (engine.evaluation.significance), hand-checked values
and the per-query metrics behind them, on toy rankings and on a real pool through a tiny model."""
from __future__ import annotations

import json

import numpy as np
import pytest

from engine.catalog import read_catalog
from engine.cli import main as cli_main
from engine.evaluation.evaluate import build_pool, evaluate_models
from engine.evaluation.ranking_metrics import (attribute_metrics, attribute_per_query, instance_metrics,
                                              instance_per_query, rank_of_targets)
from engine.evaluation.significance import (AVERAGE, FUSED, M_SCENARIOS, compare_rows, comparisons_markdown,
                                           paired_comparison)
from tests.tiny_models import make_tiny_model


def test_sign_test_is_the_exact_binomial_on_the_queries_that_differ():
    a = np.r_[np.ones(10), np.zeros(5)]
    c = paired_comparison(a, np.zeros(15))
    assert (c.wins, c.losses, c.queries) == (10, 0, 15)
    assert c.p_sign == pytest.approx(2 / 2 ** 10)  # both tails of 10 of 10
    assert c.diff == pytest.approx(10 / 15) and c.mean_b == 0.0
    assert 0.0 < c.ci_low <= c.diff <= c.ci_high <= 1.0  # every resample has a >= 0 difference, most > 0
    # one query each way and one more for b: no evidence either way
    c = paired_comparison(np.r_[1.0, 0.0, 0.0, 1.0], np.r_[0.0, 1.0, 1.0, 1.0])
    assert (c.wins, c.losses, c.p_sign) == (1, 2, 1.0)
    assert c.ci_low < 0.0 < c.ci_high


def test_equal_rows_and_fractional_values():
    c = paired_comparison(np.ones(3), np.ones(3))
    assert (c.wins, c.losses, c.p_sign, c.diff, c.ci_low, c.ci_high) == (0, 0, 1.0, 0.0, 0.0, 0.0)
    # a tie shared by two candidates scores 0.5: a half counts as a win over 0, a loss against 1
    c = paired_comparison(np.r_[0.5, 0.5], np.r_[0.0, 1.0])
    assert (c.wins, c.losses) == (1, 1)


def test_the_interval_is_seeded_and_narrows_with_more_queries():
    rng = np.random.default_rng(3)
    a, b = rng.random(400), rng.random(400)
    first, again = paired_comparison(a, b, seed=7), paired_comparison(a, b, seed=7)
    assert first == again
    small = paired_comparison(a[:40], b[:40], seed=7)
    assert (first.ci_high - first.ci_low) < (small.ci_high - small.ci_low)


@pytest.mark.parametrize("a, b, message", [
    (np.ones(3), np.ones(4), "one length"),
    (np.ones((2, 2)), np.ones((2, 2)), "1-d"),
    (np.ones(0), np.ones(0), "at least one query"),
    (np.r_[1.0, np.nan], np.ones(2), "finite"),
])
def test_bad_inputs_say_what_is_wrong(a, b, message):
    with pytest.raises(ValueError, match=message):
        paired_comparison(a, b)


def test_per_query_values_average_to_the_published_metrics():
    rng = np.random.default_rng(0)
    cand = rng.normal(size=(60, 8)).astype(np.float32)
    cand[7] = cand[3]  # an exact tie: fractional recall
    queries = cand + rng.normal(scale=0.8, size=cand.shape).astype(np.float32)
    ranks, tied = rank_of_targets(queries, cand, np.arange(60), with_ties=True)
    per = instance_per_query(ranks, tied)
    assert {k: float(v.mean()) for k, v in per.items()} == instance_metrics(ranks, tied)
    assert per["recall@1"][3] in (0.0, 0.5) and per["recall@1"].shape == (60,)
    groups = rng.integers(0, 5, size=60)
    q_groups, exclude = groups[:12], np.arange(12)
    per = attribute_per_query(queries[:12], cand, q_groups, groups, exclude)
    assert {k: float(v.mean()) for k, v in per.items()} == attribute_metrics(queries[:12], cand, q_groups, groups,
                                                                           exclude)


def test_fused_against_average_on_a_real_pool(fashion_dir, tiny_backbone_dir, tmp_path):
    model = make_tiny_model(tiny_backbone_dir)
    products = read_catalog(str(fashion_dir), limit=120).products
    pool = build_pool(products, model.backbones, str(tmp_path), progress=False)
    result = evaluate_models({"trained": model}, pool, {FUSED: ("trained", "fused"), AVERAGE: ("trained", "average")})
    table = compare_rows(result["per_query"], FUSED, AVERAGE, M_SCENARIOS)
    assert set(table) == set(M_SCENARIOS)
    for s in M_SCENARIOS:
        r1, nd = table[s]["recall@1"], table[s]["ndcg@10"]
        assert r1["queries"] == len(pool.products) and nd["queries"] == len(pool.query_phrases)
        assert r1["mean_a"] == pytest.approx(result["rows"][FUSED][s]["recall@1"])
        assert r1["mean_b"] == pytest.approx(result["rows"][AVERAGE][s]["recall@1"])
        assert nd["ci_low"] <= nd["diff"] <= nd["ci_high"]
    md = comparisons_markdown({"fused against average": table})
    assert "| i2m | recall@1 |" in md and "Paired comparison: fused against average" in md


def test_eval_cli_writes_the_comparisons(fashion_dir, tiny_model_dir, tmp_path):
    out, md = tmp_path / "results.json", tmp_path / "results.md"
    rc = cli_main(["eval", "--model", str(tiny_model_dir), "--catalog", str(fashion_dir), "--limit", "300",
                   "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--markdown", str(md), "--quiet"])
    assert rc == 0
    report = json.loads(out.read_text())
    title = "trained (fused) against the average of its own views"
    assert set(report["comparisons"][title]) == set(M_SCENARIOS)
    i2m = report["comparisons"][title]["i2m"]["recall@1"]
    assert i2m["mean_a"] == pytest.approx(report["rows"][FUSED]["i2m"]["recall@1"])
    assert i2m["wins"] + i2m["losses"] <= i2m["queries"] == report["pool_size"]
    assert f"Paired comparison: {title}" in md.read_text()
    # without the ablation rows there is nothing to pair the fused row with
    rc = cli_main(["eval", "--model", str(tiny_model_dir), "--catalog", str(fashion_dir), "--limit", "300",
                   "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--quiet", "--no-ablation"])
    assert rc == 0 and title not in json.loads(out.read_text())["comparisons"]
