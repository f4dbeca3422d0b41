"""Query / item towers over tiny random backbones: shapes, norms, batch independence, views,
skipped backbones, bad input."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from engine.model.errors import BlankTextError, EmptySampleError, ImageDecodeError, ImageTooLargeError

pytestmark = pytest.mark.isa  # depends on the CPU's ISA: CI reruns it as on an AVX2-only CPU


@pytest.fixture(scope="module")
def photos(fashion_dir):
    ids = ["1563", "1580", "1584", "1595"]
    return [str(fashion_dir / "images" / f"{i}.jpg") for i in ids]


def test_shape_dtype_and_unit_norm(tiny_model, photos):
    texts = ["women black heels", None, "Turtle Check Men Navy Blue Shirt"]
    images = [None, photos[0], photos[1]]
    for tower in (tiny_model.query_tower, tiny_model.item_tower):
        vecs = tower.encode(texts, images)
        assert vecs.shape == (3, tiny_model.dim) and vecs.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_mixed_batch_equals_each_sample_alone(tiny_model, photos):
    texts = ["a", None, "blue denim jacket for men with a very long title " * 3, None, "red heels", "x y z"]
    images = [None, photos[0], photos[1], open(photos[2], "rb").read(), Image.open(photos[3]), None]
    batch = tiny_model.item_tower.encode(texts, images, batch_size=4)
    for i in range(len(texts)):
        alone = tiny_model.item_tower.encode([texts[i]], [images[i]])
        np.testing.assert_allclose(batch[i], alone[0], atol=1e-5)


def test_text_only_batch_never_runs_image_backbone(tiny_model):
    image_calls = tiny_model.backbones.image.calls
    text_calls = tiny_model.backbones.text.calls
    tiny_model.query_tower.encode(["black leather wallet", "red heels"], [None, None])
    assert tiny_model.backbones.image.calls == image_calls
    assert tiny_model.backbones.text.calls == text_calls + 1


def test_image_only_batch_never_runs_text_backbone(tiny_model, photos):
    text_calls = tiny_model.backbones.text.calls
    tiny_model.query_tower.encode(None, photos[:2])
    assert tiny_model.backbones.text.calls == text_calls


def test_views_ignore_the_other_modality(tiny_model, photos):
    tower = tiny_model.item_tower
    text_view = tower.encode(["navy shirt"], [photos[0]], view="text")
    text_only = tower.encode(["navy shirt"], [None])
    np.testing.assert_allclose(text_view, text_only, atol=1e-6)
    image_view = tower.encode(["navy shirt"], [photos[0]], view="image")
    image_only = tower.encode([None], [photos[0]])
    np.testing.assert_allclose(image_view, image_only, atol=1e-6)
    fused = tower.encode(["navy shirt"], [photos[0]])
    assert not np.allclose(fused, text_only, atol=1e-4) and not np.allclose(fused, image_only, atol=1e-4)


def test_query_and_item_towers_have_separate_fusion_heads(tiny_model):
    q = tiny_model.query_tower.encode(["red heels"], [None])
    i = tiny_model.item_tower.encode(["red heels"], [None])
    assert not np.allclose(q, i)


def test_preprocessed_tensor_image_equals_decoded_image(tiny_model, photos):
    from engine.model.images import load_image

    pixels = tiny_model.backbones.image.preprocess(load_image(photos[0]))
    a = tiny_model.item_tower.encode([None], [pixels])
    b = tiny_model.item_tower.encode([None], [photos[0]])
    np.testing.assert_array_equal(a, b)


def test_encode_tokens_is_differentiable(tiny_model):
    tower = tiny_model.query_tower
    b, h_t, h_v = 2, tiny_model.backbones.text.hidden_size, tiny_model.backbones.image.hidden_size
    g = torch.Generator().manual_seed(0)  # its own stream: independent of what ran before
    t = torch.randn(b, 5, h_t, generator=g).requires_grad_()
    v = torch.randn(b, 17, h_v, generator=g)
    out = tower.encode_tokens(t, torch.ones(b, 5, dtype=torch.bool), v, torch.ones(b, 17, dtype=torch.bool),
                              torch.tensor([True, True]), torch.tensor([True, False]))
    # a random projection: the plain sum of unit rows has a near-zero gradient
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    assert out.shape == (b, tiny_model.dim) and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


@pytest.mark.parametrize("texts,images,error,index", [
    (["ok", None], ["PHOTO", None], EmptySampleError, 1),
    (["ok", "   "], [None, None], BlankTextError, 1),
    ([""], [None], BlankTextError, 0),
    ([None, "fine"], [b"not a jpeg at all", None], ImageDecodeError, 0),
    (["a", None], [None, "/no/such/file.jpg"], ImageDecodeError, 1),
])
def test_bad_input_raises_a_specific_error_naming_the_sample(tiny_model, photos, texts, images, error, index):
    images = [photos[0] if im == "PHOTO" else im for im in images]
    with pytest.raises(error) as info:
        tiny_model.query_tower.encode(texts, images)
    assert info.value.index == index and f"sample {index}" in str(info.value)


def test_truncated_jpeg_is_an_image_decode_error(tiny_model, photos):
    data = open(photos[0], "rb").read()
    with pytest.raises(ImageDecodeError) as info:
        tiny_model.item_tower.encode(["t", None], [None, data[: len(data) // 3]])
    assert info.value.index == 1


def test_image_over_pixel_limit_is_rejected_before_decoding(tiny_model):
    buf = io.BytesIO()
    Image.new("RGB", (3000, 3000), "white").save(buf, format="PNG")
    with pytest.raises(ImageTooLargeError) as info:
        tiny_model.query_tower.encode([None], [buf.getvalue()], max_pixels=4_000_000)
    assert info.value.index == 0 and "9000000 pixels" in str(info.value)


def test_mismatched_lengths_and_unknown_view(tiny_model):
    with pytest.raises(ValueError, match="differ in length"):
        tiny_model.query_tower.encode(["a", "b"], [None])
    with pytest.raises(ValueError, match="unknown view"):
        tiny_model.query_tower.encode(["a"], [None], view="audio")
    with pytest.raises(EmptySampleError, match="view 'image'"):
        tiny_model.item_tower.encode(["a"], [None], view="image")


def test_bf16_precision_stays_close_to_fp32(tiny_model, photos):
    texts, images = ["women black heels", None, "navy shirt"], [None, photos[0], photos[1]]
    fp32 = tiny_model.query_tower.encode(texts, images)
    bf16 = tiny_model.query_tower.encode(texts, images, precision="bf16")
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(bf16, axis=1), 1.0, atol=1e-3)
    assert float((fp32 * bf16).sum(1).min()) > 0.99
    with pytest.raises(ValueError, match="unknown precision"):
        tiny_model.query_tower.encode(texts, images, precision="fp8")


def test_gate_presence_input_acts_as_a_bias(tiny_model):
    """The gates only ever see e = 1 (cross-attention runs on rows with both modalities), so
    moving weight between the e column and the bias leaves every output unchanged: the gate
    does not learn presence (engine/model/fusion.py docstring)."""
    import copy

    fusion = copy.deepcopy(tiny_model.query_tower.fusion).eval()
    g = torch.Generator().manual_seed(3)
    b, h_t, h_v = 3, tiny_model.backbones.text.hidden_size, tiny_model.backbones.image.hidden_size
    args = (torch.randn(b, 5, h_t, generator=g), torch.ones(b, 5, dtype=torch.bool),
            torch.randn(b, 7, h_v, generator=g), torch.ones(b, 7, dtype=torch.bool),
            torch.tensor([True, True, False]), torch.tensor([True, False, True]))
    before = fusion(*args)
    with torch.no_grad():
        for layer in fusion.cross:
            for gate in (layer.gate_v, layer.gate_t):
                shift = torch.randn(gate.out_features, generator=g)
                gate.weight[:, -1] += shift
                gate.bias -= shift
    assert torch.allclose(fusion(*args), before, atol=1e-5)
