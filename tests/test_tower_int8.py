"""The gated int8 text path (engine/model/tower_int8.py): kept only when its min cosine to
fp32 over real catalogue queries, measured at export and recorded with the queries in the
ONNX cache, passes; refused (and the refusal cached) otherwise. Tiny random models saved
as real model folders, the real fashion catalogue, real ONNX Runtime."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from engine.cpu_features import cpu_isa
from engine.model import tower_int8, tower_onnx
from server.tower_backend import onnx_cache_for, plan_tower, prepare_query_tower
from tests.test_server_support import index_root, server_model, subset  # noqa: F401
from tests.tiny_models import make_tiny_model

pytest.importorskip("onnxruntime")


@pytest.fixture
def model_dir(tiny_backbone_dir, tmp_path):
    """A saved tiny model."""
    from engine.model.model_folder import save_model

    folder = tmp_path / "model"
    save_model(make_tiny_model(tiny_backbone_dir, seed=21), folder)
    return folder


@pytest.fixture(scope="module")
def queries(fashion_dir):
    """Real queries from catalogue products, as the server draws them from its index."""
    from engine.catalog import read_catalog

    products = read_catalog(fashion_dir, limit=600).products
    return tower_int8.product_queries([{"title": p.title, "attributes": p.attributes} for p in products], 900, 0)


def _prepare(model_dir, caplog, queries):
    from engine.model.model_folder import load_model

    model = load_model(model_dir)
    mark = len(caplog.records)
    line = prepare_query_tower(model, plan_tower("fp32", "onnxruntime-int8"), threads=1,
                               onnx_cache=onnx_cache_for(model), int8_queries=queries)
    return model, line, [r.getMessage() for r in caplog.records[mark:]]


def _int8_records(model_dir) -> list[dict]:
    records = [json.loads(p.read_text()) for p in (model_dir.parent / "cache" / "onnx").glob("*.json")]
    return [r for r in records if r.get("int8")]


def test_product_queries_are_real_titles_brands_and_attribute_phrases(queries):
    from engine.model.tower_graphs import GraphError

    assert len(queries) == len(set(queries)) == 900 and all(q.strip() for q in queries)
    products = [{"title": "Puma Men Black Running Shoes", "attributes": {"gender": "Men", "articleType": "Sports Shoes"}}]
    assert sorted(tower_int8.product_queries(products, 9, seed=0)) == sorted(
        ["Puma Men Black Running Shoes", "Puma Sports Shoes", "Men Sports Shoes"])
    with pytest.raises(GraphError, match="no titled products"):
        tower_int8.product_queries([{"title": " ", "attributes": {}}, None], 9, seed=0)


def test_int8_text_path_is_used_only_when_its_recorded_gate_passes(model_dir, queries, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(tower_int8, "MIN_COSINE_INT8", 1.01)  # a gate no int8 path can pass
    model, line, messages = _prepare(model_dir, caplog, queries)
    assert model.query_tower.graphs["text"].backend == "onnxruntime fp32"
    assert "text, image, text+image: onnxruntime fp32" in line
    refusal = [m for m in messages if "onnxruntime-int8 refused" in m]
    gate_queries = tower_int8.split_queries(queries)[1]
    assert len(refusal) == 1 and "min cosine" in refusal[0] and f"{len(gate_queries)} real queries" in refusal[0]
    recipes = tower_int8.recipes(cpu_isa())  # each tried in turn (with VNNI: every linear int8 first)
    assert all(f"int8 text path ({recipe}) refused" in refusal[0] for recipe in recipes)
    records = _int8_records(model_dir)
    assert sorted(r["recipe"] for r in records) == sorted(recipes)
    for record in records:
        assert record["refused"] and not record["gate"]["passed"] and record["gate_queries"] == gate_queries

    model, _, messages = _prepare(model_dir, caplog, queries)  # the refusal is cached: not measured again
    assert [m for m in messages if "measured at an earlier start" in m]
    assert not [m for m in messages if m.startswith("ONNX export: the text path (onnxruntime int8)")]

    monkeypatch.setattr(tower_int8, "MIN_COSINE_INT8", -1.0)  # a gate every int8 path passes
    monkeypatch.setattr(tower_onnx, "MIN_COSINE_INT8", -1.0)  # (and the probe-text check)
    for record_file in (model_dir.parent / "cache" / "onnx").glob("*.json"):
        if json.loads(record_file.read_text()).get("refused"):
            record_file.unlink()
    model, line, messages = _prepare(model_dir, caplog, queries)
    tower = model.query_tower
    assert tower.graphs["text"].backend == "onnxruntime int8" and "text: onnxruntime int8" in line
    (record,) = _int8_records(model_dir)  # the first recipe passed: the next is not tried
    assert record["recipe"] == recipes[0]
    gate, queries = record["gate"], record["gate_queries"]
    assert gate["passed"] and gate["queries"] == len(queries) == 720 and record["checked_isa"]
    # the recorded figure is the measured one: the stored queries give it again
    expected = tower.encode(queries[:64], precision="fp32", use_graphs=False)
    got = np.concatenate([tower.graphs["text"](queries[i:i + 8], None).numpy() for i in range(0, 64, 8)])
    assert float(np.sum(expected * got, axis=1).min()) >= gate["min_cosine"] - 1e-6


def test_the_server_draws_its_gate_queries_from_the_served_index(index_root, subset):  # noqa: F811
    from indexer.search import open_index
    from server.tower_backend import index_queries

    index = open_index(index_root)
    try:
        queries = index_queries(index, count=60, seed=0)
    finally:
        index.close()
    titles = {p.title for p in subset.products}
    assert len(queries) == 60 and titles & set(queries) and all(isinstance(q, str) and q.strip() for q in queries)


@pytest.mark.parametrize("isa", ["avx2", "avx512", "avx512_bf16", "amx"])
def test_vnni_cpus_try_every_linear_in_int8_first(isa):
    expected = ("ffn-fp32",) if tower_int8.uint8_weights(isa) else ("every-linear", "ffn-fp32")
    assert tower_int8.recipes(isa) == expected


def test_each_recipe_keeps_its_linears_fp32(tiny_backbone_dir, tmp_path):
    """Quantize a real exported text graph with each recipe: "every-linear" leaves only the private
    blocks' projections fp32; "ffn-fp32" the fusion encoder and the backbone's FFN output linears; the
    backbone's attention outputs are int8 in both."""
    import onnx

    from engine.model.tower_graphs import GraphError

    tower = make_tiny_model(tiny_backbone_dir, seed=3, pooled_residual=True, image_private_dim=6,
                            text_private_dim=5).query_tower
    source = tower_onnx.export_path(tower, "text", tmp_path / "text.onnx")
    linears = {n.name for n in onnx.load(str(source)).graph.node if n.op_type in ("MatMul", "Gemm")
               and "/attention/self/MatMul" not in n.name and "/attn/MatMul" not in n.name}  # not q·k, p·v
    fp32 = {}
    for recipe in tower_int8.RECIPES:
        tower_int8.quantize_text_graph(source, tmp_path / f"{recipe}.onnx", "avx2", recipe)
        fp32[recipe] = linears & {n.name for n in onnx.load(str(tmp_path / f"{recipe}.onnx")).graph.node}
    assert fp32["every-linear"] and all("/fusion/private/" in n or "/fusion/text_private/" in n
                                        for n in fp32["every-linear"])
    backbone = {n for n in fp32["ffn-fp32"] if "/text_model/" in n}
    assert backbone and all("/output/dense/" in n and "/attention/" not in n for n in backbone)
    # (ORT's quantizer rewrites a Gemm to MatMul + Add before it reads the exclusions: Gemms are int8 in both)
    assert {n for n in linears if "/fusion/" in n and "Gemm" not in n} <= fp32["ffn-fp32"]
    with pytest.raises(GraphError, match="unknown int8 recipe"):
        tower_int8.quantize_text_graph(source, tmp_path / "x.onnx", "avx2", "half")
