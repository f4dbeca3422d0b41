"""Refine storages (indexer.refine): fp16 in RAM, fp16 memory-mapped, fp16 read per candidate, SQ8, none. Real faiss and
LMDB versions of clustered vectors; every storage is recorded in the manifest and searched."""
from __future__ import annotations

import numpy as np
import pytest

from indexer.errors import BuildError, IndexIntegrityError
from indexer.recall import exact_search, recall_at_k
from indexer.refine import REFINE_FILES, REFINE_STORAGES, PreadRows
from indexer.search import open_index
from indexer.version import VersionOptions, write_version

N, D = 3000, 32


def _vectors(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, D))
    x = centres[rng.integers(0, 40, n)] + 0.6 * rng.standard_normal((n, D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def red_every_50(n: int) -> list[dict]:
    """Product records ``sku-i``; every 50th is colour Red, the rest Blue."""
    return [{"product_id": f"sku-{i}", "attributes": {"colour": "Red" if i % 50 == 0 else "Blue"}} for i in range(n)]


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """One version per refine storage over the same vectors, with the queries."""
    vectors = _vectors(N, 0)
    records = red_every_50(N)
    out = {}
    for storage in REFINE_STORAGES:
        folder = tmp_path_factory.mktemp(f"refine-{storage}")
        write_version(folder, f"v-{storage}", vectors, records,
                      VersionOptions(n_shards=2, factory="IVF16,PQ8", nprobe=4, k_factor=20, refine_storage=storage),
                      log=lambda _m: None)
        out[storage] = folder
    return out, vectors, _vectors(200, 1)


def test_each_storage_is_recorded_in_the_manifest_with_its_file(versions):
    folders, _, _ = versions
    for storage, folder in folders.items():
        with open_index(folder) as index:  # verify=True: the refine file's checksum is in the manifest
            refine = index.manifest["refine"]
            assert refine["storage"] == storage == index.refine_storage
            assert refine["file"] == REFINE_FILES.get(storage)
            assert (refine["file"] is None) or (folder / refine["file"]).is_file()
            assert refine["default"] is (storage != "none")
            assert refine["ram_bytes_per_item"] == {"fp16_ram": 2 * D, "fp16_mmap": 0, "fp16_pread": 0, "sq8": D,
                                                 "none": 0}[storage]


def test_mmap_refine_gives_the_ram_results_and_none_gives_the_pq_results(versions):
    folders, _, queries = versions
    with open_index(folders["fp16_ram"]) as ram, open_index(folders["fp16_mmap"]) as mapped, \
            open_index(folders["none"]) as plain:
        s_ram, i_ram = ram.search_ids(queries, 10)
        s_map, i_map = mapped.search_ids(queries, 10)
        np.testing.assert_array_equal(i_ram, i_map)
        np.testing.assert_array_equal(s_ram, s_map)
        _, i_pq = ram.search_ids(queries, 10, refine=False)
        _, i_none = plain.search_ids(queries, 10, refine=True)  # no refine index: the request is PQ only
        np.testing.assert_array_equal(i_pq, i_none)


def recall_per_version(folders: dict, vectors: np.ndarray, queries: np.ndarray, **search) -> dict[str, float]:
    """recall@10 against exact search over the fp16 vectors, per version folder (``search``:
    ``search_ids`` keywords; ``nprobe=None`` probes every list). Checks each manifest's recall too."""
    _, truth = exact_search(vectors.astype(np.float16), queries, 10)
    recall = {}
    for name, folder in folders.items():
        with open_index(folder) as index:
            options = {**search, "nprobe": index.nlist} if search.get("nprobe", 0) is None else search
            recall[name] = recall_at_k(index.search_ids(queries, 10, **options)[1], truth, 10)
            assert index.manifest["recall"]["recall_at_10"] > 0
    return recall


def test_recall_order_of_the_storages(versions):
    folders, vectors, queries = versions
    recall = recall_per_version(folders, vectors, queries)
    assert recall["fp16_ram"] == recall["fp16_mmap"] == recall["fp16_pread"] >= recall["sq8"] - 0.02
    assert recall["sq8"] > recall["none"] + 0.05, recall


def test_filtered_search_stays_exact_for_every_storage(versions):
    folders, vectors, queries = versions
    red = np.arange(0, N, 50, dtype=np.int64)
    scores_truth = queries @ vectors[red].astype(np.float16).astype(np.float32).T
    truth = red[np.argsort(-scores_truth, axis=1, kind="stable")[:, :5]]
    for storage, folder in folders.items():
        with open_index(folder) as index:
            allowed = index.ids_with({"colour": "Red"})
            np.testing.assert_array_equal(allowed, red)
            scores, ids = index.search_ids(queries, 5, allowed=allowed)
            assert recall_at_k(ids, truth, 5) == 1.0, storage
            np.testing.assert_allclose(scores, np.sort(scores_truth, axis=1)[:, ::-1][:, :5], atol=1e-5)


def test_unknown_storage_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(BuildError, match="refine storage 'ssd'"):
        write_version(tmp_path / "v", "v", _vectors(100, 2), [{"product_id": str(i)} for i in range(100)],
                      VersionOptions(refine_storage="ssd"), log=lambda _m: None)
    assert not (tmp_path / "v").exists()


def test_pread_refine_gives_the_ram_results_without_mapping_the_vectors(versions):
    folders, _, queries = versions
    with open_index(folders["fp16_ram"]) as ram, open_index(folders["fp16_pread"]) as pread:
        assert pread.manifest["refine"]["read"] == "pread" and pread.manifest["refine"]["exact_scores"]
        for nprobe, k_factor in ((4, 20), (16, 5), (1, 1)):
            s_ram, i_ram = ram.search_ids(queries, 10, nprobe=nprobe, k_factor=k_factor)
            s_pread, i_pread = pread.search_ids(queries, 10, nprobe=nprobe, k_factor=k_factor)
            np.testing.assert_array_equal(i_ram, i_pread)
            np.testing.assert_allclose(s_ram, s_pread, rtol=0, atol=1e-5)
        # a single query, and k beyond the candidates of a tiny probe: padded like faiss's IndexRefine
        s_ram, i_ram = ram.search_ids(queries[:1], 300, nprobe=1, k_factor=1)
        s_pread, i_pread = pread.search_ids(queries[:1], 300, nprobe=1, k_factor=1)
        np.testing.assert_array_equal(i_ram, i_pread)
        assert (i_pread[s_pread == -np.inf] == -1).all()


def test_pread_rows_read_the_stored_rows_and_refuse_a_short_file(versions, tmp_path):
    folders, _, _ = versions
    stored = np.load(folders["fp16_pread"] / "vectors.f16.npy", mmap_mode="r")
    rows = np.array([0, 7, 8, N - 1], dtype=np.int64)
    np.testing.assert_array_equal(PreadRows(stored).rows(rows), stored[rows].astype(np.float32))
    np.testing.assert_array_equal(PreadRows(np.asarray(stored)).rows(rows), stored[rows].astype(np.float32))
    cut = tmp_path / "cut.f16.npy"
    cut.write_bytes((folders["fp16_pread"] / "vectors.f16.npy").read_bytes())
    whole = np.load(cut, mmap_mode="r")
    reader = PreadRows(whole)
    with open(cut, "r+b") as f:
        f.truncate(whole.offset + (N - 1) * 2 * D)
    with pytest.raises(IndexIntegrityError, match="short read"):
        reader.rows(np.array([N - 1], dtype=np.int64))
