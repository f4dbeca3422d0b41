"""The cross-modal block (engine/model/cross_block.py) and its closed-form fit
(engine/training/cross_fit.py): canonical correlation on known data, rankings over items with both
modalities unchanged, the slots, graphs, model folders and the fit in the training job."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.model.model_folder import load_model
from engine.training.cross_fit import canonical_correlation, product_pairs
from engine.training.job import TrainingDataError, train_model
from tests.test_private_block import TEXTS, mini  # noqa: F401  (mini: fixture)
from tests.test_text_private_block import check_graphs_and_folder
from tests.test_towers import photos  # noqa: F401  (fixture: four real catalogue photos)
from tests.tiny_models import make_tiny_model, tiny_train_job

C = 10  # block width of the tiny models: two slots of k = 4 and a null axis each (backbones 32 wide)
D = 32  # fused width of the tiny models


def _set_random_cca(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    block = model.query_tower.fusion.cross_modal
    ht, hi = block.text_weight.shape[1], block.image_weight.shape[1]
    values = (0.1 * torch.randn(ht, generator=g), torch.randn(block.k, ht, generator=g),
              torch.randn(hi, generator=g), torch.randn(block.k, hi, generator=g))
    for tower in (model.query_tower, model.item_tower):
        tower.fusion.cross_modal.set_projection(*values)


def _with_cross(tiny_backbone_dir, seed=3, gains=(0.6, 0.3, 0.5), item_gain=1.5, **extra):
    model = make_tiny_model(tiny_backbone_dir, seed=seed, cross_dim=C, cross_query_gains=list(gains),
                            cross_item_gain=item_gain, **extra)
    _set_random_cca(model, seed)
    return model


def test_canonical_correlation_finds_the_shared_directions():
    rng = np.random.default_rng(0)
    n = 4000
    z = rng.normal(size=(n, 2))  # two latent factors seen by both views
    x = z @ rng.normal(size=(2, 10)) + 0.3 * rng.normal(size=(n, 10))
    y = z @ rng.normal(size=(2, 14)) + 0.3 * rng.normal(size=(n, 14)) + 5.0
    mu_x, w_x, mu_y, w_y, corr = canonical_correlation(x, y, 3, reg=0.0)
    assert w_x.shape == (3, 10) and w_y.shape == (3, 14) and corr.shape == (3,)
    np.testing.assert_allclose(mu_y, y.mean(0))
    assert corr[0] > 0.95 and corr[1] > 0.9 and corr[2] < 0.15  # two shared factors, then noise
    u, v = (x - mu_x) @ w_x.T, (y - mu_y) @ w_y.T
    for j in range(3):  # the variates of a pair correlate by the canonical correlation, unit variance
        np.testing.assert_allclose(np.corrcoef(u[:, j], v[:, j])[0, 1], corr[j], atol=1e-6)
        np.testing.assert_allclose([u[:, j].var(), v[:, j].var()], [1.0, 1.0], atol=1e-6)
    for bad in ((x[:1], y[:1], 1, 0.1), (x, y[:-1], 1, 0.1), (x, y, 11, 0.1), (x, y, 1, -0.5)):
        with pytest.raises(ValueError):
            canonical_correlation(*bad)


def test_items_with_both_modalities_rank_as_without_the_block(tiny_backbone_dir, photos):
    plain = make_tiny_model(tiny_backbone_dir, seed=3)  # same draws: the block has no parameters
    model = _with_cross(tiny_backbone_dir)
    items = model.item_tower.encode(TEXTS, photos, use_graphs=False)
    items_plain = plain.item_tower.encode(TEXTS, photos, use_graphs=False)
    assert items.shape == (4, D + C)
    k = model.item_tower.fusion.cross_modal.k
    null = [D + k, D + 2 * k + 1]  # e_null: both null axes
    np.testing.assert_allclose(items[:, null], 1.5 / np.sqrt(2 * (1 + 1.5 ** 2)), atol=1e-6)
    assert np.all(np.delete(items[:, D:], [k, 2 * k + 1], axis=1) == 0)
    for gain, (texts, images) in zip((0.6, 0.3, 0.5), ((TEXTS, None), (None, photos), (TEXTS, photos))):
        queries = model.query_tower.encode(texts, images, use_graphs=False)
        assert np.all(queries[:, null] == 0)  # no query uses e_null
        plain_q = plain.query_tower.encode(texts, images, use_graphs=False)
        np.testing.assert_allclose(queries @ items.T,
                                   (plain_q @ items_plain.T) / np.sqrt((1 + gain ** 2) * (1 + 1.5 ** 2)), atol=1e-5)


def test_the_slots_pair_each_modality_only_with_the_other(tiny_backbone_dir, photos):
    model = _with_cross(tiny_backbone_dir)
    q, it = model.query_tower, model.item_tower
    block = q.fusion.cross_modal
    t_q, v_q = q.encode(TEXTS, None, use_graphs=False), q.encode(None, photos, use_graphs=False)
    t_i, v_i = it.encode(TEXTS, None, use_graphs=False), it.encode(None, photos, use_graphs=False)
    k = block.k
    # slot A: text queries and photo-only items; slot B: photo queries and title-only items; null axes unused
    assert np.all(t_q[:, D + k:] == 0) and np.all(v_q[:, D:D + k + 1] == 0) and np.all(v_q[:, -1] == 0)
    assert np.all(t_i[:, D:D + k + 1] == 0) and np.all(v_i[:, D + k:] == 0) and np.all(t_i[:, -1] == 0)
    # a text query meets title-only items (t2t) and a photo query photo-only items (i2i) through F alone
    np.testing.assert_allclose(t_q @ t_i.T, t_q[:, :D] @ t_i[:, :D].T, atol=1e-6)
    np.testing.assert_allclose(v_q @ v_i.T, v_q[:, :D] @ v_i[:, :D].T, atol=1e-6)
    # and the other modality's items through F plus the canonical variates' cosine
    with torch.no_grad():
        tokens = model.backbones.text.encode(TEXTS)
        mean = (tokens[0] * tokens[1].unsqueeze(-1)).sum(1) / tokens[1].sum(1, keepdim=True)
        c_t = block.text_variates(mean).numpy()
    np.testing.assert_allclose(t_q[:, D:D + k] / np.linalg.norm(t_q[:, D:D + k], axis=1, keepdims=True), c_t,
                               atol=1e-5)
    extra = t_q @ v_i.T - t_q[:, :D] @ v_i[:, :D].T
    c_v = v_i[:, D:D + k] / np.linalg.norm(v_i[:, D:D + k], axis=1, keepdims=True)
    norm_q, norm_i = np.linalg.norm(t_q[:, D:], axis=1), np.linalg.norm(v_i[:, D:], axis=1)
    np.testing.assert_allclose(extra, (c_t @ c_v.T) * norm_q[:, None] * norm_i[None], atol=1e-5)
    assert np.abs(extra).max() > 1e-3


def test_graphs_and_model_folders_give_the_python_vectors(tiny_backbone_dir, photos, tmp_path):
    model, loaded = check_graphs_and_folder(
        lambda: _with_cross(tiny_backbone_dir, share_fusion=True, image_private_dim=8), D + 8 + C, photos, tmp_path)
    items = model.item_tower.encode(TEXTS, None, use_graphs=False)
    assert loaded.query_tower.fusion.cross_modal.gains.tolist() == pytest.approx([0.6, 0.3, 0.5])
    assert loaded.item_tower.fusion.cross_modal.gains.tolist() == pytest.approx([1.5] * 3)
    np.testing.assert_allclose(loaded.item_tower.encode(TEXTS, None, use_graphs=False), items, atol=1e-6)


def test_bad_cross_block_settings_are_refused(tiny_backbone_dir):
    from engine.training.cli import _cross_config

    assert _cross_config("auto", "0.6,0.3,0.42,1") == {"cross_dim": 256, "cross_query_gains": [0.6, 0.3, 0.42],
                                                      "cross_item_gain": 1.0}
    assert _cross_config("0", "1,1,1,1")["cross_dim"] == 0
    for dim, gains in (("9", "1,1,1,1"), ("2", "1,1,1,1"), ("x", "1,1,1,1"), ("10", "1,1,1"), ("10", "1,-1,1,1")):
        with pytest.raises(ValueError, match="--cross-modal"):
            _cross_config(dim, gains)
    with pytest.raises(ValueError, match="even dim"):
        make_tiny_model(tiny_backbone_dir, cross_dim=9)


def _job(root, catalog, backbone_dir, name, dim, auto=False):
    return tiny_train_job(root, catalog, backbone_dir, name, {"cross_dim": dim}, cross_auto=auto)


def test_training_fits_the_block_on_titles_and_phrases_or_says_why_not(mini, tiny_backbone_dir):
    from engine.training.job import load_products

    root, catalog = mini
    summary = train_model(_job(root, catalog, tiny_backbone_dir, "fit", C))
    info = summary["cross_block"]
    products, _ = load_products(str(catalog), "train", None)
    titles, phrases = product_pairs(products)
    assert len(phrases) > 0 and info["pairs"] == len(titles) + len(phrases)
    assert info["dim"] == C and info["fitted"] == "after training" and 1.0 >= info["correlations"][0] > 0
    assert info["query_gains"] == pytest.approx([0.6, 0.3, 0.42]) and info["item_gain"] == 1.0
    model = load_model(root / "fit")
    block = model.item_tower.fusion.cross_modal
    assert float(block.text_weight.abs().sum()) > 0 and float(block.image_weight.abs().sum()) > 0
    assert torch.equal(block.image_weight, model.query_tower.fusion.cross_modal.image_weight)
    assert model.dim == D + C
    with pytest.raises(TrainingDataError, match="backbone has 32 features, fewer than the 33 canonical"):
        train_model(_job(root, catalog, tiny_backbone_dir, "wide", 68))
    fallback = train_model(_job(root, catalog, tiny_backbone_dir, "auto", 68, auto=True))
    assert fallback["cross_block"]["dim"] == 0 and "fewer than" in fallback["cross_block"]["reason"]
    assert load_model(root / "auto").dim == D
