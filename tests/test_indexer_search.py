"""indexer.search / version / publish / manifest on a real faiss IVF-PQ index and a real LMDB.

The item vectors are synthetic clustered unit vectors (input data, not a model); the
pipeline with a real tiny model is in test_indexer_pipeline.py.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import replace

import numpy as np
import pytest

from indexer.errors import BuildError, IndexIntegrityError, NoCurrentVersionError, SearchArgumentError
from indexer.publish import (CURRENT, build_lock, cleanup_stale, list_versions, new_version_id, prune_versions,
                             publish_version, read_current, tmp_dir)
from indexer.search import open_index
from indexer.shards import shard_of
from indexer.version import VersionOptions, write_version

N, D = 3000, 32
COLOURS = ["Black", "Blue", "Red", "White"]


def _vectors(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, D))
    x = centres[rng.integers(0, 40, N)] + 0.6 * rng.standard_normal((N, D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _records() -> list[dict]:
    return [{"product_id": f"sku-{i}", "title": f"product {i}", "image": None,
             "attributes": {"baseColour": COLOURS[i % 4], "gender": "Women" if i % 3 == 0 else "Men"},
             "extra": {"price": i}, "row": i + 2, "flags": []} for i in range(N)]


def _publish(root, vectors, options=None):
    version = new_version_id()
    staged = tmp_dir(root) / f"stage-{version}"
    write_version(staged, version, vectors, _records(), options or VersionOptions(n_shards=2, factory="IVF16,PQ8"),
                  log=lambda _m: None)
    return publish_version(root, staged, version)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("index-root")
    vectors = _vectors()
    path = _publish(root, vectors)
    return root, path, vectors


def test_manifest_describes_the_build(built):
    root, path, _ = built
    m = json.loads((path / "manifest.json").read_text())
    assert m["dim"] == D and m["metric"] == "inner_product"
    assert m["index"]["factory_requested"] == "IVF16,PQ8"
    assert m["index"]["factory"] == "IVF16,PQ8x6"          # 3000 < 39 * 256: PQ bits lowered, and said so
    assert any("PQ bits lowered" in note for note in m["index"]["notes"])
    assert sum(s["items"] for s in m["shards"]) == N and len(m["shards"]) == 2
    assert m["counts"] == {"read": N, "indexed": N, "rejected": 0}
    assert m["recall"]["recall_at_10"] >= 0.9 and 0 <= m["recall"]["recall_at_10_no_refine"] <= 1
    assert set(m["files"]) >= {"shard_000.faiss", "shard_001.faiss", "vectors.f16.npy", "metadata.lmdb"}
    assert read_current(root) == m["version"]


def test_search_shapes_order_and_self_retrieval(built):
    root, path, vectors = built
    with open_index(root) as index:
        assert index.path == path and index.dim == D and index.n_items == N
        q = vectors[:200]
        scores, pids = index.search(q, k=10)
        assert scores.shape == (200, 10) and scores.dtype == np.float32 and len(pids) == 200
        assert all(len(row) == 10 for row in pids)
        assert np.all(np.diff(scores, axis=1) <= 1e-6)
        assert sum(row[0] == f"sku-{i}" for i, row in enumerate(pids)) >= 198
        one_s, one_p = index.search(vectors[5], k=3)        # a (d,) vector is one query
        assert one_s.shape == (1, 3) and one_p[0][0] == "sku-5"


def test_refined_scores_are_exact_inner_products(built):
    root, _, vectors = built
    with open_index(root) as index:
        q = vectors[300:340] + 0.3 * np.random.default_rng(1).standard_normal((40, D)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        scores, ids = index.search_ids(q, k=10, nprobe=index.nlist, refine=True, k_factor=N)
        stored = index.vectors(np.arange(N))                  # the fp16 vectors, as float32
        exact = q @ stored.T
        np.testing.assert_allclose(scores, np.take_along_axis(exact, ids, axis=1), rtol=0, atol=1e-5)
        truth = np.argsort(-exact, axis=1, kind="stable")[:, :10]
        # every list probed and every item a candidate: the exact top 10 (up to ties)
        np.testing.assert_allclose(scores, np.take_along_axis(exact, truth, axis=1), rtol=0, atol=1e-5)
        _, plain = index.search_ids(q, k=10, nprobe=index.nlist, refine=False)
        assert plain.shape == (40, 10) and (plain >= 0).all()


def test_padding_when_fewer_than_k(built):
    root, _, vectors = built
    with open_index(root) as index:
        scores, pids = index.search(vectors[:2], k=N + 5, nprobe=index.nlist)
        assert np.isneginf(scores[:, -5:]).all() and all(p is None for p in pids[0][-5:])
        assert len(set(pids[0][:N])) == N
        s, p = index.search(vectors[:1], k=4, id_filter=["sku-1", "sku-2", "nope"])
        assert sorted(p[0][:2]) == ["sku-1", "sku-2"] and p[0][2:] == [None, None] and np.isneginf(s[0, 2:]).all()


@pytest.mark.parametrize("exact_filter_max", [20_000, 0])  # exact path and faiss IDSelector path
def test_facet_filtered_search(built, exact_filter_max):
    root, _, vectors = built
    with open_index(root) as index:
        index.exact_filter_max = exact_filter_max
        allowed = index.ids_with({"gender": "Women", "baseColour": ["Red", "Black"]})
        expected = {i for i in range(N) if i % 3 == 0 and COLOURS[i % 4] in ("Red", "Black")}
        assert set(allowed.tolist()) == expected
        _, pids = index.search(vectors[:20], k=10, allowed=allowed, nprobe=index.nlist)
        for row in pids:
            assert all(p is not None and int(p.split("-")[1]) in expected for p in row)
        assert set(index.facet_values()["baseColour"]) == set(COLOURS)


def test_predicate_filter_overfetches(built):
    root, _, vectors = built
    with open_index(root) as index:
        _, pids = index.search(vectors[:5], k=10, id_filter=lambda pid: pid.endswith("7"))
        for row in pids:
            assert len(row) == 10 and all(p is not None and p.endswith("7") for p in row)


def test_get_products_and_shard_in_record(built):
    root, _, _ = built
    with open_index(root) as index:
        rec, missing, none = index.get_products(["sku-42", "no-such-id", None])
        assert rec["title"] == "product 42" and rec["attributes"]["baseColour"] == COLOURS[42 % 4]
        assert rec["extra"] == {"price": 42} and rec["shard"] == shard_of("sku-42", 2)
        assert missing is None and none is None


@pytest.mark.parametrize("bad", [
    dict(queries=np.zeros((2, D + 1), np.float32), k=5),
    dict(queries=np.zeros((0, D), np.float32), k=5),
    dict(queries=np.full((1, D), np.nan, np.float32), k=5),
    dict(queries=np.zeros((1, D), np.int64), k=5),
    dict(queries=np.zeros((1, D), np.float32), k=0),
    dict(queries=np.zeros((1, D), np.float32), k=10**6),
    dict(queries=np.zeros((1, D), np.float32), k=5, nprobe=0),
    dict(queries=np.zeros((1, D), np.float32), k=5, id_filter="sku-1"),
])
def test_bad_search_arguments(built, bad):
    root, _, _ = built
    with open_index(root) as index, pytest.raises(SearchArgumentError):
        index.search(**bad)


def _copy_version(built, tmp_path):
    _, path, _ = built
    copy = tmp_path / "v"
    shutil.copytree(path, copy)
    return copy


def test_corrupted_shard_is_refused_on_open(built, tmp_path):
    copy = _copy_version(built, tmp_path)
    shard = copy / "shard_001.faiss"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF                               # one flipped byte, same size
    shard.write_bytes(bytes(data))
    with pytest.raises(IndexIntegrityError, match=r"shard_001\.faiss: sha256 .* \(corrupted file\)"):
        open_index(copy)


def test_truncated_vectors_are_refused_on_open(built, tmp_path):
    copy = _copy_version(built, tmp_path)
    with open(copy / "vectors.f16.npy", "r+b") as fh:
        fh.truncate(1000)
    with pytest.raises(IndexIntegrityError, match=r"vectors\.f16\.npy: size 1000 bytes"):
        open_index(copy, verify=False)


def test_missing_current(tmp_path):
    (tmp_path / "versions").mkdir()
    with pytest.raises(NoCurrentVersionError, match="no index version published"):
        open_index(tmp_path)
    (tmp_path / CURRENT).write_text("gone\n")
    with pytest.raises(NoCurrentVersionError, match="'gone'"):
        open_index(tmp_path)


def test_keep_last_k_and_cleanup(tmp_path):
    root = tmp_path / "root"
    vectors = _vectors(1)[:500]
    opts = VersionOptions(n_shards=1, factory="auto", recall_queries=50)
    names = []
    for _ in range(3):
        version = new_version_id()
        staged = tmp_dir(root) / f"stage-{version}"
        write_version(staged, version, vectors, _records()[:500], opts, log=lambda _m: None)
        publish_version(root, staged, version)
        names.append(version)
    assert list_versions(root) == sorted(names) and read_current(root) == names[-1]
    assert prune_versions(root, keep_last=2) == [names[0]]
    assert list_versions(root) == names[1:]
    (tmp_dir(root) / "build-stale" / "chunks").mkdir(parents=True)
    (tmp_dir(root) / "CURRENT.tmp").write_text("x")
    assert sorted(cleanup_stale(root, keep={"build-keep"})) == ["CURRENT.tmp", "build-stale"]
    with build_lock(root):
        with pytest.raises(BuildError, match="another index build is running"):
            with build_lock(root):
                pass
    with open_index(root) as index:
        assert index.version == names[-1] and index.n_items == 500
    assert os.listdir(tmp_dir(root)) == []


def test_forked_child_does_not_keep_the_build_lock(tmp_path):
    root = tmp_path / "root"
    with build_lock(root):
        pid = os.fork()
        if pid == 0:                       # a DataLoader-worker-like child that outlives the build
            time.sleep(20)
            os._exit(0)
    try:
        deadline = time.monotonic() + 5    # the child closes its copy right after the fork
        while True:
            try:
                with build_lock(root):     # the parent released it; the live child must not hold it
                    break
            except BuildError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        assert os.waitpid(pid, os.WNOHANG) == (0, 0)   # the child is still alive
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


def test_nprobe_is_chosen_on_query_tower_vectors_too(tmp_path):
    # Queries off the item clusters (as the query tower's are) need more lists probed than the
    # items themselves; the build takes the smallest nprobe that serves both sets.
    vectors = _vectors(seed=3)
    rng = np.random.default_rng(4)
    off = vectors[:200] + 1.2 * rng.standard_normal((200, D)).astype(np.float32) / np.sqrt(D)
    off /= np.linalg.norm(off, axis=1, keepdims=True)
    options = VersionOptions(factory="IVF64,PQ8", recall_queries=300, target_recall=0.95)
    items_only = write_version(tmp_path / "a", "a", vectors, _records(), options, log=lambda _m: None).manifest
    both = write_version(tmp_path / "b", "b", vectors, _records(), options, log=lambda _m: None,
                         query_vectors=off).manifest
    assert "recall_at_10_query_tower" not in items_only["recall"]
    assert both["recall"]["query_tower_queries"] == 200
    chosen = both["index"]["nprobe_default"]
    assert chosen > items_only["index"]["nprobe_default"]  # seeded: 4 against 2
    by_q = both["recall"]["recall_at_10_query_tower_by_nprobe"]
    assert both["recall"]["recall_at_10_query_tower"] == by_q[str(chosen)]
    # the smallest nprobe reaching the target on both sets: every smaller candidate misses on one
    reached = both["recall"]["recall_at_10_query_tower"] >= 0.95 and both["recall"]["recall_at_10"] >= 0.95
    if reached:
        for p in map(int, by_q):
            if p < chosen:
                assert min(by_q[str(p)], both["recall"]["recall_at_10_by_nprobe_refined"][str(p)]) < 0.95


def test_each_query_kind_must_reach_the_target_on_its_own(tmp_path):
    # A pooled sample lets many easy queries hide a kind that misses (indexer/query_sample.py):
    # the build measures each kind apart and takes the nprobe that serves every one.
    vectors = _vectors(seed=3)
    rng = np.random.default_rng(4)
    off = vectors[:200] + 1.2 * rng.standard_normal((200, D)).astype(np.float32) / np.sqrt(D)
    off /= np.linalg.norm(off, axis=1, keepdims=True)
    near = vectors[300:1900]
    options = VersionOptions(factory="IVF64,PQ8", recall_queries=300, target_recall=0.95)
    pooled = write_version(tmp_path / "a", "a", vectors, _records(), options, log=lambda _m: None,
                           query_vectors=np.concatenate([near, off])).manifest
    per_kind = write_version(tmp_path / "b", "b", vectors, _records(), options, log=lambda _m: None,
                             query_vectors={"typed text": near, "photo + modifier": off}).manifest
    by_kind = per_kind["recall"]["recall_at_10_query_tower_by_kind"]
    assert set(by_kind) == {"typed text", "photo + modifier"}
    assert per_kind["recall"]["query_tower_queries"] == len(near) + 200
    assert pooled["recall"]["recall_at_10_query_tower_by_kind"] == {"all": pooled["recall"]["recall_at_10_query_tower"]}
    assert per_kind["index"]["nprobe_default"] > pooled["index"]["nprobe_default"]  # seeded
    assert min(by_kind.values()) >= 0.95
    tried = per_kind["recall"]["recall_at_10_query_tower_by_kind_by_nprobe"]
    chosen = per_kind["index"]["nprobe_default"]
    assert tried[str(chosen)] == by_kind
    assert all(min(r.values()) < 0.95 for p, r in tried.items() if int(p) < chosen)
    # each kind of Search request gets the smallest nprobe its own queries need: text queries
    # (the typed-text sample) need fewer lists than photo + modifier queries (text+image)
    per_request = per_kind["index"]["nprobe_by_query_kind"]
    text_nprobe = min(int(p) for p, r in tried.items() if r["typed text"] >= 0.95)
    assert per_request["text"] == text_nprobe and text_nprobe < chosen
    # a photo + modifier query is a text+image request: it aims at the photo target (0.99)
    photo_reached = [int(p) for p, r in tried.items() if r["photo + modifier"] >= 0.99]
    assert set(per_request) == {"text", "text+image"} and per_request["text+image"] >= chosen
    if photo_reached:
        assert per_request["text+image"] == min(photo_reached)
    assert "nprobe_by_query_kind" not in pooled["index"]  # a pooled sample stands for no kind
    fixed = write_version(tmp_path / "c", "c", vectors, _records(), replace(options, nprobe=4), log=lambda _m: None,
                          query_vectors={"typed text": near}).manifest
    assert fixed["index"]["nprobe_default"] == 4 and "nprobe_by_query_kind" not in fixed["index"]


def test_requests_carrying_a_photo_aim_at_the_photo_target(tmp_path):
    # The same query vectors stand for a typed-text and an augmented-photo sample: only the target
    # differs (indexer/nprobe_choice.py), so the image request probes more lists than the text one,
    # the sweep goes past the default nprobe for it, and both get what their own target needs.
    vectors = _vectors(seed=3)
    rng = np.random.default_rng(4)
    off = vectors[:300] + 1.2 * rng.standard_normal((300, D)).astype(np.float32) / np.sqrt(D)
    off /= np.linalg.norm(off, axis=1, keepdims=True)
    kinds = {"typed text": off, "augmented photo": off.copy()}
    options = VersionOptions(factory="IVF64,PQ8", recall_queries=300, target_recall=0.95)
    strict = write_version(tmp_path / "a", "a", vectors, _records(), options, log=lambda _m: None,
                           query_vectors=kinds).manifest
    tried = strict["recall"]["recall_at_10_query_tower_by_kind_by_nprobe"]
    per_request = strict["index"]["nprobe_by_query_kind"]
    assert strict["recall"]["photo_target_recall"] == 0.99
    text = min(int(p) for p, r in tried.items() if r["typed text"] >= 0.95)
    image = min(int(p) for p, r in tried.items() if r["augmented photo"] >= 0.99)
    assert per_request == {"text": text, "image": image} and image > text  # seeded
    assert strict["index"]["nprobe_default"] == text < image and str(image) in tried
    same = write_version(tmp_path / "b", "b", vectors, _records(), replace(options, photo_target_recall=0.95),
                         log=lambda _m: None, query_vectors=kinds).manifest
    assert same["index"]["nprobe_by_query_kind"] == {"text": text, "image": text}
    assert max(map(int, same["recall"]["recall_at_10_query_tower_by_kind_by_nprobe"])) == text  # no sweep past it
