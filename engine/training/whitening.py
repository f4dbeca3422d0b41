"""Learned whitening: the closed-form start of the image residual (issue 12, item 1).

The pooled residual of each fusion encoder (``engine/model/fusion.py``) projects the masked mean
of the raw image-backbone tokens with a linear map ``W x + b``. Initialised at random, training
for a few hundred steps turns that map towards what the cross-modal losses reward (the type and
colour a title names) and away from the details that tell two photos of one product from two
photos of similar products: an augmented photo of a product then finds its own product less
often than the untrained backbone features do.

This module fits ``W, b`` in closed form before training, from pairs of a clean catalogue photo
and its augmented views (``engine.model.augment``): the *learned whitening* of Radenović,
Tolias and Chum ("Fine-tuning CNN Image Retrieval with No Human Annotation", TPAMI 2018, §3.4;
after the linear discriminant projections of Mikolajczyk and Matas, ICCV 2007):

1. ``C_S``: the covariance of the differences between matching features (clean − view, and view −
   view of one photo), shrunk towards a multiple of the identity (our choice: ``shrinkage`` 0.4 of
   the mean eigenvalue; the H = 1280 features outnumber the pairs of a small catalogue);
2. whiten by ``C_S^{-1/2}``: directions in which augmentation moves a photo are damped;
3. PCA of the whitened, centred clean features; keep the ``dim`` leading directions.

``W = P C_S^{-1/2}``, ``b = -W mu``. Measured on 1,000 catalogue photos (300 augmented queries,
700 photos with 2 views each to fit): Recall@1 of the augmented query among the 1,000 clean
photos 86.7 % with raw cosine, 93.3 % after this projection to 256 dimensions (docs/results.md).

The same fit serves the private blocks appended after training (``engine.model.private_block``):
``init_image_private`` on (clean, augmented) photos, ``init_text_private`` on (typed shopper
query, product title) pairs, where a query is a "view" of its title.
"""
from __future__ import annotations

import numpy as np
import torch

from engine.model.fusion import gem_pool
from engine.tokens.cache import TokenTable
from engine.tokens.views import iter_chunks

DEFAULT_SHRINKAGE = 0.4  # our choice (measured: 0.1-0.8 within one point of each other)


def pooled_means(table: TokenTable, rows: np.ndarray, batch_size: int = 512, gem_p: float = 1.0) -> np.ndarray:
    """Masked mean of the cached tokens of ``rows`` (not normalised, as the residual reads it);
    ``gem_p`` > 1: their generalised mean instead (``engine.model.fusion.gem_pool``).

    Returns float64 ``(n, H)``. Raises ValueError when a row has no tokens (``-1``).
    """
    rows = np.asarray(rows, dtype=np.int64)
    if (rows < 0).any():
        raise ValueError(f"{int((rows < 0).sum())} rows have no tokens")
    out = []
    for chunk in iter_chunks(len(rows), batch_size):
        tokens, mask, _ = table.gather(rows[chunk])
        if gem_p != 1.0:
            out.append(gem_pool(tokens, mask, gem_p).double().numpy())
            continue
        w = mask.float().unsqueeze(-1)
        out.append(((tokens.float() * w).sum(1) / w.sum(1).clamp_min(1.0)).double().numpy())
    return np.concatenate(out) if out else np.zeros((0, table.hidden_size))


def learned_whitening(clean: np.ndarray, views: np.ndarray, dim: int,
                      shrinkage: float = DEFAULT_SHRINKAGE) -> tuple[np.ndarray, np.ndarray]:
    """Fit the projection (module docstring).

    Args:
        clean: float ``(n, H)`` pooled features of ``n`` clean photos.
        views: float ``(v, n, H)`` pooled features of ``v >= 1`` augmented views of each photo.
        dim: output width (``<= min(n, H)``). shrinkage: ridge on ``C_S`` as a share of its mean eigenvalue.
    Returns:
        ``(weight float32 (dim, H), bias float32 (dim,))`` with ``y = weight @ x + bias``.
    Raises:
        ValueError: mismatched shapes, too few photos for ``dim``, or a non-positive shrinkage.
    """
    clean = np.asarray(clean, dtype=np.float64)
    views = np.asarray(views, dtype=np.float64)
    if views.ndim != 3 or views.shape[1:] != clean.shape:
        raise ValueError(f"views must be (v, n, H) matching clean {clean.shape}, got {views.shape}")
    n, h = clean.shape
    if not 0 < dim <= min(n, h):
        raise ValueError(f"dim must lie in [1, min(photos, features)] = [1, {min(n, h)}], got {dim}")
    if shrinkage <= 0:
        raise ValueError(f"shrinkage must be > 0, got {shrinkage}")
    diffs = [v - clean for v in views]
    diffs += [views[a] - views[b] for a in range(len(views)) for b in range(a + 1, len(views))]
    d = np.concatenate(diffs)
    c_s = d.T @ d / len(d)
    c_s += shrinkage * np.trace(c_s) / h * np.eye(h)
    eigval, eigvec = np.linalg.eigh(c_s)
    whiten = (eigvec / np.sqrt(eigval)) @ eigvec.T  # C_S^{-1/2}, symmetric
    mu = clean.mean(axis=0)
    _, _, vt = np.linalg.svd((clean - mu) @ whiten.T, full_matrices=False)
    weight = vt[:dim] @ whiten
    return weight.astype(np.float32), (-weight @ mu).astype(np.float32)


def init_image_residual(model, images: TokenTable, augmented: TokenTable, photos: list[str], views: int, *,
                        shrinkage: float = DEFAULT_SHRINKAGE, freeze: bool = False, gain: float = 1.0) -> dict:
    """Set the image residual of both towers of ``model`` to the learned whitening of ``photos``.

    ``images`` holds the clean tokens (keyed by path), ``augmented`` the views (keyed by
    ``augmented_key(path, v)``, ``v < views``); photos lacking a clean or an augmented row are
    skipped. ``freeze``: the projection is not trained afterwards (``requires_grad`` off).
    ``gain``: the starting value of the image residual's learned gain (our choice; 1.0 as built).
    Returns ``{"photos": n, "views": v, "dim": d, "shrinkage": s, "frozen": bool, "gain": g}``.
    Raises ValueError when the model has no pooled residual or too few usable photos.
    """
    towers = [model.query_tower, model.item_tower]
    fusions = [t.fusion for t in towers]
    if not all(getattr(f, "pooled_residual", False) for f in fusions):
        raise ValueError("the model has no pooled residual (ModelConfig.pooled_residual)")
    clean, aug = _pair_features(images, augmented, photos, views)
    dim = fusions[0].image_residual.out_features
    weight, bias = learned_whitening(clean, aug, dim, shrinkage)
    with torch.no_grad():
        for f in fusions:
            f.image_residual.weight.copy_(torch.from_numpy(weight))
            f.image_residual.bias.copy_(torch.from_numpy(bias))
            f.image_residual.requires_grad_(not freeze)
            f.residual_gain[1] = gain
    return {"photos": int(len(clean)), "views": int(views), "dim": int(dim), "shrinkage": float(shrinkage),
            "frozen": bool(freeze), "gain": float(gain)}


def init_image_private(model, images: TokenTable, augmented: TokenTable, photos: list[str], views: int, *,
                       shrinkage: float = DEFAULT_SHRINKAGE) -> dict:
    """Fit the image-private block of both towers (``engine.model.private_block``) to the learned
    whitening of ``photos`` (clean tokens in ``images``, views in ``augmented`` as for
    ``init_image_residual``) to ``p - 1`` dimensions; the block is never trained.

    Returns ``{"photos": n, "views": v, "dim": p, "shrinkage": s, "query_gains": [..], "item_gain": g}``.
    Raises ValueError when the model has no image-private block or too few usable photos.
    """
    blocks = [model.query_tower.fusion.private, model.item_tower.fusion.private]
    if any(b is None for b in blocks):
        raise ValueError("the model has no image-private block (ModelConfig.image_private_dim)")
    clean, aug = _pair_features(images, augmented, photos, views, blocks[0].gem_p)
    weight, bias = learned_whitening(clean, aug, blocks[0].dim - 1, shrinkage)
    for block in blocks:
        block.set_projection(weight, bias)
    return {"photos": int(len(clean)), "views": int(views), "dim": int(blocks[0].dim), "shrinkage": float(shrinkage),
            "gem_p": blocks[0].gem_p, "query_gains": blocks[0].gains.tolist(), "item_gain": float(blocks[1].gains[0])}


def init_text_private(model, texts: TokenTable, queries: list[str], titles: list[str], *,
                      shrinkage: float = DEFAULT_SHRINKAGE) -> dict:
    """Fit the text-private block of both towers (``engine.model.private_block``) to the learned
    whitening of typed queries against their products' titles: ``queries[k]`` is a view of
    ``titles[k]`` (module docstring, with text in place of photos); the block is never trained.

    ``texts`` holds the tokens of both lists; pairs lacking a row are skipped.
    Returns ``{"pairs": n, "dim": q, "shrinkage": s, "query_gains": [..], "item_gain": g}``.
    Raises ValueError when the model has no text-private block, the lists differ in length, or
    too few usable pairs remain.
    """
    blocks = [model.query_tower.fusion.text_private, model.item_tower.fusion.text_private]
    if any(b is None for b in blocks):
        raise ValueError("the model has no text-private block (ModelConfig.text_private_dim)")
    if len(queries) != len(titles):
        raise ValueError(f"{len(queries)} queries for {len(titles)} titles")
    q_rows, t_rows = texts.rows(queries), texts.rows(titles)
    ok = (q_rows >= 0) & (t_rows >= 0)
    title_means = pooled_means(texts, t_rows[ok])
    weight, bias = learned_whitening(title_means, pooled_means(texts, q_rows[ok])[None], blocks[0].dim - 1, shrinkage)
    for block in blocks:
        block.set_projection(weight, bias)
    return {"pairs": int(ok.sum()), "dim": int(blocks[0].dim), "shrinkage": float(shrinkage),
            "query_gains": blocks[0].gains.tolist(), "item_gain": float(blocks[1].gains[0])}


PRIVATE_FIELDS = ("image_private_dim", "image_private_query_gains", "image_private_item_gain", "image_private_gem_p",
                  "text_private_dim", "text_private_query_gains", "text_private_item_gain",
                  "cross_dim", "cross_query_gains", "cross_item_gain", "cross_gem_p")
_BLOCK_KEYS = (".private.", ".text_private.", ".cross_modal.")


def attach_private(model, config):
    """A copy of trained ``model`` whose towers carry the fixed blocks of ``config``
    (``image_private_*``, ``text_private_*`` and ``cross_*`` fields), projections zero until
    ``init_image_private`` / ``init_text_private`` / ``engine.training.cross_fit.init_cross_block``;
    every other weight is ``model``'s. Raises ValueError when ``config`` has no block or another
    architecture."""
    from dataclasses import replace

    from engine.model.towers import TwoTowerModel

    if not (config.image_private_dim or config.text_private_dim or config.cross_dim):
        raise ValueError("config has no image_private_dim, text_private_dim or cross_dim: no block to attach")
    new = TwoTowerModel(replace(model.config, **{f: getattr(config, f) for f in PRIVATE_FIELDS}), model.backbones)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not any(b in k for b in _BLOCK_KEYS) for k in missing):
        raise ValueError(f"model and config differ beyond the blocks: missing {missing}, unexpected {unexpected}")
    new.train(model.training)
    return new


def _pair_features(images: TokenTable, augmented: TokenTable, photos: list[str], views: int, gem_p: float = 1.0):
    """Pooled features (``pooled_means``) of the photos that have a clean row and every view:
    ``(clean (n, H), views (v, n, H))``."""
    from engine.tokens.augment_cache import augmented_key

    clean_rows = images.rows(photos)
    view_rows = np.stack([augmented.rows([augmented_key(p, v) for p in photos]) for v in range(views)])
    ok = (clean_rows >= 0) & (view_rows >= 0).all(axis=0)
    return (pooled_means(images, clean_rows[ok], gem_p=gem_p),
            np.stack([pooled_means(augmented, r[ok], gem_p=gem_p) for r in view_rows]))
