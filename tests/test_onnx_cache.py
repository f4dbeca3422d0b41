"""The ONNX graph cache (engine/model/onnx_cache.py): a second server start reuses the
exported graphs, a corrupt or partial entry is exported again, an unwritable folder only
costs the export. Real tiny models, real ONNX Runtime, a real gRPC server on loopback."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from engine.model.tower_graphs import KINDS
from server.tower_backend import onnx_cache_for
from tests.test_server_support import index_root, server_model, start_server, subset  # noqa: F401
from tests.tiny_models import make_tiny_model

pytest.importorskip("onnxruntime")


def _messages(caplog, start: int = 0) -> list[str]:
    return [r.getMessage() for r in caplog.records[start:]]


def _serve_once(root: Path, cache: Path, photo: bytes) -> None:
    from server.client import SearchClient

    server = start_server(root, precision="fp32", backend="onnxruntime", onnx_cache=str(cache))
    try:
        server.wait_serving(timeout_s=300)
        tower = server.server.model.query_tower
        assert {kind: g.backend for kind, g in tower.graphs.items()} == dict.fromkeys(KINDS, "onnxruntime fp32")
        with SearchClient(server.target, timeout_s=60) as client:
            assert len(client.search(text="black leather wallet", image=photo, top_k=3).hits) == 3
    finally:
        server.stop()


def test_second_start_reuses_the_cached_graphs_and_a_corrupt_entry_is_exported_again(
        index_root, subset, tmp_path, caplog):  # noqa: F811
    caplog.set_level(logging.INFO)
    cache, photo = tmp_path / "onnx", Path(subset.products[0].image).read_bytes()
    _serve_once(index_root, cache, photo)
    exported = [m for m in _messages(caplog) if m.startswith("ONNX export:")]
    assert len(exported) == len(KINDS) and all("cached as" in m for m in exported)
    graphs = sorted(cache.glob("*.onnx"))
    assert len(graphs) == len(KINDS) and len(list(cache.glob("*.json"))) == len(KINDS)
    mtimes = {g: g.stat().st_mtime_ns for g in graphs}

    mark = len(caplog.records)
    _serve_once(index_root, cache, photo)  # second start: every graph from the cache, none exported
    second = _messages(caplog, mark)
    assert not [m for m in second if m.startswith("ONNX export:")]
    assert len([m for m in second if m.startswith("ONNX cache: reusing")]) == len(KINDS)
    assert {g: g.stat().st_mtime_ns for g in graphs} == mtimes

    torn = graphs[0]
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])  # a partial write
    mark = len(caplog.records)
    _serve_once(index_root, cache, photo)
    third = _messages(caplog, mark)
    assert len([m for m in third if "corrupt or partial" in m and torn.stem in m]) == 1
    assert len([m for m in third if m.startswith("ONNX export:")]) == 1
    record = json.loads(torn.with_suffix(".json").read_text())
    from engine.model.file_hashing import sha256_file

    assert record["sha256"] == sha256_file(torn) and record["bytes"] == torn.stat().st_size


def test_cache_folder_defaults_next_to_the_model_and_an_unwritable_one_only_costs_the_export(
        server_model, tiny_backbone_dir, tmp_path, caplog):  # noqa: F811
    from engine.model.model_folder import load_model

    _, folder = server_model
    model = load_model(folder)
    cache = onnx_cache_for(model)
    assert cache.folder == Path(folder).resolve().parent / "cache" / "onnx"
    assert onnx_cache_for(model, "none") is None and onnx_cache_for(model, None) is None
    assert onnx_cache_for(make_tiny_model(tiny_backbone_dir, seed=5)) is None  # no folder, no fingerprint
    assert cache.key("query", "text", "fp32") != cache.key("query", "text", "int8-dynamic")
    assert cache.key("query", "text", "fp32") != cache.key("item", "text", "fp32")

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    caplog.set_level(logging.INFO)
    tower = model.query_tower
    texts = ["women black heels", "a", "navy blue casual shirt for men"]
    expected = tower.encode(texts, use_graphs=False)
    assert tower.use_graphs("fp32", kinds=("text",), backend="onnxruntime",
                            onnx_cache=onnx_cache_for(model, blocker / "onnx")) == {}
    assert any("cannot write" in m for m in _messages(caplog))
    np.testing.assert_allclose(tower.encode(texts), expected, atol=2e-5)
