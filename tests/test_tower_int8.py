"""The gated int8 text path (engine/model/tower_int8.py): kept only when its min cosine to
fp32 over real catalogue queries, measured at export and recorded with the queries in the
ONNX cache, passes; refused (and the refusal cached) otherwise. Tiny random models saved
as real model folders, the real fashion catalogue, real ONNX Runtime."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from engine.model import tower_int8, tower_onnx
from server.tower_backend import onnx_cache_for, plan_tower, prepare_query_tower
from tests.tiny_models import make_tiny_model

pytest.importorskip("onnxruntime")


@pytest.fixture
def model_dir(tiny_backbone_dir, fashion_dir, tmp_path):
    """A saved tiny model whose training catalogue is the fashion catalogue."""
    from engine.model.model_folder import save_model

    folder = tmp_path / "model"
    save_model(make_tiny_model(tiny_backbone_dir, seed=21), folder, extra={"training": {"catalog": str(fashion_dir)}})
    return folder


def _prepare(model_dir, caplog):
    from engine.model.model_folder import load_model

    model = load_model(model_dir)
    mark = len(caplog.records)
    line = prepare_query_tower(model, plan_tower("fp32", "onnxruntime-int8"), threads=1, onnx_cache=onnx_cache_for(model))
    return model, line, [r.getMessage() for r in caplog.records[mark:]]


def _int8_records(model_dir) -> list[dict]:
    records = [json.loads(p.read_text()) for p in (model_dir.parent / "cache" / "onnx").glob("*.json")]
    return [r for r in records if r.get("int8")]


def test_catalog_queries_are_real_titles_brands_and_attribute_phrases(fashion_dir, tmp_path):
    queries = tower_int8.catalog_queries(fashion_dir, 90, seed=0)
    assert len(queries) == 90 and len(set(queries)) > 80 and all(q.strip() for q in queries)
    assert queries == tower_int8.catalog_queries(fashion_dir, 90, seed=0) != tower_int8.catalog_queries(fashion_dir, 90, 1)
    from engine.model.tower_graphs import GraphError

    with pytest.raises(GraphError, match="cannot read the catalogue"):
        tower_int8.catalog_queries(tmp_path / "no-catalogue", 90, seed=0)


def test_int8_text_path_is_used_only_when_its_recorded_gate_passes(model_dir, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(tower_int8, "MIN_COSINE_INT8", 1.01)  # a gate no int8 path can pass
    model, line, messages = _prepare(model_dir, caplog)
    assert model.query_tower.graphs["text"].backend == "onnxruntime fp32"
    assert "text, image, text+image: onnxruntime fp32" in line
    refusal = [m for m in messages if "onnxruntime-int8 refused" in m]
    assert len(refusal) == 1 and "min cosine" in refusal[0] and "600 real queries" in refusal[0]
    (record,) = _int8_records(model_dir)
    assert record["refused"] and not record["gate"]["passed"] and len(record["gate_queries"]) == 600

    model, _, messages = _prepare(model_dir, caplog)  # the refusal is cached: not measured again
    assert [m for m in messages if "measured at an earlier start" in m]
    assert not [m for m in messages if m.startswith("ONNX export: the text path (onnxruntime int8)")]

    monkeypatch.setattr(tower_int8, "MIN_COSINE_INT8", -1.0)  # a gate every int8 path passes
    monkeypatch.setattr(tower_onnx, "MIN_COSINE_INT8", -1.0)  # (and the probe-text check)
    for record_file in (model_dir.parent / "cache" / "onnx").glob("*.json"):
        if json.loads(record_file.read_text()).get("refused"):
            record_file.unlink()
    model, line, messages = _prepare(model_dir, caplog)
    tower = model.query_tower
    assert tower.graphs["text"].backend == "onnxruntime int8" and "text: onnxruntime int8" in line
    (record,) = _int8_records(model_dir)
    gate, queries = record["gate"], record["gate_queries"]
    assert gate["passed"] and gate["queries"] == len(queries) == 600 and record["checked_isa"]
    # the recorded figure is the measured one: the stored queries give it again
    expected = tower.encode(queries[:64], precision="fp32", use_graphs=False)
    got = np.concatenate([tower.graphs["text"](queries[i:i + 8], None).numpy() for i in range(0, 64, 8)])
    assert float(np.sum(expected * got, axis=1).min()) >= gate["min_cosine"] - 1e-6
