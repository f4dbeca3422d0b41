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

import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from engine.model.augment import DEFAULT_AUGMENT_VIEWS, AugmentConfig, augment_photo, view_seed
from engine.model.errors import InputError
from engine.model.images import load_image
from engine.tokens.cache import (
    CACHE_FORMAT, TokenTable, _digest, _finish, file_digest, file_stat, _unique, open_table, start_image_cache,
    write_image_tokens,
)


def augmented_key(path: str, view: int) -> str:
    """Row key of augmented view ``view`` of the photo at ``path`` (``"<path>#aug<view>"``)."""
    return f"{path}#aug{int(view)}"


def _settings(backbones, seed: int, config: AugmentConfig) -> dict:
    """What a view's tokens depend on besides its file and view index: the backbone, its spec and
    preprocessing, the seed, the ``AugmentConfig`` and albumentations' version."""
    import albumentations

    image = backbones.image
    pre = image.preprocess.as_dict() if hasattr(image.preprocess, "as_dict") else repr(image.preprocess)
    return {"format": CACHE_FORMAT, "kind": "image-aug", "fp": backbones.image_fingerprint,
            "spec": backbones.image_spec, "preprocess": pre, "seed": int(seed), "augment": config.as_dict(),
            "albumentations": albumentations.__version__}


def augmented_cache_key(backbones, paths: Sequence[str], views: int, seed: int, config: AugmentConfig) -> str:
    """Folder key (24 hex chars) of the augmented cache of ``paths``; changes with any input."""
    return _digest({**_settings(backbones, seed, config), "files": [file_stat(p) for p in paths], "views": int(views)})


def reuse_key(backbones, seed: int, config: AugmentConfig) -> str:
    """What two augmented caches must share for a row of one to be a row of the other (24 hex chars):
    ``_settings``. View ``v`` of a photo depends on nothing else (``view_seed``), whatever the view count."""
    return _digest(_settings(backbones, seed, config))


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
    shared = reuse_key(backbones, seed, config)
    files = [file_stat(p) for p in photos]
    tokens, todo = _reuse_view_rows(Path(cache_root), shared, photos, files, views, tmp, lengths)
    load = _ViewLoader(backbones.image, photos, views, seed, config, errors)
    write_image_tokens(backbones.image, load, todo, len(keys), tmp, lengths, tokens,
                       batch_size=batch_size, desc="augmented image tokens", unit="view", progress=progress)
    del tokens  # the memmap of the copied rows, flushed by write_image_tokens
    np.save(tmp / "lengths.npy", lengths)
    elapsed = time.perf_counter() - start
    meta = {"format": CACHE_FORMAT, "kind": "image-aug", "fingerprint": backbones.image_fingerprint,
            "keys": keys, "errors": errors, "views": int(views), "seed": int(seed), "augment": config.as_dict(),
            "reuse_key": shared, "files": files,
            "digests": [file_digest(p) if f[1] is not None else None for p, f in zip(photos, files)],
            "reused": len(keys) - len(todo),
            "build_seconds": elapsed, "items_per_s": len(keys) / elapsed if elapsed else None}
    return _finish(tmp, final, meta)


def find_view_rows(root: Path, shared: str, photos: list[str], files: list[list], views: int
                   ) -> dict[int, tuple[TokenTable, int]]:
    """Where finished augmented caches under ``root`` with the ``reuse_key`` ``shared`` hold view ``v``
    of photo ``i`` (the same file: same path and size, and the same mtime or, where the cache
    recorded one, the same content digest, as for the clean tokens (``engine.tokens.lookup``), so a
    copied or re-synced catalogue keeps its views; a view that failed there is not found):
    ``{i * views + v: (table, row)}``. Our choice: the index's item photo views reuse those the
    training job made."""
    wanted = {augmented_key(p, v): (i * views + v, f) for i, (p, f) in enumerate(zip(photos, files))
              for v in range(views)}
    found: dict[int, tuple[TokenTable, int]] = {}
    digests_now: dict[str, str | None] = {}
    for meta_file in sorted(root.glob("image-aug-*/meta.json")) if root.is_dir() else []:
        meta = json.loads(meta_file.read_text())
        if meta.get("reuse_key") != shared:
            continue
        table = open_table(meta_file.parent)
        names = _unique([k.rsplit("#aug", 1)[0] for k in table.keys])
        stats = dict(zip(names, meta.get("files") or []))
        digests = dict(zip(names, meta.get("digests") or []))
        for row, key in enumerate(table.keys):
            hit = wanted.get(key)
            if hit is None or hit[0] in found or table.lengths[row] <= 0:
                continue
            path = key.rsplit("#aug", 1)[0]
            if _same_file(stats.get(path), digests.get(path), hit[1], digests_now):
                found[hit[0]] = (table, row)
    return found


def _same_file(cached: list | None, cached_digest: str | None, now: list, digests_now: dict[str, str | None]) -> bool:
    """Whether a photo whose stat was ``cached`` (with content digest ``cached_digest``, or None) is
    unchanged now (stat ``now``): the same stat, or the same size and bytes. ``digests_now`` caches
    the digests read."""
    if cached is None or now[1] is None:
        return False
    if cached == now:
        return True
    if cached_digest is None or cached[1] != now[1]:
        return False
    if now[0] not in digests_now:
        digests_now[now[0]] = file_digest(now[0])
    return digests_now[now[0]] == cached_digest


def _reuse_view_rows(root: Path, shared: str, photos: list[str], files: list[list], views: int, tmp: Path,
                     lengths: np.ndarray) -> tuple[np.ndarray | None, list[int]]:
    """Copy the rows ``find_view_rows`` finds into the cache being built in ``tmp``. Fills ``lengths``;
    returns ``(tokens memmap or None, rows still to encode)``."""
    n = len(photos) * views
    tokens, copied = None, set()
    for target, (table, row) in sorted(find_view_rows(root, shared, photos, files, views).items()):
        if tokens is None:
            tokens = np.lib.format.open_memmap(tmp / "tokens.npy", mode="w+", dtype=np.float16,
                                               shape=(n,) + table.tokens.shape[1:])
        if table.tokens.shape[1:] != tokens.shape[1:]:
            continue
        tokens[target], lengths[target] = table.tokens[row], table.lengths[row]
        copied.add(target)
    return tokens, [r for r in range(n) if r not in copied]


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
