"""A version built with faiss's 4-bit fast-scan PQ (``--factory "IVF,PQ<m>x4fs"``, the option
docs/serving.md measures): real faiss shards and LMDB, searched like the default IVF-PQ version
(plain, refined, filtered by an attribute, filtered by a predicate, per-request nprobe)."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from indexer.recall import recall_at_k
from indexer.search import open_index
from indexer.version import VersionOptions, write_version
from tests.test_indexer_refine import D, N, _vectors, recall_per_version, red_every_50


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    vectors = _vectors(N, 0)
    records = red_every_50(N)
    folders = {}
    for name, factory in (("fastscan", "IVF,PQ16x4fs"), ("pq8", "IVF,PQ8")):
        folder = tmp_path_factory.mktemp(name)
        write_version(folder, f"v-{name}", vectors, records,
                      VersionOptions(n_shards=2, factory=factory, recall_queries=100, seed=0), log=lambda _m: None)
        folders[name] = folder
    rng = np.random.default_rng(1)
    queries = vectors[rng.integers(0, N, 200)] + 0.3 * rng.standard_normal((200, D)).astype(np.float32)
    return folders, vectors, queries / np.linalg.norm(queries, axis=1, keepdims=True)


def test_the_manifest_records_a_fast_scan_index_and_its_measured_recall(built):
    folders, _, _ = built
    with open_index(folders["fastscan"]) as index:
        assert index.manifest["index"]["factory"].endswith("PQ16x4fs")
        assert index.manifest["recall"]["recall_at_10"] >= 0.9
        assert all(isinstance(faiss.downcast_index(shard), faiss.IndexIVFPQFastScan) for shard in index._shards)


def test_refined_fast_scan_search_is_as_good_as_the_8_bit_pq(built):
    folders, vectors, queries = built
    recall = recall_per_version(folders, vectors, queries)
    # every list probed and a deep re-ranking: the fp16 refine makes it exact
    assert recall_per_version(folders, vectors, queries, nprobe=None, k_factor=50) == {"fastscan": 1.0, "pq8": 1.0}
    # at the nprobe and k_factor each build chose for itself
    assert recall["fastscan"] >= recall["pq8"] - 0.03, recall


def test_filtered_and_predicate_searches_on_fast_scan_shards_are_exact(built):
    folders, vectors, queries = built
    red = np.arange(0, N, 50, dtype=np.int64)
    scores_truth = queries @ vectors[red].astype(np.float16).astype(np.float32).T
    truth = red[np.argsort(-scores_truth, axis=1, kind="stable")[:, :5]]
    with open_index(folders["fastscan"]) as index:
        allowed = index.ids_with({"colour": "Red"})
        np.testing.assert_array_equal(allowed, red)
        _, ids = index.search_ids(queries, 5, allowed=allowed)
        assert recall_at_k(ids, truth, 5) == 1.0
        _, found = index.search(queries[:20], 5, id_filter=lambda pid: int(pid.split("-")[1]) % 50 == 0)
        for row in found:
            assert len(row) == 5 and all(int(pid.split("-")[1]) % 50 == 0 for pid in row)
