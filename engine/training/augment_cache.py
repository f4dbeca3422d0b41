"""Token cache of augmented photo views: ``V`` seeded augmentations per training photo.

The query side of training sees catalogue photos as shoppers take them (``engine.model.augment``);
the frozen image backbone runs once per augmented view and the tokens are kept like the clean
ones (``engine.tokens.cache`` layout and ``TokenTable``). Row keys are ``augmented_key(path, v)``
= ``"<path>#aug<v>"``, ``v`` in ``range(views)``, path-major. The folder key adds the view
count, the seed, the ``AugmentConfig`` and the albumentations version to what the clean image
cache hashes (backbone fingerprint, preprocessing, file path / size / mtime), so another
view count or augmentation never reads a stale cache. Cost: ``views`` times the clean image
cache in backbone time and disk (plus about 6 ms of augmentation per view on one core).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from engine.model.augment import DEFAULT_AUGMENT_VIEWS, AugmentConfig, augment_photo, view_seed
from engine.model.errors import InputError
from engine.model.images import load_image
from engine.tokens.cache import (
    CACHE_FORMAT, TokenTable, _digest, _finish, file_stat, _unique, open_table, start_image_cache,
    write_image_tokens,
)


def augmented_key(path: str, view: int) -> str:
    """Row key of augmented view ``view`` of the photo at ``path`` (``"<path>#aug<view>"``)."""
    return f"{path}#aug{int(view)}"


def augmented_cache_key(backbones, paths: Sequence[str], views: int, seed: int, config: AugmentConfig) -> str:
    """Folder key (24 hex chars) of the augmented cache of ``paths``; changes with any input."""
    import albumentations

    image = backbones.image
    pre = image.preprocess.as_dict() if hasattr(image.preprocess, "as_dict") else repr(image.preprocess)
    return _digest({"format": CACHE_FORMAT, "kind": "image-aug", "fp": backbones.image_fingerprint,
                    "spec": backbones.image_spec, "preprocess": pre, "files": [file_stat(p) for p in paths],
                    "views": int(views), "seed": int(seed), "augment": config.as_dict(),
                    "albumentations": albumentations.__version__})


def cache_augmented_images(backbones, paths: Sequence[str], cache_root: str | Path, *,
                           views: int = DEFAULT_AUGMENT_VIEWS, seed: int = 0,
                           config: AugmentConfig | None = None, batch_size: int = 32,
                           progress: bool = True) -> TokenTable:
    """Image tokens of ``views`` augmented views of every distinct photo, cached once.

    Args:
        backbones: ``engine.model.backbones.Backbones`` (``.image``, ``.image_fingerprint``, ``.image_spec``).
        paths: photo paths (duplicates share rows). views: augmented views per photo (≥ 1).
        seed: augmentation seed; view ``v`` of photo ``p`` uses ``view_seed(seed, p, v)``.
        config: ``AugmentConfig`` (None: defaults).
    Returns:
        ``TokenTable`` with ``len(unique paths) * views`` rows keyed by ``augmented_key``;
        ``meta["views"]``, ``meta["seed"]``, ``meta["augment"]`` record the settings. A photo
        that cannot be used gets no tokens for any view and its reason in ``errors`` (keyed
        by the view keys).
    Raises:
        ValueError: ``views < 1``.
    """
    if int(views) < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    config = config or AugmentConfig()
    photos = _unique([str(p) for p in paths])
    keys = [augmented_key(p, v) for p in photos for v in range(views)]
    final = Path(cache_root) / f"image-aug-{augmented_cache_key(backbones, photos, views, seed, config)}"
    if (final / "meta.json").is_file():
        return open_table(final)
    tmp, start, errors, lengths = start_image_cache(final, len(keys))
    load = _ViewLoader(backbones.image, photos, views, seed, config, errors)
    write_image_tokens(backbones.image, load, list(range(len(keys))), len(keys), tmp, lengths, None,
                       batch_size=batch_size, desc="augmented image tokens", unit="view", progress=progress)
    np.save(tmp / "lengths.npy", lengths)
    elapsed = time.perf_counter() - start
    meta = {"format": CACHE_FORMAT, "kind": "image-aug", "fingerprint": backbones.image_fingerprint,
            "keys": keys, "errors": errors, "views": int(views), "seed": int(seed), "augment": config.as_dict(),
            "build_seconds": elapsed, "items_per_s": len(keys) / elapsed if elapsed else None}
    return _finish(tmp, final, meta)


class _ViewLoader:
    """Decode, augment and preprocess one batch of view rows → ``(ok rows, pixels (n, 3, S, S) | None)``.

    A photo is decoded once per batch it appears in; a photo that fails records every view key.
    """

    def __init__(self, image, photos: list[str], views: int, seed: int, config: AugmentConfig,
                 errors: dict[str, str]):
        self.image, self.photos, self.views, self.seed, self.config = image, photos, views, seed, config
        self.errors = errors

    def __call__(self, batch: list[int]):
        ok, pixels, decoded = [], [], {}
        for row in batch:
            p, v = divmod(row, self.views)
            path = self.photos[p]
            if p not in decoded:
                try:
                    decoded[p] = load_image(path, index=p)
                except (InputError, OSError) as exc:
                    decoded[p] = None
                    reason = exc.reason if isinstance(exc, InputError) else f"cannot read image: {exc}"
                    self.errors.update({augmented_key(path, w): reason for w in range(self.views)})
            if decoded[p] is None:
                continue
            view = augment_photo(decoded[p], view_seed(self.seed, path, v), self.config)
            pixels.append(self.image.preprocess(view))
            ok.append(row)
        return ok, (torch.stack(pixels) if pixels else None)
