"""Production path: a Hugging Face CLIP-family checkpoint folder as both backbones
(tiny random CLIPModel and SiglipModel configs, loaded through AutoModel from disk)."""
from __future__ import annotations

import numpy as np
import pytest

from engine.model.model_folder import load_model, save_model
from engine.model.towers import ModelConfig, build_model
from tests.tiny_models import make_tiny_clip

pytestmark = pytest.mark.isa  # depends on the CPU's ISA: CI reruns it as on an AVX2-only CPU


@pytest.mark.parametrize("family,image_tokens", [("clip", 17), ("siglip", 16)])
def test_clip_family_checkpoint_as_both_backbones(family, image_tokens, tmp_path, fashion_dir):
    folder = make_tiny_clip(tmp_path / family, family=family)
    config = ModelConfig(dim=32, heads=4, cross_layers=1, self_layers=1, fusion_layers=1,
                         text_backbone={"type": "hf_clip", "path": str(folder)},
                         image_backbone={"type": "hf_clip", "path": str(folder)})
    model = build_model(config)
    tokens, mask = model.backbones.text.encode(["women black heels", "a"])
    assert tokens.shape[0] == 2 and tokens.shape[2] == 32 and mask[1].sum() < mask[0].sum()
    photo = str(fashion_dir / "images" / "1580.jpg")
    from engine.model.images import load_image

    pixels = model.backbones.image.preprocess(load_image(photo))
    assert tuple(pixels.shape) == (3, 32, 32)
    image_tokens_out, image_mask = model.backbones.image.encode(pixels[None])
    assert image_tokens_out.shape == (1, image_tokens, 32) and image_mask.all()
    vecs = model.item_tower.encode(["women black heels", None, "swimsuit"], [None, photo, photo])
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    save_model(model, tmp_path / "model")
    again = load_model(tmp_path / "model")
    np.testing.assert_array_equal(again.item_tower.encode(["swimsuit"], [photo]),
                                  model.item_tower.encode(["swimsuit"], [photo]))
    np.testing.assert_allclose(again.item_tower.encode(["swimsuit"], [photo]), vecs[2:3], atol=1e-5)
