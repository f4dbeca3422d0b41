"""The Ray executor (indexer.ray_executor) against the local one, on a local Ray cluster
(``ray.init(num_cpus=2)``): 300 real catalogue products with seeded bad rows, tiny random
model, real faiss + LMDB. One encoder actor's worker is killed (os._exit) on its first batch:
Ray restarts it and retries the batch. Skipped, with the reason printed, when Ray is not
installed (``pip install 'ecsearch[ray]'``); the missing-Ray error is tested either way."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from indexer.encode import EncodeOptions
from indexer.pipeline import IndexJobConfig, run_index_job
from indexer.search import open_index
from indexer.version import VersionOptions
from tests.test_indexer_pipeline import _seed_catalogue

REPO = Path(__file__).resolve().parents[1]
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed (pip install 'ecsearch[ray]'): Ray executor tests skipped")


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    from indexer.ray_executor import KILL_ONCE_ENV, start_ray

    marker = tmp_path_factory.mktemp("ray-kill") / "killed-once"
    ray = start_ray(num_cpus=2, extra_env={KILL_ONCE_ENV: str(marker)})
    yield marker
    ray.shutdown()


@pytest.fixture(scope="module")
def both(ray_cluster, fashion_dir, tiny_model_dir, tmp_path_factory):
    """The same job published by the local and by the Ray executor. The local one encodes on
    one torch thread, as each of the two encoder actors does (2 CPUs, 2 actors): fp32 sums split
    over another thread count round differently in the last bit on some kernels (AVX2 BLAS,
    measured under the CPUID shim), which the fp16 vectors can show."""
    catalog, expect = _seed_catalogue(fashion_dir, tmp_path_factory.mktemp("ray-seeded") / "fashion", n_good=300)
    out = {}
    threads = torch.get_num_threads()
    for executor in ("local", "ray"):
        config = IndexJobConfig(catalog=catalog, model_dir=tiny_model_dir, index_root=tmp_path_factory.mktemp(executor),
                                device="cpu", executor=executor,
                                encode=EncodeOptions(batch_size=16, chunk_size=64, workers=1, precision="fp32"),
                                version=VersionOptions(n_shards=2, factory="IVF8,Flat", refine_storage="fp16_mmap"))
        torch.set_num_threads(1 if executor == "local" else threads)
        try:
            out[executor] = run_index_job(config, log=lambda _m: None)
        finally:
            torch.set_num_threads(threads)
    return out, expect, ray_cluster


@needs_ray
def test_ray_version_matches_the_local_one(both):
    results, expect, _ = both
    local, ray_ = results["local"], results["ray"]
    assert ray_.manifest["counts"] == local.manifest["counts"]
    assert ray_.manifest["counts"]["read"] == expect["read"]
    assert ray_.manifest["build"]["executor"]["executor"] == "ray"
    assert local.manifest["build"]["executor"] == {"executor": "local"}
    assert ray_.manifest["refine"]["storage"] == "fp16_mmap"
    with open_index(local.path) as a, open_index(ray_.path) as b:
        ids = np.arange(a.n_items)
        assert b.n_items == a.n_items
        assert a._metadata.product_ids(ids[None, :]) == b._metadata.product_ids(ids[None, :])
        va, vb = a.vectors(ids), b.vectors(ids)
        np.testing.assert_allclose(vb, va, atol=1e-6, rtol=0)
        queries = va[::7]
        sa, pa = a.search(queries, 10)
        sb, pb = b.search(queries, 10)
        assert pa == pb
        np.testing.assert_allclose(sb, sa, atol=1e-6)
        assert a.get_products(pa[0]) == b.get_products(pb[0])


@needs_ray
def test_ray_accounts_corrupt_images_and_survives_a_killed_worker(both):
    results, expect, marker = both
    assert marker.is_file(), "the fault injection did not run"  # an encoder worker was killed once
    local, ray_ = results["local"], results["ray"]
    rejects = {}
    for name, result in results.items():
        rows = [json.loads(line) for line in (result.path / "rejects.jsonl").read_text().splitlines()]
        rejects[name] = sorted((r["row"], r["reason"]) for r in rows)
    assert rejects["ray"] == rejects["local"]
    for row, reason in expect["reject_rows"].items():
        assert any(r == row and reason in why for r, why in rejects["ray"]), (row, reason)
    with open_index(ray_.path) as index:
        corrupt = index.get_products([expect["corrupt"]])[0]
        assert "image_unreadable" in corrupt["flags"] and "text_only" in corrupt["flags"]
    counts = ray_.manifest["counts"]
    assert counts["indexed"] + counts["rejected"] == counts["read"] == local.manifest["counts"]["read"]


def test_executor_ray_without_ray_is_a_clear_error(tmp_path, tiny_model_dir, fashion_dir):
    code = ("import sys; sys.modules['ray'] = None; from engine.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "index", "--catalog", str(fashion_dir), "--model",
                           str(tiny_model_dir), "--index-root", str(tmp_path / "root"), "--executor", "ray"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'ecsearch[ray]'" in proc.stderr
    assert not (tmp_path / "root").exists()
