"""The text-private block (engine/model/private_block.py, modality "text"): exact photo rankings,
text scores, graphs, model folders, attaching it to a trained model and its fit in the training job."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.model.model_folder import load_model, save_model
from engine.model.towers import ModelConfig
from engine.training.job import TrainingDataError, train_model
from engine.training.whitening import attach_private
from tests.test_private_block import TEXTS, encode_items, mini, set_random_projection  # noqa: F401  (mini: fixture)
from tests.test_towers import photos  # noqa: F401  (fixture: four real catalogue photos)
from tests.tiny_models import make_tiny_model, tiny_config, tiny_train_job

Q = 6  # text block width of the tiny models (text backbone width 32)
D = 32  # fused width of the tiny models


def _with_text_block(tiny_backbone_dir, seed=3, gains=(0.5, 0.0, 0.25), item_gain=1.0, **extra):
    model = make_tiny_model(tiny_backbone_dir, seed=seed, text_private_dim=Q, text_private_query_gains=list(gains),
                            text_private_item_gain=item_gain, **extra)
    set_random_projection(model, "text_private", seed)
    return model


def test_photo_rankings_are_those_of_the_fused_vector_alone(tiny_backbone_dir, photos):
    plain = make_tiny_model(tiny_backbone_dir, seed=3)  # same draws: the block has no parameters
    model = _with_text_block(tiny_backbone_dir, item_gain=1.5)
    item_texts, item_images, items, items_plain = encode_items(model, plain, photos, Q)
    queries = model.query_tower.encode(None, photos, use_graphs=False)
    assert np.all(queries[:, D:] == 0)
    np.testing.assert_allclose(queries[:, :D], plain.query_tower.encode(None, photos, use_graphs=False), atol=1e-6)
    np.testing.assert_allclose(queries @ items.T, (queries[:, :D] @ items_plain.T) / np.sqrt(1 + 1.5 ** 2), atol=1e-5)
    tail = items[:, D:]
    no_text = np.array([x is None for x in item_texts])
    np.testing.assert_allclose(tail[no_text, -1], 1.5 / np.sqrt(1 + 1.5 ** 2), atol=1e-6)  # e_null
    assert np.all(tail[~no_text, -1] == 0) and np.all(tail[no_text, :-1] == 0)


def test_text_queries_add_the_whitened_text_match_with_their_gain(tiny_backbone_dir, photos):
    model = _with_text_block(tiny_backbone_dir, gains=(0.5, 0.0, 0.25))
    only = model.query_tower.encode(TEXTS[:2], None, use_graphs=False)
    both = model.query_tower.encode(TEXTS[:2], photos[:2], use_graphs=False)
    np.testing.assert_allclose(np.linalg.norm(only[:, D:], axis=1), 0.5 / np.sqrt(1.25), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(both[:, D:], axis=1), 0.25 / np.sqrt(1 + 0.25 ** 2), atol=1e-5)
    # the same text gives the same direction with or without a photo
    np.testing.assert_allclose(only[:, D:] / np.linalg.norm(only[:, D:], axis=1, keepdims=True),
                               both[:, D:] / np.linalg.norm(both[:, D:], axis=1, keepdims=True), atol=1e-5)
    item = model.item_tower.encode(TEXTS[:1], None, use_graphs=False)[0]
    np.testing.assert_allclose(only[0] @ item, only[0, :D] @ item[:D] + 0.5 / np.sqrt(1.25) / np.sqrt(2), atol=1e-5)


def check_graphs_and_folder(make_model, width: int, photos, tmp_path):
    """A fresh ``make_model()`` per backend: its TorchScript and ONNX Runtime query graphs give the
    Python vectors (``width`` wide) of text, photo and text + photo batches, and so does the model
    folder it saves. Returns ``(the last model, the loaded model)``."""
    from server.tower_backend import plan_tower, prepare_query_tower

    batches = {"text": (TEXTS, None), "image": (None, photos[:3]), "text+image": (TEXTS[:3], photos[:3])}
    for backend in ("torchscript", "onnxruntime"):
        model = make_model()
        tower = model.query_tower
        expected = {k: tower.encode(*v, use_graphs=False) for k, v in batches.items()}
        assert expected["text"].shape == (len(TEXTS), width)
        prepare_query_tower(model, plan_tower("fp32", backend), threads=1)
        assert tower.graphs, backend
        for kind, args in batches.items():
            np.testing.assert_allclose(tower.encode(*args), expected[kind], atol=2e-5, err_msg=f"{backend} {kind}")
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.dim == width
    for kind, args in batches.items():
        np.testing.assert_allclose(loaded.query_tower.encode(*args, use_graphs=False), expected[kind], atol=1e-6)
    return model, loaded


def test_both_blocks_in_graphs_and_model_folders_give_the_python_vectors(tiny_backbone_dir, photos, tmp_path):
    def make():
        model = _with_text_block(tiny_backbone_dir, image_private_dim=8)
        set_random_projection(model, "private", 5)
        return model

    check_graphs_and_folder(make, D + 8 + Q, photos, tmp_path)


def test_attaching_keeps_every_trained_weight_and_an_existing_image_block(tiny_backbone_dir):
    trained = make_tiny_model(tiny_backbone_dir, seed=4, image_private_dim=8)
    set_random_projection(trained, "private", 1)
    config = ModelConfig(**{**trained.config.to_dict(), "text_private_dim": Q})
    new = attach_private(trained, config)
    before, after = trained.state_dict(), new.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(set(after) - set(before)) == sorted(
        f"{t}.fusion.text_private.{b}" for t in ("query_tower", "item_tower") for b in ("weight", "bias", "gains"))
    with pytest.raises(ValueError, match="no block to attach"):
        attach_private(make_tiny_model(tiny_backbone_dir), tiny_config(tiny_backbone_dir))


def test_bad_text_block_settings_are_refused():
    from engine.training.cli import _private_config

    with pytest.raises(ValueError, match="image-only text-private gain must be 0"):
        ModelConfig(text_private_dim=8, text_private_query_gains=[0.4, 1.0, 0.2])
    made = _private_config("auto", "0.4,0.2,1", "text")
    assert made == {"text_private_dim": 128, "text_private_query_gains": [0.4, 0.0, 0.2], "text_private_item_gain": 1.0}
    for dim, gains in (("1", "0.4,0.2,1"), ("x", "0.4,0.2,1"), ("16", "0.4")):
        with pytest.raises(ValueError, match="--text-private"):
            _private_config(dim, gains, "text")


def _job(root, catalog, backbone_dir, name, dim, auto=False, brand=1.0):
    return tiny_train_job(root, catalog, backbone_dir, name, {"text_private_dim": dim}, brand_query_rate=brand,
                          partial_title_rate=brand, text_private_auto=auto, attribute_query_rate=0.0, similar_rate=0.0)


def test_training_fits_the_text_block_on_the_typed_queries_or_says_why_not(mini, tiny_backbone_dir):
    from engine.training.job import load_products
    from engine.training.pairs import shopper_pairs

    root, catalog = mini
    summary = train_model(_job(root, catalog, tiny_backbone_dir, "fit", Q))
    info = summary["text_private_block"]
    # the fit's pairs: the typed queries (brand + type, partial titles), never a title against itself
    products, _ = load_products(str(catalog), "train", None)
    titles = {p.product_id: p.title for p in products}
    typed = [q for q in shopper_pairs(products, 0, brand_query_rate=1.0, partial_title_rate=1.0)
             if q.query_text != titles[q.item_id]]
    assert info["pairs"] == len(typed) > Q and info["dim"] == Q and info["fitted"] == "after training"
    assert info["query_gains"] == pytest.approx([0.8, 0.0, 0.4]) and info["item_gain"] == 0.5
    model = load_model(root / "fit")
    block = model.item_tower.fusion.text_private
    assert float(block.weight.abs().sum()) > 0
    assert torch.equal(block.weight, model.query_tower.fusion.text_private.weight)
    assert model.item_tower.fusion.private is None and model.dim == 32 + Q
    with pytest.raises(TrainingDataError, match="0 typed text queries, fewer than the 5 dimensions"):
        train_model(_job(root, catalog, tiny_backbone_dir, "none", Q, brand=0.0))
    with pytest.raises(TrainingDataError, match="text backbone has 32 features, fewer than the 33"):
        train_model(_job(root, catalog, tiny_backbone_dir, "wide", 34))
    fallback = train_model(_job(root, catalog, tiny_backbone_dir, "auto", Q, auto=True, brand=0.0))
    assert fallback["text_private_block"]["dim"] == 0 and "fewer than" in fallback["text_private_block"]["reason"]
    assert load_model(root / "auto").dim == 32
