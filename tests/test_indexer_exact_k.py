"""Exact k (widening), the lexical index inside an index version, and the fusion of rankings,
on a real faiss IVF index, a real LMDB and real bm25s files. Item vectors are synthetic
clustered unit vectors (input data, not a model); the records are the first 2,000 real
fashion products."""
from __future__ import annotations

import json
import shutil

import faiss
import numpy as np
import pytest

from engine.retrieval.fusion import reciprocal_rank_fusion, weighted_score_fusion
from engine.retrieval.lexical import product_text, tokenize
from indexer.errors import IndexIntegrityError
from indexer.lexical import LexicalUnavailableError
from indexer.publish import new_version_id, publish_version, tmp_dir
from indexer.search import open_index
from indexer.version import VersionOptions, write_version
from indexer.widening import ProbeCapacity, refine_k_factor

N, D = 2000, 32


@pytest.fixture(scope="module")
def products(fashion_dir):
    from engine.catalog import read_catalog

    return read_catalog(fashion_dir, limit=N).products


@pytest.fixture(scope="module")
def version_dir(tmp_path_factory, products):
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((30, D))
    x = centres[rng.integers(0, 30, N)] + 0.5 * rng.standard_normal((N, D))
    vectors = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    records = [{"product_id": p.product_id, "title": p.title, "image": p.image, "attributes": p.attributes,
                "extra": p.extra, "row": p.row, "flags": []} for p in products]
    root = tmp_path_factory.mktemp("root")
    version = new_version_id()
    staged = tmp_dir(root) / f"stage-{version}"
    write_version(staged, version, vectors, records, VersionOptions(n_shards=2, factory="IVF32,Flat", nprobe=1,
                                                                  k_factor=50,  # deep: the cap tests need it
                                                                  recall_queries=50, self_queries=100),
                  log=lambda _m: None)
    return publish_version(root, staged, version)


def test_a_short_ivf_search_widens_to_more_lists_then_exact(version_dir):
    with open_index(version_dir) as index:
        q = index.vectors(np.arange(3))
        small = index.search_served(q, 10)
        assert not small.widened.any() and (small.nprobe == 1).all() and (small.ids >= 0).all()
        big = index.search_served(q, 1000)
        assert (big.ids >= 0).all(axis=1).all() and big.widened.all()
        assert all(len(set(row)) == 1000 for row in big.ids.tolist())
        exact = np.sort(q @ index.vectors(np.arange(N)).T, axis=1)[:, ::-1][:, :1000]
        widest = big.exact | (big.nprobe == index.nlist)
        rows = np.flatnonzero(widest)
        np.testing.assert_allclose(big.scores[rows], exact[rows], atol=2e-3)  # every list seen: exact top
        assert np.all(np.diff(big.scores, axis=1) <= 1e-6)
        scores, pids = index.search(q, 1000)  # the plain API widens too
        assert all(None not in row for row in pids)


def test_a_filtered_ivf_search_returns_every_allowed_item(version_dir, products):
    with open_index(version_dir) as index:
        index.exact_filter_max = 0  # force the IVF scan with the id selector (no exact shortcut)
        colour = next(c for c in ("Purple", "Maroon", "Olive", "Orange", "Yellow")
                      if 10 < sum(p.attributes.get("baseColour") == c for p in products) < 50)
        allowed = index.ids_with({"baseColour": colour})
        served = index.search_served(index.vectors(np.arange(2)), 50, nprobe=1, allowed=allowed)
        for row in range(2):
            found = served.ids[row][served.ids[row] >= 0]
            assert sorted(found.tolist()) == allowed.tolist()
        assert served.widened.all()


def test_the_lexical_index_is_in_the_version_and_checksummed(version_dir, products):
    manifest = json.loads((version_dir / "manifest.json").read_text())
    lexical_files = [name for name in manifest["files"] if name.startswith("lexical/")]
    assert lexical_files and manifest["lexical"]["documents"] == N
    assert all(len(manifest["files"][name]["sha256"]) == 64 for name in lexical_files)
    with open_index(version_dir) as index:
        scores, ids = index.search_lexical("puma sports shoes", 30)
        assert 0 < len(ids) <= 30 and np.all(np.diff(scores) <= 0) and (scores > 0).all()
        query = set(tokenize(["puma sports shoes"])[0])
        for iid in ids.tolist():
            p = products[iid]  # internal id = row of the records
            assert query & set(tokenize([product_text(p.title, p.attributes)])[0])
        women = index.ids_with({"gender": "Women"})
        _, ids = index.search_lexical("black", 1000, women)
        assert set(ids.tolist()) <= set(women.tolist())


def test_a_corrupted_lexical_file_is_refused_and_a_version_without_one_opens(tmp_path, version_dir):
    broken = tmp_path / "broken"
    shutil.copytree(version_dir, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    name = next(n for n in manifest["files"] if n.startswith("lexical/") and n.endswith(".npy"))
    data = bytearray((broken / name).read_bytes())
    data[-1] ^= 0xFF
    (broken / name).write_bytes(bytes(data))
    with pytest.raises(IndexIntegrityError, match="lexical"):
        open_index(broken)
    old = tmp_path / "old"
    shutil.copytree(version_dir, old)
    shutil.rmtree(old / "lexical")
    manifest = json.loads((old / "manifest.json").read_text())
    manifest.pop("lexical")
    manifest["files"] = {n: f for n, f in manifest["files"].items() if not n.startswith("lexical/")}
    (old / "manifest.json").write_text(json.dumps(manifest))
    with open_index(old) as index:
        assert len(index.search(index.vectors(np.arange(1)), 5)[1][0]) == 5
        with pytest.raises(LexicalUnavailableError, match="no lexical index"):
            index.search_lexical("shoes", 5)


def test_reciprocal_rank_fusion_and_weighted_score_fusion():
    dense, lexical = np.array([5, 3, 9]), np.array([3, 7])
    ids, scores = reciprocal_rank_fusion([dense, lexical], [1.0, 1.0], k=60)
    assert ids.tolist() == [3, 5, 7, 9]  # 3 in both lists; then 5 (1/61), 7 (1/62), 9 (1/63)
    assert scores[0] == pytest.approx(1 / 62 + 1 / 61)
    ids, _ = reciprocal_rank_fusion([dense, lexical], [0.0, 1.0])
    assert ids[:2].tolist() == [3, 7]
    ids, scores = weighted_score_fusion([(dense, np.array([0.9, 0.5, 0.1])), (lexical, np.array([4.0, 2.0]))],
                                        [1.0, 2.0])
    assert ids.tolist()[0] == 3 and scores[0] == pytest.approx(0.5 + 2.0)
    with pytest.raises(ValueError, match="weights"):
        reciprocal_rank_fusion([dense], [1.0, 1.0])
    with pytest.raises(ValueError, match=">= 0"):
        weighted_score_fusion([(dense, np.ones(3))], [-1.0])


def test_records_without_text_give_a_dense_only_version(tmp_path):
    """Vectors whose records carry no title or attribute (synthetic benchmarks, an id-only
    feed) build a version without a lexical index; lexical search says so."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, D))
    vectors = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    records = [{"product_id": f"p{i}"} for i in range(300)]
    staged = tmp_path / "v"
    write_version(staged, "v1", vectors, records, VersionOptions(factory="IVF8,Flat", nprobe=2, recall_queries=20,
                                                                self_queries=20), log=lambda _m: None)
    manifest = json.loads((staged / "manifest.json").read_text())
    assert manifest["lexical"] is None and not any(n.startswith("lexical/") for n in manifest["files"])
    with open_index(staged) as index:
        assert list(index.search(vectors[:1], 3)[1][0][:1]) == ["p0"]
        with pytest.raises(LexicalUnavailableError, match="no product had a title"):
            index.search_lexical("shoes", 5)


def test_probe_capacity_sums_the_largest_lists_of_each_shard():
    capacity = ProbeCapacity([np.array([5, 1, 9]), np.array([2, 2])])
    assert [capacity.items(n) for n in (1, 2, 3, 9)] == [9 + 2, 14 + 4, 15 + 4, 15 + 4]
    assert refine_k_factor(10, 50, 1, capacity) == 2  # 20 slots cover the 11 items one list each can hold
    assert refine_k_factor(10, 50, 1, None) == 50 and refine_k_factor(100, 50, 9, capacity) == 1


def test_the_capped_refine_rescores_every_item_of_the_probed_lists(version_dir):
    """k = 100 asked at nprobe 2: the refine depth is capped to what the probed lists can hold,
    and the hits are the exact top 100 (fp16 vectors) over every item of the probed lists."""
    manifest = json.loads((version_dir / "manifest.json").read_text())
    shards = [faiss.read_index(str(version_dir / entry["file"])) for entry in manifest["shards"]]
    ivfs = [faiss.extract_index_ivf(shard) for shard in shards]
    capacity = ProbeCapacity.of_shards(shards)
    assert capacity.items(2) == sum(np.sort([ivf.invlists.list_size(i) for i in range(ivf.nlist)])[-2:].sum()
                                    for ivf in ivfs)
    k, nprobe = 100, 2
    vectors = np.load(version_dir / manifest["vectors"]["file"]).astype(np.float32)
    queries = vectors[:20] + np.float32(0.01)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    with open_index(version_dir) as index:
        served = index.search_served(queries, k, nprobe=nprobe, names=False)
    scores, ids = served.scores, served.ids
    assert not served.exact.any()  # every query went through the IVF round and its refine
    k_factor = manifest["refine"]["k_factor"]
    assert refine_k_factor(k, k_factor, int(served.nprobe.max()), capacity) < k_factor  # the cap bit
    for row, q in enumerate(queries):  # the lists the query's last round probed (widening may add)
        probed = np.concatenate([
            faiss.rev_swig_ptr(ivf.invlists.get_ids(int(l)), ivf.invlists.list_size(int(l))).copy()
            for ivf in ivfs for l in ivf.quantizer.search(q[None], int(served.nprobe[row]))[1][0]])
        exact = vectors[probed] @ q
        order = np.argsort(-exact)[:k]
        got = ids[row][ids[row] >= 0]
        assert got.size == min(k, probed.size)
        np.testing.assert_allclose(scores[row][:got.size], exact[order][:got.size], atol=1e-4)
        assert len(set(got.tolist()) & set(probed[order].tolist())) >= got.size - 1  # a near-tie may swap at k


def test_fusion_equals_its_definition_on_random_rankings():
    rng = np.random.default_rng(3)
    for _ in range(50):
        a, b = rng.permutation(300)[:rng.integers(0, 120)], rng.permutation(300)[:rng.integers(0, 120)]
        weights = (float(rng.integers(0, 3)), float(rng.integers(1, 3)))
        want: dict[int, float] = {}
        for ranking, w in zip((a, b), weights):
            for rank, item in enumerate(ranking.tolist(), start=1):
                want[item] = want.get(item, 0.0) + w / (60 + rank)
        ids, scores = reciprocal_rank_fusion([a, b], weights)
        expected = sorted(want, key=lambda item: (-want[item], item))
        assert ids.tolist() == expected
        np.testing.assert_allclose(scores, [want[i] for i in expected], rtol=1e-6)
