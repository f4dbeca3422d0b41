"""indexer.item_graphs: an fp32 index build runs the products the token cache lacks through the
item tower's ONNX Runtime graphs (real fashion products and photos, tiny random backbones)."""
from __future__ import annotations

import numpy as np
import pytest

from engine.catalog import read_catalog
from engine.model.model_folder import load_model
from engine.tokens.image_runtime import RUNTIME_ENV
from indexer.encode import EncodeOptions, encode_products
from indexer.item_graphs import use_onnx_graphs

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.isa  # ONNX Runtime kernels depend on the ISA: CI reruns it as on an AVX2-only CPU


@pytest.fixture()
def products(fashion_dir):
    return read_catalog(fashion_dir, limit=12).products


def _encode(model, products, work, token_cache, log):
    options = EncodeOptions(batch_size=4, chunk_size=6, workers=0, precision="fp32", token_cache=str(token_cache))
    return encode_products(model, products, work, options, log=log)


def test_an_fp32_build_encodes_uncached_products_in_onnx_runtime_with_the_same_vectors(
        tiny_model_dir, products, tmp_path, monkeypatch):
    messages: list[str] = []
    monkeypatch.setenv(RUNTIME_ENV, "auto")
    onnx = load_model(tiny_model_dir)
    graphs = _encode(onnx, products, tmp_path / "a", tmp_path / "cache", messages.append)
    assert any("batches run in ONNX Runtime fp32" in m for m in messages), messages
    assert onnx.item_tower.graphs["text+image"].backend == "onnxruntime fp32"
    assert list((tmp_path / "cache" / "onnx").glob("*.onnx")), "the exported graphs are kept beside the tokens"
    monkeypatch.setenv(RUNTIME_ENV, "torch")
    plain_model = load_model(tiny_model_dir)
    plain = _encode(plain_model, products, tmp_path / "b", tmp_path / "cache-b", messages.append)
    assert not plain_model.item_tower.graphs
    assert graphs.indexed == plain.indexed and len(graphs.indexed) == len(products)
    cosines = np.sum(graphs.vectors * plain.vectors, axis=1)  # unit rows
    assert cosines.min() >= 0.999


def test_no_graphs_for_bf16_or_text_only_builds(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(RUNTIME_ENV, "auto")
    model = load_model(tiny_model_dir)
    assert use_onnx_graphs(model, "fused", "bf16", str(tmp_path), print) == []
    assert use_onnx_graphs(model, "text", "fp32", str(tmp_path), print) == []
    assert not model.item_tower.graphs
    assert use_onnx_graphs(model, "image", "fp32", None, print) == ["image"]
    assert set(model.item_tower.graphs) == {"image"}
