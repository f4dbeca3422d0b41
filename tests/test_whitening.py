"""Learned whitening of pooled image features (engine/training/whitening.py)."""
import numpy as np
import pytest

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
