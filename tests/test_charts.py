"""The result charts (engine/charts.py, issue 17) drawn from numbers measured here: an ANN
curve over a real faiss index version, gRPC latencies from a real server, ranking metrics
from real rankings; each PNG is read back and must hold a drawn chart."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
from PIL import Image

from engine.charts import latency_percentile_chart, recall_latency_chart, scenario_chart
from tests.test_server_support import index_root, server_model, start_server, subset  # noqa: F401


def _drawn(path) -> Image.Image:
    """The PNG at ``path``, checked to be more than a blank canvas."""
    image = Image.open(path).convert("RGB")
    assert image.width > 300 and image.height > 200
    assert len(image.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20, "the chart looks blank"
    return image


def test_recall_latency_curve_over_nprobe(tmp_path):
    from bench.bench_index import measure, synthetic_vectors
    from indexer.recall import exact_search
    from indexer.version import VersionOptions, write_version

    vectors, queries = synthetic_vectors(4000, 32, 40, 0.6, 100, seed=0)
    _, truth = exact_search(vectors, queries, 10)
    write_version(tmp_path / "version", "bench", vectors, [{"product_id": str(i)} for i in range(len(vectors))],
                  VersionOptions(factory="IVF64,PQ8", recall_queries=100, seed=0))
    rows = measure(tmp_path / "version", queries, truth, [1, 4, 16], 10, [8], latency_queries=20)
    assert len(rows) == 6 and rows[-1]["recall_at_10"] > rows[0]["recall_at_10"]  # more probes, more recall
    _drawn(recall_latency_chart(rows, 10, tmp_path / "curve.png", "synthetic", note="test machine"))
    with pytest.raises(ValueError, match="recall_at_5"):
        recall_latency_chart(rows, 5, tmp_path / "bad.png", "synthetic")


def test_latency_percentiles_per_query_kind(index_root, fashion_dir, tmp_path):
    from bench.bench_grpc import make_queries, run_level

    server = start_server(index_root)
    try:
        server.wait_serving()
        queries = make_queries(fashion_dir, 8)
        results = [{"kind": kind, "concurrency": c, **asyncio.run(run_level(server.target, queries[kind], c, 12, 2))}
                   for kind in ("text", "image") for c in (1, 4)]
    finally:
        server.stop()
    assert all(r["requests"] == 12 and r["p50_ms"] <= r["p99_ms"] for r in results)
    _drawn(latency_percentile_chart(results, tmp_path / "grpc.png", "tiny index"))
    with pytest.raises(ValueError):
        latency_percentile_chart([], tmp_path / "empty.png", "nothing")


def test_scenario_bars_against_baselines(tmp_path):
    from engine.evaluation.ranking_metrics import instance_metrics, rank_of_targets

    rng = np.random.default_rng(0)
    items = rng.standard_normal((300, 16)).astype(np.float32)
    targets = np.arange(100)
    rows = {}
    for label, noise in (("trained (fused)", 0.5), ("baseline", 1.5)):
        rows[label] = {}
        for scenario in ("t2t", "i2i", "m2m"):
            queries = items[:100] + noise * rng.standard_normal((100, 16)).astype(np.float32)
            rows[label][scenario] = instance_metrics(rank_of_targets(queries, items, targets))
    assert rows["trained (fused)"]["t2t"]["recall@10"] > rows["baseline"]["t2t"]["recall@10"]
    _drawn(scenario_chart(rows, "recall@10", tmp_path / "eval.png", "recall@10"))
    with pytest.raises(ValueError, match="ndcg@10"):
        scenario_chart(rows, "ndcg@10", tmp_path / "none.png", "none")


def test_eval_refuses_an_unknown_plot_metric_before_any_work(tmp_path, capsys):
    from engine.cli import main

    status = main(["eval", "--model", str(tmp_path / "no-model"), "--catalog", str(tmp_path),
                   "--plot", str(tmp_path / "eval.png"), "--plot-metric", "accuracy"])
    assert status == 2 and "--plot-metric 'accuracy'" in capsys.readouterr().err
    assert not (tmp_path / "eval.png").exists()
