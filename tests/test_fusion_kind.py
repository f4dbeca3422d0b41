"""``FusionEncoder.forward(kind=...)``: a batch whose rows all have one presence pattern gives the
per-row path's output without its selections (engine/model/fusion.py, issue 11)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from engine.model.fusion import FusionEncoder
from engine.model.private_block import PrivateBlock
from engine.model.tower_onnx import export_path
from tests.tiny_models import make_tiny_model

HT, HI, D = 12, 20, 16
CONFIGS = {
    "plain": {},
    "residual, gains, private blocks": {"pooled_residual": True, "deep_gain": 0.5, "solo_gains": (1.5, 0.7),
                                        "private_dim": 6, "private_gains": (0.3, 2.0, 0.9), "private_gem_p": 2.0,
                                        "text_private_dim": 5, "text_private_gains": (0.8, 0.1, 0.4)},
    "cross-modal block, query tower": {"pooled_residual": True, "private_dim": 6, "private_gem_p": 2.0,
                                       "cross_dim": 8, "cross_gains": (0.6, 0.3, 0.5), "cross_role": "query"},
    "cross-modal block, item tower": {"cross_dim": 8, "cross_gains": (1.0, 1.0, 1.0), "cross_role": "item"},
}
PRESENCE = {"text": (True, False), "image": (False, True), "text+image": (True, True)}


def _encoder(options: dict) -> FusionEncoder:
    torch.manual_seed(0)
    enc = FusionEncoder(HT, HI, dim=D, heads=2, cross_layers=1, self_layers=1, fusion_layers=1, dropout=0.0,
                        **options).eval()
    g = torch.Generator().manual_seed(3)
    for block in (enc.private, enc.text_private):
        if block is not None:  # a fitted projection (zero until set_projection)
            block.set_projection(torch.randn(block.weight.shape, generator=g),
                                 torch.randn(block.bias.shape, generator=g))
    if enc.cross_modal is not None:
        c = enc.cross_modal
        c.set_projection(torch.randn(HT, generator=g), torch.randn(c.k, HT, generator=g),
                         torch.randn(HI, generator=g), torch.randn(c.k, HI, generator=g))
    return enc


def _uniform_batch(kind: str, b: int = 4):
    """``b`` rows that all have ``kind``'s modalities, with padded tokens; absent ones are zeros."""
    g = torch.Generator().manual_seed(1)
    with_text, with_image = PRESENCE[kind]
    t, v = torch.randn(b, 7, HT, generator=g), torch.randn(b, 9, HI, generator=g)
    tm, vm = torch.ones(b, 7, dtype=torch.bool), torch.ones(b, 9, dtype=torch.bool)
    tm[0, 4:], vm[1, 6:] = False, False
    if not with_text:
        t, tm = torch.zeros(b, 1, HT), torch.zeros(b, 1, dtype=torch.bool)
    if not with_image:
        v, vm = torch.zeros(b, 1, HI), torch.zeros(b, 1, dtype=torch.bool)
    return t, tm, v, vm, torch.full((b,), with_text), torch.full((b,), with_image)


@pytest.mark.parametrize("options", list(CONFIGS.values()), ids=list(CONFIGS))
@pytest.mark.parametrize("kind", list(PRESENCE))
def test_a_batch_of_one_kind_gives_the_per_row_output(options, kind):
    enc = _encoder(options)
    batch = _uniform_batch(kind)
    with torch.no_grad():
        per_row, uniform = enc(*batch), enc(*batch, kind=kind)
    assert uniform.shape == (4, enc.output_dim)
    torch.testing.assert_close(uniform, per_row, atol=1e-6, rtol=0)
    assert not torch.allclose(uniform[0], uniform[1])  # rows stay distinct (nothing constant came out)


def test_an_unknown_kind_or_a_kind_the_rows_do_not_have_is_refused():
    enc = _encoder({})
    with pytest.raises(ValueError, match="kind must be one of"):
        enc(*_uniform_batch("text"), kind="video")
    with pytest.raises(ValueError, match="has_text / has_image differ"):
        enc(*_uniform_batch("text"), kind="text+image")  # rows without a photo called text+image
    with pytest.raises(ValueError, match="kind must be one of"):
        PrivateBlock(HI, 4, (1.0, 1.0, 1.0))(torch.zeros(2, HI), torch.ones(2, dtype=torch.bool),
                                              torch.ones(2, dtype=torch.bool), kind="both")


@pytest.mark.parametrize("modality", ["image", "text"])
def test_the_private_block_gives_each_kind_its_gain_and_null_axis(modality):
    block = PrivateBlock(HT, 5, (0.5, 2.0, 3.0), modality)
    block.set_projection(torch.randn(4, HT, generator=torch.Generator().manual_seed(2)), torch.zeros(4))
    mean = torch.randn(3, HT, generator=torch.Generator().manual_seed(4))
    for kind, (with_text, with_image) in PRESENCE.items():
        has_text, has_image = torch.full((3,), with_text), torch.full((3,), with_image)
        expected = block(mean, has_text, has_image)
        torch.testing.assert_close(block(mean, has_text, has_image, kind=kind), expected, atol=1e-7, rtol=0)
        present = with_image if modality == "image" else with_text
        assert bool((expected[:, -1] == 0).all()) == present  # e_null only on rows without the modality


def test_the_exported_text_graph_carries_no_per_row_selection(tiny_backbone_dir, tmp_path):
    """The text-only graph the server runs: no NonZero / GatherND / ScatterND from the fusion
    encoder's row selections, and the same vectors as the Python path."""
    tower = make_tiny_model(tiny_backbone_dir, seed=5, pooled_residual=True, image_private_dim=6,
                            text_private_dim=5).query_tower
    graph = onnx.load(str(export_path(tower, "text", tmp_path / "text.onnx")))
    fusion_ops = {n.op_type for n in graph.graph.node if "/fusion/" in n.name}
    assert fusion_ops and not fusion_ops & {"NonZero", "GatherND", "ScatterND"}
    texts = ["black heels for women", "a", "puma running shoes in red"]
    import onnxruntime as ort

    batch = tower.backbones.text.tokenize(texts)
    got = ort.InferenceSession(str(tmp_path / "text.onnx"), providers=["CPUExecutionProvider"]).run(
        ["vectors"], {"input_ids": batch["input_ids"].numpy(), "attention_mask": batch["attention_mask"].numpy()})[0]
    np.testing.assert_allclose(got, tower.encode(texts, use_graphs=False), atol=2e-5)
