"""Closed-form fit of the cross-modal block (``engine.model.cross_block``; issue 12, our choice).

Regularised canonical correlation analysis (Hotelling, Biometrika 1936; ridge-regularised as in
Vinod, J. Econometrics 1976) of paired text and photo features ``X (n, Ht)``, ``Y (n, Hi)``:

1. centre both; ``C_xx``, ``C_yy`` their covariances, each shrunk towards a multiple of the
   identity (``reg`` times its mean eigenvalue; the 1,280 photo features outnumber a small
   catalogue's pairs), ``C_xy`` the cross-covariance;
2. ``C_xx^{-1/2} C_xy C_yy^{-1/2} = U S V^T`` (SVD);
3. ``W_x = U_k^T C_xx^{-1/2}``, ``W_y = V_k^T C_yy^{-1/2}``: the ``k`` leading canonical directions, so
   that ``W_x x`` and ``W_y y`` of a pair are as correlated as a linear map can make them.

The features are the ones the block reads: the unit masked mean of the raw text tokens
(the sentence embedding of MiniLM) and the GeM of the raw photo tokens. The pairs are each
training product's photo with its title and with its attribute phrase (gender, colour and type:
the phrase keeps the canonical directions on what a typed query names, not only on the words of
one title; measured in docs/results.md "The cross-modal block").
"""
from __future__ import annotations

import numpy as np

from engine.tokens.cache import TokenTable
from engine.training.whitening import pooled_means

DEFAULT_REG = 0.1  # our choice (0.1 and 0.3 within a point of each other; 1.0 loses 4 points of t2i Recall@1)


def canonical_correlation(x: np.ndarray, y: np.ndarray, k: int, reg: float = DEFAULT_REG):
    """Regularised CCA of paired rows (module docstring).

    Args:
        x: float ``(n, Hx)``; y: float ``(n, Hy)``, row ``i`` of each a pair. k: directions kept,
            ``1 <= k <= min(Hx, Hy)``. reg: shrinkage of each covariance, ≥ 0, times its mean eigenvalue.
    Returns:
        ``(mu_x (Hx,), W_x (k, Hx), mu_y (Hy,), W_y (k, Hy), correlations (k,))``, float64: the
        canonical variates are ``W_x (x - mu_x)`` and ``W_y (y - mu_y)``; ``correlations`` are the
        singular values of step 2 (the canonical correlations of the regularised problem, descending).
    Raises:
        ValueError: different row counts, fewer than 2 pairs, ``k`` out of range or ``reg < 0``.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ValueError(f"x and y must be 2-d with one row per pair, got {x.shape} and {y.shape}")
    if len(x) < 2:
        raise ValueError(f"canonical correlation needs at least 2 pairs, got {len(x)}")
    if not 1 <= k <= min(x.shape[1], y.shape[1]):
        raise ValueError(f"k must be in [1, {min(x.shape[1], y.shape[1])}], got {k}")
    if reg < 0:
        raise ValueError(f"reg must be >= 0, got {reg}")
    mu_x, mu_y = x.mean(0), y.mean(0)
    x0, y0 = x - mu_x, y - mu_y
    n = len(x)

    def inv_sqrt(c: np.ndarray) -> np.ndarray:
        c = c + reg * np.trace(c) / len(c) * np.eye(len(c))
        w, v = np.linalg.eigh(c)
        w = np.maximum(w, 1e-12 * max(float(w.max()), 1e-300))
        return (v * w ** -0.5) @ v.T

    wx, wy = inv_sqrt(x0.T @ x0 / n), inv_sqrt(y0.T @ y0 / n)
    u, s, vt = np.linalg.svd(wx @ (x0.T @ y0 / n) @ wy)
    return mu_x, u[:, :k].T @ wx, mu_y, vt[:k] @ wy, s[:k]


def text_features(texts: TokenTable, rows: np.ndarray) -> np.ndarray:
    """What ``engine.model.cross_block.CrossBlock.text_variates`` projects, for cached rows (≥ 0):
    the unit masked mean of the text tokens, float64 ``(n, Ht)``."""
    x = pooled_means(texts, rows)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def init_cross_block(model, segments, *, reg: float = DEFAULT_REG) -> dict:
    """Fit the cross-modal block of both towers on (text, photo) pairs; the block is never trained.

    segments: ``[(texts, pair_texts, images, pair_images), ...]``: ``pair_texts[i]`` (a title or a
    typed phrase, cached in the ``TokenTable`` ``texts``) pairs with ``pair_images[i]`` (cached in
    ``images``); pairs lacking a row are skipped (a segment per token table: titles and phrases
    need not share one).
    Returns ``{"pairs": n, "dim": p, "reg": r, "correlations": [first, k-th], "query_gains": [..],
    "item_gain": g}``. Raises ValueError when the model has no cross-modal block, a segment's lists
    differ in length, or fewer pairs than ``k + 1`` remain.
    """
    blocks = [model.query_tower.fusion.cross_modal, model.item_tower.fusion.cross_modal]
    if any(b is None for b in blocks):
        raise ValueError("the model has no cross-modal block (ModelConfig.cross_dim)")
    xs, ys = [], []
    for texts, pair_texts, images, pair_images in segments:
        if len(pair_texts) != len(pair_images):
            raise ValueError(f"{len(pair_texts)} texts for {len(pair_images)} photos")
        t_rows, v_rows = texts.rows(pair_texts), images.rows(pair_images)
        ok = (t_rows >= 0) & (v_rows >= 0)
        xs.append(text_features(texts, t_rows[ok]))
        ys.append(pooled_means(images, v_rows[ok], gem_p=blocks[0].gem_p))
    x, y = np.concatenate(xs), np.concatenate(ys)
    k = blocks[0].k
    if len(x) <= k:
        raise ValueError(f"the cross-modal block of {k} canonical directions needs more than {k} (text, photo) "
                         f"pairs, got {len(x)}")
    mu_x, w_x, mu_y, w_y, corr = canonical_correlation(x, y, k, reg)
    for block in blocks:
        block.set_projection(mu_x, w_x, mu_y, w_y)
    return {"pairs": int(len(x)), "dim": int(blocks[0].dim), "reg": float(reg),
            "correlations": [round(float(corr[0]), 4), round(float(corr[-1]), 4)],
            "query_gains": blocks[0].gains.tolist(), "item_gain": float(blocks[1].gains[0])}


def product_pairs(products, group_fields=None) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The fitting pairs of the module docstring from catalogue products with a title and a photo:
    ``([(title, photo path)], [(attribute phrase, photo path)])``; products without the attributes
    of a phrase (``engine.training.pairs.attribute_phrase``) give no phrase pair."""
    from engine.training.pairs import DEFAULT_GROUP_FIELDS, attribute_phrase

    fields = DEFAULT_GROUP_FIELDS if group_fields is None else group_fields
    titled = [p for p in products if p.title and p.image]
    phrases = [(attribute_phrase(p.attributes, fields), p.image) for p in titled]
    return [(p.title, p.image) for p in titled], [(t, v) for t, v in phrases if t]
