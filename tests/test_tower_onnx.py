"""ONNX Runtime tower paths (engine/model/tower_onnx.py) and the serving backend choice
(server/tower_backend.py), on tiny random models, real catalogue photos and a real server."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.cpu_features import ISA_LEVELS, bf16_is_fast, detected_isa
from engine.model.tower_graphs import KINDS, GraphError
from server.tower_backend import BackendError, plan_tower, prepare_query_tower
from tests.test_server_support import index_root, server_model, start_server, subset  # noqa: F401
from tests.tiny_models import make_tiny_model

pytest.importorskip("onnxruntime")

TEXTS = ["women black heels", "a", "navy blue casual shirt for men with long sleeves and a button-down collar",
         "red kurta", "sports shoes", "Puma Men Black and Grey Running Shoes", "watch", "blue jeans for girls"]


@pytest.fixture
def photos(fashion_dir):
    return [str(fashion_dir / "images" / f"{pid}.jpg") for pid in (1580, 1563, 2987, 10000)]


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum(a * b, axis=1).min())


@pytest.mark.parametrize("options", [{}, {"pooled_residual": True},
                                     {"pooled_residual": True, "deep_gain": 0.5, "solo_gains": [1.0, 2.0]}],
                         ids=["plain", "residual", "residual+gains"])
def test_onnx_paths_give_the_python_paths_vectors_for_every_kind_and_batch_size(tiny_backbone_dir, photos,
                                                                                options):
    tower = make_tiny_model(tiny_backbone_dir, seed=11, **options).query_tower
    cases = {"text": (TEXTS[:4], [None] * 4), "image": ([None] * 4, photos),
             "text+image": (["black heels", "a", "red kurta for women with long sleeves", "watch"], photos)}
    expected = {kind: tower.encode(t, i, use_graphs=False) for kind, (t, i) in cases.items()}
    assert tower.use_graphs("fp32", backend="onnxruntime") == {}
    assert {kind: g.backend for kind, g in tower.graphs.items()} == dict.fromkeys(cases, "onnxruntime fp32")
    for kind, (texts, images) in cases.items():
        before = tower.graphs[kind].calls
        for batch_size in (1, 3, 4):  # batches of 1, of 3 with 1 left over, of all 4; other lengths than the export's
            got = tower.encode(texts, images, batch_size=batch_size)
            assert got.dtype == np.float32 and got.shape == expected[kind].shape
            np.testing.assert_allclose(got, expected[kind], atol=2e-5)
        assert tower.graphs[kind].calls - before == 4 + 2 + 1
    full = tower.encode(TEXTS, batch_size=8)  # 8 texts of 3..20 tokens in one ORT call
    np.testing.assert_allclose(full, tower.encode(TEXTS, use_graphs=False), atol=2e-5)
    mixed_texts, mixed_images = ["black heels", None, "red kurta"], [None, photos[0], photos[1]]
    np.testing.assert_allclose(tower.encode(mixed_texts, mixed_images),  # one mixed batch: Python
                               tower.encode(mixed_texts, mixed_images, use_graphs=False), atol=1e-6)


def test_int8_text_path_is_refused_without_real_queries_to_gate_it_on(tiny_backbone_dir):
    model = make_tiny_model(tiny_backbone_dir, seed=12)
    tower = model.query_tower
    refused = tower.use_graphs("fp32", kinds=("text",), backend="onnxruntime-int8")
    assert "none were given" in refused["text"] and "text" not in tower.graphs
    line = prepare_query_tower(model, plan_tower("fp32", "onnxruntime-int8"), threads=1)  # refused int8 -> ORT fp32
    assert tower.graphs["text"].backend == "onnxruntime fp32" and tower.graphs["image"].backend == "onnxruntime fp32"
    assert "text, image, text+image: onnxruntime fp32" in line
    with pytest.raises(GraphError, match="only offered for the text path"):
        from engine.model.tower_onnx import onnx_path

        onnx_path(tower, "image", int8=True)


def test_onnx_backend_refuses_bf16_and_unknown_backends(tiny_backbone_dir):
    tower = make_tiny_model(tiny_backbone_dir, seed=13).query_tower
    with pytest.raises(ValueError, match="fp32 weights"):
        tower.use_graphs("bf16", backend="onnxruntime")
    with pytest.raises(ValueError, match="unknown graph backend"):
        tower.use_graphs("fp32", backend="tvm")


@pytest.mark.parametrize("isa", ["avx2", None])  # None: the CPU's own ISA, bf16-native or not
def test_auto_picks_gated_int8_text_and_fp32_images_on_any_cpu_and_python_without_graphs(monkeypatch, isa):
    if isa is None:
        monkeypatch.delenv("ECSEARCH_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ECSEARCH_CPU_ISA", isa)
    assert plan_tower() == plan_tower("auto", "auto")
    plan = plan_tower()
    assert (plan.precision, plan.isa) == ("fp32", isa or detected_isa())
    assert plan.backends == {"text": "onnxruntime-int8", "image": "onnxruntime", "text+image": "onnxruntime"}
    assert plan.describe() == ("text: onnxruntime int8 if its gate passes, else fp32; "
                               f"image, text+image: onnxruntime fp32 (isa={plan.isa})")
    assert plan_tower("fp32").backends == dict.fromkeys(KINDS, "onnxruntime")  # explicit fp32 stays fp32
    assert plan_tower("fp32", "torchscript").backends == dict.fromkeys(KINDS, "torchscript")
    assert plan_tower(graphs=False).backends == dict.fromkeys(KINDS, "python")
    with pytest.raises(BackendError, match="fp32 weights"):
        plan_tower("bf16", "onnxruntime")
    with pytest.raises(BackendError, match="precision must be"):
        plan_tower("int4")
    with pytest.raises(BackendError, match="backend must be"):
        plan_tower("fp32", "tvm")


@pytest.mark.skipif(not bf16_is_fast("cpu"), reason="bf16 runs only where the CPU runs it natively")
def test_bf16_runs_text_through_torchscript_and_images_through_onnx_where_bf16_is_native(
        monkeypatch, tiny_backbone_dir, photos):
    monkeypatch.delenv("ECSEARCH_CPU_ISA", raising=False)
    plan = plan_tower("bf16")
    assert (plan.precision, plan.isa) == ("bf16", detected_isa())
    assert plan.backends == {"text": "torchscript", "image": "onnxruntime", "text+image": "onnxruntime"}
    assert ISA_LEVELS.index(plan.isa) >= ISA_LEVELS.index("avx512_bf16")
    assert plan_tower("auto", "onnxruntime").precision == "fp32"  # an explicit ONNX backend: fp32
    assert plan_tower("auto", "torchscript").precision == "bf16"  # auto with TorchScript: native bf16
    model = make_tiny_model(tiny_backbone_dir, seed=14)
    tower = model.query_tower
    texts, images = ["black heels", "a", "red kurta"], photos[:3]
    cases = {"text": (texts, None), "image": (None, images), "text+image": (texts, images)}
    expected = {kind: tower.encode(t, i, use_graphs=False) for kind, (t, i) in cases.items()}  # fp32 Python path
    line = prepare_query_tower(model, plan, threads=1)
    assert line == f"text: torchscript bf16; image, text+image: onnxruntime fp32 (isa={plan.isa})"
    assert model.text_backbone.model.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="bfloat16"):  # the weights were cast after the ONNX export
        tower.encode(texts, None, precision="fp32")
    for kind, (t, i) in cases.items():
        before = tower.graphs[kind].calls
        got = tower.encode(t, i, precision="bf16")
        assert tower.graphs[kind].calls == before + 1, kind
        assert _min_cosine(got, expected[kind]) > (0.999 if kind == "text" else 0.99999), kind


def test_prepare_tower_falls_back_per_kind_and_says_what_runs(tmp_path, photos):
    # A CLIP-family model: whatever ORT cannot export goes to TorchScript, then Python;
    # every kind is accounted for in the start-up line and encodes the Python path's vectors.
    from engine.model.towers import ModelConfig, build_model
    from tests.tiny_models import make_tiny_clip

    folder = make_tiny_clip(tmp_path / "clip")
    config = ModelConfig(dim=32, heads=4, cross_layers=1, self_layers=1, fusion_layers=1,
                         text_backbone={"type": "hf_clip", "path": str(folder)},
                         image_backbone={"type": "hf_clip", "path": str(folder)})
    tower_owner = build_model(config)
    tower = tower_owner.query_tower
    texts, images = ["black heels", "red kurta", "watch"], photos[:3]
    expected = {"text": tower.encode(texts, use_graphs=False), "image": tower.encode(None, images, use_graphs=False)}
    line = prepare_query_tower(tower_owner, plan_tower("fp32", "onnxruntime"), threads=1)
    assert all(kind in line for kind in ("text", "image", "text+image")) and "isa=" in line
    np.testing.assert_allclose(tower.encode(texts), expected["text"], atol=2e-5)
    np.testing.assert_allclose(tower.encode(None, images), expected["image"], atol=2e-5)


def test_server_with_the_onnx_backend_answers_every_kind_through_it(index_root, subset):  # noqa: F811
    server = start_server(index_root, precision="fp32", backend="onnxruntime")
    try:
        server.wait_serving(timeout_s=300)
        tower = server.server.model.query_tower
        assert {kind: g.backend for kind, g in tower.graphs.items()} == dict.fromkeys(
            ("text", "image", "text+image"), "onnxruntime fp32")
        photo = Path(subset.products[0].image).read_bytes()
        from server.client import SearchClient

        with SearchClient(server.target, timeout_s=60) as client:
            for kind, kwargs in (("text", {"text": "black leather wallet"}), ("image", {"image": photo}),
                                 ("text+image", {"text": "in red", "image": photo})):
                before = tower.graphs[kind].calls
                assert len(client.search(top_k=3, **kwargs).hits) == 3
                assert tower.graphs[kind].calls == before + 1, kind
            assert client.search(image=photo, top_k=1).hits[0].product_id == subset.products[0].product_id
    finally:
        server.stop()


def test_serve_refuses_an_impossible_plan_with_exit_status_2(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    for options, message in ((["--precision", "bf16", "--backend", "onnxruntime"], "runs fp32 weights"),
                             (["--backend", "tvm"], "invalid choice")):
        done = subprocess.run([sys.executable, "-m", "engine.cli", "serve", "--index-root", str(tmp_path), *options],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr, done.stderr
