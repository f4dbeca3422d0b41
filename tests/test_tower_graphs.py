"""Traced tower paths (engine/model/tower_graphs.py) and serving-precision weights
(TwoTowerModel.cast_for_inference), on tiny random models and real catalogue photos."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.cpu_features import bf16_is_fast
from tests.cpu_marks import needs_bf16, precisions
from tests.tiny_models import make_tiny_clip, make_tiny_model

pytestmark = pytest.mark.isa  # depends on the CPU's ISA: CI reruns it as on an AVX2-only CPU

TEXTS = ["women black heels", "a", "navy blue casual shirt for men with long sleeves and a button-down collar",
         "red kurta", "sports shoes", "Puma Men Black and Grey Running Shoes", "watch", "blue jeans for girls"]


@pytest.fixture
def photos(fashion_dir):
    return [str(fashion_dir / "images" / f"{pid}.jpg") for pid in (1580, 1563, 2987)]


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum(a * b, axis=1).min())


@pytest.mark.parametrize("precision", precisions())
@pytest.mark.parametrize("pooled_residual", [False, True])
def test_graph_gives_the_python_paths_vectors_for_any_batch_size_and_length(tiny_backbone_dir, precision,
                                                                            pooled_residual):
    model = make_tiny_model(tiny_backbone_dir, seed=3, pooled_residual=pooled_residual).cast_for_inference(precision)
    tower = model.query_tower
    expected = tower.encode(TEXTS, precision=precision, use_graphs=False)
    assert tower.use_graphs(precision) == {}
    graph = tower.graphs["text"]
    before = graph.calls
    for batch_size in (1, 3, 8):  # batches of 1, of 3 with 2 left over, of all 8; lengths 3..20 tokens
        got = tower.encode(TEXTS, precision=precision, batch_size=batch_size)
        assert got.dtype == np.float32 and got.shape == expected.shape
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        if precision == "fp32":
            np.testing.assert_allclose(got, expected, atol=2e-5)
        else:
            assert _min_cosine(got, expected) > 0.999
    assert graph.calls - before == 8 + 3 + 1


def test_batches_with_an_image_run_in_python_and_agree(tiny_backbone_dir, photos):
    model = make_tiny_model(tiny_backbone_dir, seed=4)
    tower = model.query_tower
    texts = ["black heels", None, "red kurta", "blue shirt", "watch"]
    images = [None, photos[0], photos[1], None, photos[2]]
    expected = tower.encode(texts, images, use_graphs=False)
    tower.use_graphs("fp32", kinds=("text",))
    before = tower.graphs["text"].calls
    got = tower.encode(texts, images, batch_size=2)  # sorted: 2 text-only rows, then 3 with an image
    np.testing.assert_allclose(got, expected, atol=2e-5)
    assert tower.graphs["text"].calls - before == 1
    tower.encode(texts, images)  # one mixed batch: Python only
    assert tower.graphs["text"].calls - before == 1


def test_graph_of_another_precision_is_not_used(tiny_backbone_dir):
    model = make_tiny_model(tiny_backbone_dir, seed=5)
    tower = model.query_tower
    tower.use_graphs("fp32", kinds=("text",))
    before = tower.graphs["text"].calls
    python_bf16 = tower.encode(TEXTS[:3], precision="bf16", use_graphs=False)
    np.testing.assert_array_equal(tower.encode(TEXTS[:3], precision="bf16"), python_bf16)
    assert tower.graphs["text"].calls == before


def test_clip_family_towers_are_traced_or_refused_cleanly(tmp_path):
    from engine.model.towers import ModelConfig, build_model

    folder = make_tiny_clip(tmp_path / "clip")
    config = ModelConfig(dim=32, heads=4, cross_layers=1, self_layers=1, fusion_layers=1,
                         text_backbone={"type": "hf_clip", "path": str(folder)},
                         image_backbone={"type": "hf_clip", "path": str(folder)})
    tower = build_model(config).query_tower
    expected = tower.encode(TEXTS, use_graphs=False)
    refused = tower.use_graphs("fp32")
    assert set(refused) | set(tower.graphs) == {"text", "image", "text+image"}
    assert not set(refused) & set(tower.graphs)
    np.testing.assert_allclose(tower.encode(TEXTS), expected, atol=2e-5)


@pytest.mark.skipif(not bf16_is_fast("cpu"), reason="bfloat16 weights are only cast where the CPU runs bf16")
def test_bf16_weights_refuse_fp32_encoding_and_leave_other_models_alone(tiny_backbone_dir):
    served = make_tiny_model(tiny_backbone_dir, seed=6)
    fp32 = served.query_tower.encode(TEXTS, use_graphs=False)
    other = make_tiny_model(tiny_backbone_dir, seed=6)  # same backbone folder (cached HF module)
    served.cast_for_inference("bf16")
    assert served.text_backbone.model.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    assert other.text_backbone.model.embeddings.word_embeddings.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="bfloat16"):
        served.query_tower.encode(TEXTS)
    assert _min_cosine(served.query_tower.encode(TEXTS, precision="bf16"), fp32) > 0.99
    np.testing.assert_array_equal(other.query_tower.encode(TEXTS, use_graphs=False), fp32)
    with pytest.raises(ValueError, match="unknown precision"):
        served.cast_for_inference("int8")


def test_pretokenized_texts_encode_like_their_strings(tiny_backbone_dir, photos):
    model = make_tiny_model(tiny_backbone_dir, seed=7)
    tower = model.query_tower
    texts = ["black heels", None, "a long query about red casual shoes for men with laces", "watch"]
    images = [None, photos[0], photos[1], None]
    tokens = [None if t is None else model.backbones.text.pretokenize(t) for t in texts]
    for use_graph in (False, True):
        if use_graph:
            tower.use_graphs("fp32")
        np.testing.assert_allclose(tower.encode(tokens, images, batch_size=2),
                                   tower.encode(texts, images, batch_size=2), atol=1e-6)


@pytest.mark.parametrize("precision", precisions())
@pytest.mark.parametrize("pooled_residual", [False, True])
def test_image_and_text_image_graphs_give_the_python_paths_vectors(tiny_backbone_dir, photos, precision,
                                                                   pooled_residual):
    model = make_tiny_model(tiny_backbone_dir, seed=8, pooled_residual=pooled_residual).cast_for_inference(precision)
    tower = model.query_tower
    cases = {"image": ([None, None, None], photos), "text+image": (["black heels", "a", "red kurta"], photos)}
    expected = {kind: tower.encode(t, i, precision=precision, use_graphs=False) for kind, (t, i) in cases.items()}
    assert tower.use_graphs(precision) == {}
    for kind, (texts, images) in cases.items():
        before = tower.graphs[kind].calls
        for batch_size in (1, 3):
            got = tower.encode(texts, images, precision=precision, batch_size=batch_size)
            if precision == "fp32":
                np.testing.assert_allclose(got, expected[kind], atol=2e-5)
            else:
                assert _min_cosine(got, expected[kind]) > 0.999
        assert tower.graphs[kind].calls - before == 3 + 1
    from engine.model.errors import ImageDecodeError

    with pytest.raises(ImageDecodeError) as info:  # bad input is still named by its index
        tower.encode([None, None], [photos[0], b"not an image"], precision=precision)
    assert info.value.index == 1


def test_a_graph_that_fails_when_run_is_refused_and_python_encodes(tiny_backbone_dir):
    # With the CPU tensor-expression fuser forced on, a torch build without LLVM fails inside
    # the graph (RuntimeError "LLVM Backend not found"); the tower must refuse the graph, not crash.
    model = make_tiny_model(tiny_backbone_dir, seed=9)
    tower = model.query_tower
    expected = tower.encode(TEXTS, use_graphs=False)
    could_fuse, texpr = torch._C._jit_can_fuse_on_cpu(), torch._C._jit_texpr_fuser_enabled()
    torch._C._jit_override_can_fuse_on_cpu(True)
    torch._C._jit_set_texpr_fuser_enabled(True)
    try:
        refused = tower.use_graphs("fp32")
    finally:
        torch._C._jit_override_can_fuse_on_cpu(could_fuse)
        torch._C._jit_set_texpr_fuser_enabled(texpr)
    assert set(refused) | set(tower.graphs) == {"text", "image", "text+image"}
    assert all("fails on" in reason or "disagrees" in reason or "cannot trace" in reason
               for reason in refused.values())
    np.testing.assert_allclose(tower.encode(TEXTS), expected, atol=2e-5)


def test_bf16_graphs_are_refused_with_a_reason_below_avx512(tiny_backbone_dir, monkeypatch):
    """The AVX2 path: bf16 graphs are refused (Python keeps serving), never a crash."""
    monkeypatch.setenv("ECSEARCH_CPU_ISA", "avx2")
    tower = make_tiny_model(tiny_backbone_dir, seed=9).query_tower
    refused = tower.use_graphs("bf16")
    assert set(refused) == {"text", "image", "text+image"}
    assert all("isa=avx2" in reason for reason in refused.values())
    assert tower.graphs == {}
