"""Learned whitening of pooled image features (engine/training/whitening.py)."""
import numpy as np
import pytest

from pathlib import Path

from engine.training.whitening import learned_whitening


def _nearest_is_self(queries: np.ndarray, pool: np.ndarray) -> float:
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    p = pool / np.linalg.norm(pool, axis=1, keepdims=True)
    return float(((q @ p.T).argmax(axis=1) == np.arange(len(pool))).mean())


def _photos(rng, n: int, h: int = 64, nuisance: int = 8, scale: float = 8.0):
    """Clean features plus views that move along a few fixed 'augmentation' directions."""
    basis = np.linalg.qr(rng.normal(size=(h, nuisance)))[0]  # (h, nuisance)
    clean = rng.normal(size=(n, h)) + 5.0
    def view():
        return clean + scale * rng.normal(size=(n, nuisance)) @ basis.T + 0.05 * rng.normal(size=(n, h))
    return clean, view


def test_whitening_damps_the_directions_augmentation_moves_along():
    rng = np.random.default_rng(0)
    clean, view = _photos(rng, 400)
    weight, bias = learned_whitening(clean, np.stack([view(), view()]), dim=48)
    assert weight.shape == (48, 64) and bias.shape == (48,) and weight.dtype == np.float32
    queries = view()  # fresh views, not those the projection was fitted on
    raw = _nearest_is_self(queries, clean)
    whitened = _nearest_is_self(queries @ weight.T + bias, clean @ weight.T + bias)
    assert whitened > raw + 0.2, (raw, whitened)  # printed on failure
    assert whitened > 0.95


def test_whitening_centres_the_clean_features():
    rng = np.random.default_rng(1)
    clean, view = _photos(rng, 200)
    weight, bias = learned_whitening(clean, view()[None], dim=16)
    projected = clean @ weight.T + bias
    np.testing.assert_allclose(projected.mean(axis=0), 0.0, atol=1e-3)


@pytest.mark.parametrize("views, dim, shrinkage, message", [
    (np.zeros((2, 10, 8)), 4, 0.4, "views must be"),
    (np.zeros((1, 20, 8)), 9, 0.4, "dim must lie"),
    (np.zeros((1, 20, 8)), 4, 0.0, "shrinkage must be"),
])
def test_whitening_rejects_bad_input(views, dim, shrinkage, message):
    with pytest.raises(ValueError, match=message):
        learned_whitening(np.zeros((20, 8)), views, dim, shrinkage)


def test_training_starts_the_image_residual_from_the_learned_whitening(fashion_dir, tiny_backbone_dir, tmp_path):
    """A real (tiny) training job on catalogue photos: with the projection frozen, the saved towers
    carry exactly the whitening of the cached clean and augmented tokens, in both towers."""
    from engine.model.model_folder import load_model
    from engine.tokens.cache import open_table
    from engine.tokens.augment_cache import augmented_key
    from engine.training.job import TrainJob, train_model
    from engine.training.trainer import TrainConfig
    from engine.training.whitening import pooled_means
    from tests.test_train import _mini_fashion
    from tests.tiny_models import tiny_config

    catalog = _mini_fashion(fashion_dir, tmp_path / "fashion", n=60)
    job = TrainJob(catalog=str(catalog), out=str(tmp_path / "model"), cache_dir=str(tmp_path / "cache"),
                   progress=False, model=tiny_config(tiny_backbone_dir, dim=16, pooled_residual=True),
                   augment_views=2, image_residual_init="whitening", freeze_image_residual=True, image_residual_gain=2.0,
                   linear_baseline=False,
                   train=TrainConfig(steps=2, stage1_steps=1, batch_size=16, checkpoint_every=100, seed=0))
    summary = train_model(job)
    init = summary["image_residual_init"]
    assert init["frozen"] and init["views"] == 2 and init["dim"] == 16 and init["photos"] >= 16
    assert init["gain"] == 2.0
    images = open_table(Path(summary["image_cache"]["folder"]))
    aug = open_table(Path(summary["augmented_image_cache"]["folder"]))
    photos = sorted({k.rsplit("#aug", 1)[0] for k in aug.keys})
    clean = pooled_means(images, images.rows(photos))
    views = np.stack([pooled_means(aug, aug.rows([augmented_key(p, v) for p in photos])) for v in range(2)])
    weight, bias = learned_whitening(clean, views, 16)
    model = load_model(job.out)
    for tower in (model.query_tower, model.item_tower):
        np.testing.assert_allclose(tower.fusion.image_residual.weight.detach().numpy(), weight, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(tower.fusion.image_residual.bias.detach().numpy(), bias, rtol=1e-4, atol=1e-5)
        assert abs(float(tower.fusion.residual_gain[1]) - 2.0) < 0.05  # the gain trains: 2 steps move it little


def test_whitening_needs_augmented_views():
    from engine.training.job import TrainJob

    with pytest.raises(ValueError, match="needs augmented views"):
        TrainJob(catalog="c", out="o", image_residual_init="whitening", augment_views=0)


def test_auto_falls_back_to_random_with_too_few_photos_and_whitening_refuses(fashion_dir, tiny_backbone_dir,
                                                                             tmp_path):
    from engine.training.job import TrainingDataError, TrainJob, train_model
    from engine.training.trainer import TrainConfig
    from tests.test_train import _mini_fashion
    from tests.tiny_models import tiny_config

    catalog = _mini_fashion(fashion_dir, tmp_path / "fashion", n=60)

    def job(init: str, out: str) -> TrainJob:
        return TrainJob(catalog=str(catalog), out=str(tmp_path / out), cache_dir=str(tmp_path / "cache"),
                        progress=False, model=tiny_config(tiny_backbone_dir, dim=16, pooled_residual=True),
                        augment_views=1, augment_fraction=0.1, image_residual_init=init, linear_baseline=False,
                        train=TrainConfig(steps=1, stage1_steps=1, batch_size=16, checkpoint_every=100, seed=0))

    summary = train_model(job("auto", "auto"))
    assert summary["image_residual_init"]["init"] == "random"
    assert "fewer than the 16 dimensions" in summary["image_residual_init"]["reason"]
    with pytest.raises(TrainingDataError, match="fewer than the 16 dimensions"):
        train_model(job("whitening", "explicit"))
