"""The image-private block (engine/model/private_block.py): exact text rankings, photo scores,
graphs, model folders and its fit in the training job."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.model.images import load_image
from engine.model.model_folder import load_model, save_model
from engine.model.private_block import PrivateBlock
from engine.model.towers import ModelConfig
from engine.training.job import TrainingDataError, train_model
from tests.test_towers import photos  # noqa: F401  (fixture: four real catalogue photos)
from tests.test_train import _mini_fashion
from tests.tiny_models import make_tiny_model, tiny_train_job

TEXTS = ["black heels", "red kurta for women", "watch", "blue denim jeans"]
P = 8  # block width of the tiny models (image backbone width 32)


def set_random_projection(model, block: str, seed: int) -> None:
    """One seeded random projection for the ``block`` ("private": image, "text_private") of both towers."""
    g = torch.Generator().manual_seed(seed)
    shape = getattr(model.query_tower.fusion, block).weight.shape
    weight, bias = torch.randn(*shape, generator=g), torch.randn(shape[0], generator=g)
    for tower in (model.query_tower, model.item_tower):
        getattr(tower.fusion, block).set_projection(weight, bias)


def _with_block(tiny_backbone_dir, seed=3, gains=(0.0, 3.0, 1.0), item_gain=1.0):
    model = make_tiny_model(tiny_backbone_dir, seed=seed, image_private_dim=P,
                            image_private_query_gains=list(gains), image_private_item_gain=item_gain)
    set_random_projection(model, "private", seed)
    return model


def encode_items(model, plain, photos, width: int):
    """Six items (text + photo, photo only, text only) through ``model``'s and ``plain``'s item
    towers: ``(texts, images, items, items_plain)``; checks ``items`` are unit rows of 32 + ``width``."""
    item_texts = ["black heels", None, "red kurta", "watch", None, "jeans"]
    item_images = [photos[0], photos[1], None, photos[2], photos[3], None]
    items = model.item_tower.encode(item_texts, item_images, use_graphs=False)
    items_plain = plain.item_tower.encode(item_texts, item_images, use_graphs=False)
    assert items.shape == (6, 32 + width) and np.allclose(np.linalg.norm(items, axis=1), 1.0, atol=1e-5)
    return item_texts, item_images, items, items_plain


def test_text_rankings_are_those_of_the_fused_vector_alone(tiny_backbone_dir, photos):
    plain = make_tiny_model(tiny_backbone_dir, seed=3)  # same draws: the block has no parameters
    model = _with_block(tiny_backbone_dir, item_gain=1.5)
    item_texts, item_images, items, items_plain = encode_items(model, plain, photos, P)
    queries = model.query_tower.encode(TEXTS, use_graphs=False)
    assert np.all(queries[:, 32:] == 0)
    np.testing.assert_allclose(queries[:, :32], plain.query_tower.encode(TEXTS, use_graphs=False), atol=1e-6)
    # every item, photo or not, keeps F at the scale 1 / sqrt(1 + b^2): text scores are F's, scaled
    np.testing.assert_allclose(queries @ items.T, (queries[:, :32] @ items_plain.T) / np.sqrt(1 + 1.5 ** 2), atol=1e-5)
    tail = items[:, 32:]
    no_photo = np.array([x is None for x in item_images])
    np.testing.assert_allclose(tail[no_photo, -1], 1.5 / np.sqrt(1 + 1.5 ** 2), atol=1e-6)  # e_null
    assert np.all(tail[~no_photo, -1] == 0) and np.all(tail[no_photo, :-1] == 0)


def test_photo_queries_add_the_whitened_photo_match_with_their_gain(tiny_backbone_dir, photos):
    model = _with_block(tiny_backbone_dir, gains=(0.0, 3.0, 0.5))
    only = model.query_tower.encode(None, photos[:2], use_graphs=False)
    both = model.query_tower.encode(["in red", "for men"], photos[:2], use_graphs=False)
    # the tail holds gain * unit(photo part) and the whole row is unit: tail norm = g / sqrt(1 + g^2)
    np.testing.assert_allclose(np.linalg.norm(only[:, 32:], axis=1), 3 / np.sqrt(10), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(both[:, 32:], axis=1), 0.5 / np.sqrt(1.25), atol=1e-5)
    np.testing.assert_allclose(only[:, 32:] / np.linalg.norm(only[:, 32:], axis=1, keepdims=True),
                               both[:, 32:] / np.linalg.norm(both[:, 32:], axis=1, keepdims=True), atol=1e-5)
    # one photo against itself: the block's share of the score is exact
    item = model.item_tower.encode(None, photos[:1], use_graphs=False)[0]
    score = only[0] @ item
    np.testing.assert_allclose(score, (only[0, :32] @ item[:32]) + 3 / np.sqrt(10) / np.sqrt(2), atol=1e-5)


def test_graphs_and_model_folders_give_the_python_vectors(tiny_backbone_dir, photos, tmp_path):
    from server.tower_backend import plan_tower, prepare_query_tower

    batches = {"text": (TEXTS, None), "image": (None, photos[:3]), "text+image": (TEXTS[:3], photos[:3])}
    for backend in ("torchscript", "onnxruntime"):
        model = _with_block(tiny_backbone_dir)
        tower = model.query_tower
        expected = {k: tower.encode(*v, use_graphs=False) for k, v in batches.items()}
        prepare_query_tower(model, plan_tower("fp32", backend), threads=1)
        assert tower.graphs, backend  # at least one kind runs as a graph
        for kind, args in batches.items():
            np.testing.assert_allclose(tower.encode(*args), expected[kind], atol=2e-5, err_msg=f"{backend} {kind}")
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.dim == 32 + P
    for kind, args in batches.items():
        np.testing.assert_allclose(loaded.query_tower.encode(*args, use_graphs=False), expected[kind], atol=1e-6)


def test_gem_block_whitens_the_generalised_mean_of_the_photo_tokens(tiny_backbone_dir, photos):
    """image_private_gem_p = 2: P is the whitened GeM (root of the mean of squares of the tokens
    clamped at 0), not the mean; the served graphs give the same vectors; the fit reads the same
    pooling (engine.training.whitening.pooled_means)."""
    from engine.model.fusion import gem_pool, masked_mean
    from server.tower_backend import plan_tower, prepare_query_tower

    model = make_tiny_model(tiny_backbone_dir, seed=3, image_private_dim=P, image_private_gem_p=2.0)
    set_random_projection(model, "private", 3)
    block = model.query_tower.fusion.private
    assert block.gem_p == 2.0 and model.item_tower.fusion.private.gem_p == 2.0
    only = model.query_tower.encode(None, photos[:3], use_graphs=False)
    image = model.backbones.image
    with torch.inference_mode():
        tokens, mask = image.encode(torch.stack([image.preprocess(load_image(p)) for p in photos[:3]]))
    def expected_tail(pooled):
        own = torch.nn.functional.normalize(pooled @ block.weight.T + block.bias, dim=-1)
        return torch.cat([own, torch.zeros(3, 1)], dim=-1).numpy() * 3 / np.sqrt(10)
    gem = ((tokens.clamp_min(0) ** 2 * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).sqrt()
    np.testing.assert_allclose(gem_pool(tokens, mask, 2.0).numpy(), gem.numpy(), atol=1e-6)
    np.testing.assert_allclose(only[:, 32:], expected_tail(gem), atol=1e-5)
    assert not np.allclose(only[:, 32:], expected_tail(masked_mean(tokens, mask)), atol=1e-3)
    prepare_query_tower(model, plan_tower("fp32", "onnxruntime"), threads=1)
    assert model.query_tower.graphs
    np.testing.assert_allclose(model.query_tower.encode(None, photos[:3]), only, atol=2e-5)
    with pytest.raises(ValueError, match="image_private_gem_p must be >= 1"):
        ModelConfig(image_private_dim=8, image_private_gem_p=0.5)


def test_bad_settings_are_refused(tiny_backbone_dir):
    with pytest.raises(ValueError, match="text-only image-private gain must be 0"):
        ModelConfig(image_private_dim=8, image_private_query_gains=[1.0, 3.0, 1.0])
    with pytest.raises(ValueError, match="dim >= 2"):
        PrivateBlock(32, 1, (0, 1, 1))
    with pytest.raises(ValueError, match=">= 0"):
        PrivateBlock(32, 8, (0, -1, 1))
    with pytest.raises(ValueError, match=r"projection must be \(7, 32\)"):
        PrivateBlock(32, 8, (0, 1, 1)).set_projection(np.zeros((8, 32)), np.zeros(8))
    from engine.training.cli import _private_config

    assert _private_config("auto", "3,0,1")["image_private_query_gains"] == [0.0, 3.0, 0.0]
    assert _private_config("0", "3,1,1")["image_private_dim"] == 0
    for dim, gains in (("1", "3,1,1"), ("x", "3,1,1"), ("16", "3,1")):
        with pytest.raises(ValueError, match="image-private"):
            _private_config(dim, gains)


@pytest.fixture(scope="module")
def mini(fashion_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("private")
    return root, _mini_fashion(fashion_dir, root / "fashion", n=60)


def _job(root, catalog, backbone_dir, name, dim, auto=False, gem_p=1.0):
    return tiny_train_job(root, catalog, backbone_dir, name, {"image_private_dim": dim, "image_private_gem_p": gem_p},
                          photo_query_rate=0.5, augment_views=1, image_private_auto=auto)


def test_training_fits_the_block_from_the_augmented_views_or_says_why_not(mini, tiny_backbone_dir):
    root, catalog = mini
    summary = train_model(_job(root, catalog, tiny_backbone_dir, "fit", P))
    info = summary["image_private_block"]
    assert info["dim"] == P and info["photos"] >= P - 1 and info["query_gains"] == [0.0, 3.0, 0.0]
    model = load_model(root / "fit")
    block = model.item_tower.fusion.private
    assert float(block.weight.abs().sum()) > 0
    assert torch.equal(block.weight, model.query_tower.fusion.private.weight)  # one projection, both towers
    assert info["fitted"] == "after training"
    # the towers trained without the block: text vectors are those of the same run without it
    train_model(_job(root, catalog, tiny_backbone_dir, "plain", 0))
    plain = load_model(root / "plain")
    np.testing.assert_allclose(model.query_tower.encode(TEXTS, use_graphs=False)[:, :32],
                               plain.query_tower.encode(TEXTS, use_graphs=False), atol=1e-6)
    photos = info["photos"]
    with pytest.raises(TrainingDataError, match=f"{photos} augmented photos, fewer than the 99 dimensions"):
        train_model(_job(root, catalog, tiny_backbone_dir, "big", 100))
    with pytest.raises(TrainingDataError, match="image backbone has 32 features, fewer than the 33"):
        train_model(_job(root, catalog, tiny_backbone_dir, "wide", 34))
    gem = train_model(_job(root, catalog, tiny_backbone_dir, "gem", P, gem_p=2.0))["image_private_block"]
    assert info["gem_p"] == 1.0 and gem["gem_p"] == 2.0 and gem["photos"] == photos
    gem_block = load_model(root / "gem").item_tower.fusion.private
    assert gem_block.gem_p == 2.0 and not torch.allclose(gem_block.weight, block.weight)  # fitted on GeM features
    fallback = train_model(_job(root, catalog, tiny_backbone_dir, "auto", 100, auto=True))
    assert fallback["image_private_block"]["dim"] == 0 and "fewer than" in fallback["image_private_block"]["reason"]
    assert load_model(root / "auto").dim == 32
