"""The refine depth chosen at build time (indexer.refine_depth): real faiss IVF-PQ versions of
clustered vectors, their recall against exact search, and the manifest the server reads."""
from __future__ import annotations

import json

import numpy as np
import pytest

from indexer.recall import exact_search, recall_at_k
from indexer.refine_depth import K_FACTOR_CANDIDATES, K_FACTOR_MAX, K_FACTOR_TOLERANCE, choose_k_factor
from indexer.search import open_index
from indexer.version import VersionOptions, write_version

D = 32


def _vectors(n: int, seed: int, spread: float = 0.6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, D))
    x = centres[rng.integers(0, 40, n)] + spread * rng.standard_normal((n, D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _build(folder, factory: str, k_factor: int | None = None, n: int = 3000):
    vectors = _vectors(n, 0)
    records = [{"product_id": f"sku-{i}"} for i in range(n)]
    lines: list[str] = []
    result = write_version(folder, "v1", vectors, records,
                           VersionOptions(n_shards=2, factory=factory, nprobe=4, k_factor=k_factor,
                                          recall_queries=300),
                           log=lines.append)
    return result.manifest, vectors, lines


def test_exact_codes_need_the_shallowest_refine(tmp_path):
    # IVF,Flat codes are exact: every depth finds the same top 10, so the first candidate wins
    manifest, _, lines = _build(tmp_path / "flat", "IVF16,Flat")
    assert manifest["refine"]["k_factor"] == K_FACTOR_CANDIDATES[0]
    by_depth = manifest["recall"]["recall_at_10_by_k_factor"]
    assert set(by_depth) == {str(K_FACTOR_CANDIDATES[0]), str(K_FACTOR_MAX)}
    assert by_depth[str(K_FACTOR_CANDIDATES[0])] == by_depth[str(K_FACTOR_MAX)]
    assert any(f"refine k_factor {K_FACTOR_CANDIDATES[0]}" in line for line in lines)
    on_disk = json.loads((tmp_path / "flat" / "manifest.json").read_text())
    with open_index(tmp_path / "flat") as index:
        assert index.k_factor_default == on_disk["refine"]["k_factor"] == K_FACTOR_CANDIDATES[0]


def test_coarse_codes_get_a_deeper_refine_that_keeps_the_recall(tmp_path):
    # PQ2x4 on 32-d keeps little of a vector: a shallow refine misses true neighbours
    manifest, vectors, _ = _build(tmp_path / "pq", "IVF16,PQ2x4")
    chosen = manifest["refine"]["k_factor"]
    by_depth = {int(f): r for f, r in manifest["recall"]["recall_at_10_by_k_factor"].items()}
    assert chosen > K_FACTOR_CANDIDATES[0]
    assert by_depth[K_FACTOR_CANDIDATES[0]] < by_depth[K_FACTOR_MAX] - K_FACTOR_TOLERANCE  # shallow loses recall
    assert by_depth[chosen] >= by_depth[K_FACTOR_MAX] - K_FACTOR_TOLERANCE
    queries = _vectors(200, 1)
    truth = exact_search(vectors, queries, 10)[1]
    with open_index(tmp_path / "pq") as index:  # the served default searches at that depth
        served = recall_at_k(index.search_ids(queries, 10)[1], truth, 10)
        deepest = recall_at_k(index.search_ids(queries, 10, k_factor=K_FACTOR_MAX)[1], truth, 10)
        shallow = recall_at_k(index.search_ids(queries, 10, k_factor=K_FACTOR_CANDIDATES[0])[1], truth, 10)
    assert served >= deepest - 0.02 and served > shallow


def test_a_given_k_factor_is_kept(tmp_path):
    manifest, _, _ = _build(tmp_path / "fixed", "IVF16,Flat", k_factor=7)
    assert manifest["refine"]["k_factor"] == 7
    assert manifest["recall"]["recall_at_10_by_k_factor"] == {}


def test_candidates_must_be_positive(tmp_path):
    _build(tmp_path / "v", "IVF16,Flat", k_factor=3)
    with open_index(tmp_path / "v") as index:
        with pytest.raises(ValueError, match="candidates must be >= 1"):
            choose_k_factor(index, {}, [4], 10, candidates=[0, 5])
        with pytest.raises(ValueError, match="candidates must be >= 1"):
            choose_k_factor(index, {}, [4], 10, candidates=[])
