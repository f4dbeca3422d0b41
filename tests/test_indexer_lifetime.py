"""Lifetime of an opened index version: closing it while searches run, and refusing a bad
version without leaking its LMDB environment (real faiss, real LMDB, counted through
``/proc/self/fd``)."""
from __future__ import annotations

import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import lmdb
import numpy as np
import pytest

from indexer.errors import IndexIntegrityError, IndexVersionError
from indexer.metadata import MetadataReader, write_metadata
from indexer.publish import new_version_id, publish_version, tmp_dir
from indexer.search import open_index
from indexer.version import VersionOptions, write_version
from tests.open_files import open_fds

N, D = 2000, 16


@pytest.fixture(scope="module")
def version_dir(tmp_path_factory):
    """A published version over synthetic unit vectors (input data, not a model)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    records = [{"product_id": f"sku-{i}", "title": f"product {i}", "attributes": {"colour": ["Red", "Blue"][i % 2]}}
               for i in range(N)]
    root = tmp_path_factory.mktemp("root")
    version = new_version_id()
    staged = tmp_dir(root) / f"stage-{version}"
    write_version(staged, version, x, records, VersionOptions(factory="IVF8,PQ4", recall_queries=50),
                  log=lambda _m: None)
    return publish_version(root, staged, version)


def _copy(version_dir, tmp_path):
    return shutil.copytree(version_dir, tmp_path / "v")


def test_closing_during_a_search_lets_it_finish_then_releases_everything(version_dir, tmp_path):
    path = _copy(version_dir, tmp_path)
    index = open_index(path, verify=False)
    query = index.vectors(np.array([5]))
    in_filter, go_on = threading.Event(), threading.Event()

    def rare(pid: str) -> bool:  # ~1% pass: the search over-fetches in several rounds
        in_filter.set()
        go_on.wait(10)
        return pid.endswith("77")

    with ThreadPoolExecutor(1) as pool:
        search = pool.submit(index.search, query, 3, None, rare)
        try:
            assert in_filter.wait(10)
            index.close()  # while the search is in its first round
            with pytest.raises(IndexVersionError, match="is closed"):
                index.search(query, 3)  # new calls are refused at once ...
            assert open_fds(path / "metadata.lmdb") == 1  # ... the running one keeps the environment
        finally:
            go_on.set()
        scores, pids = search.result(30)
    found = [p for p in pids[0] if p is not None]
    assert found and all(p.endswith("77") for p in found)
    assert np.isfinite(scores[0, :len(found)]).all()
    assert open_fds(path / "metadata.lmdb") == 0  # released when the search ended


def test_close_is_idempotent_and_releases_the_files(version_dir, tmp_path):
    path = _copy(version_dir, tmp_path)
    index = open_index(path, verify=False)
    assert open_fds(path / "metadata.lmdb") == 1
    index.close()
    index.close()
    assert open_fds(path / "metadata.lmdb") == 0
    with pytest.raises(IndexVersionError, match="is closed"):
        index.get_products(["sku-1"])


def _rewrite_schema(file, schema: bytes) -> None:
    env = lmdb.open(str(file), subdir=False, max_dbs=8, lock=False)
    try:
        with env.begin(write=True) as txn:
            txn.put(b"schema", schema, db=env.open_db(b"info", txn=txn))
    finally:
        env.close()


def test_a_metadata_schema_mismatch_is_an_integrity_error_and_leaks_no_environment(tmp_path):
    file = tmp_path / "metadata.lmdb"
    write_metadata(file, [{"product_id": "a"}, {"product_id": "b"}])
    _rewrite_schema(file, b"ecsearch-metadata-v0")
    with pytest.raises(IndexIntegrityError, match=r"metadata\.lmdb: metadata schema b'ecsearch-metadata-v0', "
                                                  r"expected 'ecsearch-metadata-v1'") as caught:
        MetadataReader(file)
    assert open_fds(file) == 0 and caught.value  # closed even while the error (and its frames) lives on


def test_an_lmdb_without_our_databases_is_refused_and_leaks_no_environment(tmp_path):
    file = tmp_path / "metadata.lmdb"
    env = lmdb.open(str(file), subdir=False, lock=False)
    with env.begin(write=True) as txn:
        txn.put(b"key", b"value")
    env.close()
    with pytest.raises(IndexVersionError, match=r"metadata\.lmdb: not a readable metadata LMDB") as caught:
        MetadataReader(file)
    assert open_fds(file) == 0 and caught.value  # closed even while the error (and its frames) lives on


@pytest.mark.parametrize("key", ["refine", "refine.k_factor", "index.nlist", "index.nprobe_default",
                                 "metadata", "metadata.file", "vectors.file", "counts.indexed"])
def test_a_manifest_lacking_a_key_is_a_precise_integrity_error_and_leaks_nothing(version_dir, tmp_path, key):
    path = _copy(version_dir, tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    *parents, last = key.split(".")
    node = manifest
    for part in parents:
        node = node[part]
    del node[last]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexIntegrityError, match=rf"manifest\.json: manifest lacks '{key}'") as caught:
        open_index(path, verify=False)
    assert open_fds(path / "metadata.lmdb") == 0 and caught.value


def test_a_manifest_with_a_bad_value_is_an_integrity_error_and_leaks_nothing(version_dir, tmp_path):
    path = _copy(version_dir, tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["index"]["nlist"] = "many"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexIntegrityError, match=r"manifest\.json: bad value") as caught:
        open_index(path, verify=False)
    assert open_fds(path / "metadata.lmdb") == 0 and caught.value
