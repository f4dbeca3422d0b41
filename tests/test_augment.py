"""engine.model.augment and engine.tokens.augment_cache on real catalogue photos and a tiny random backbone."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine.model.augment import AugmentConfig, augment_photo, view_seed
from engine.tokens.augment_cache import augmented_key, cache_augmented_images
from engine.model.images import load_image
from engine.tokens.cache import cache_images


@pytest.fixture(scope="module")
def photo_paths(fashion_dir) -> list[str]:
    return [str(p) for p in sorted((fashion_dir / "images").glob("*.jpg"))[:4]]


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_augmentation_is_deterministic_under_a_seed_and_keeps_size_and_mode(photo_paths):
    clean = load_image(photo_paths[0])
    first, again = augment_photo(clean, 11), augment_photo(clean, 11)
    assert first.mode == "RGB" and first.size == clean.size
    assert np.array_equal(_pixels(first), _pixels(again))
    others = [augment_photo(clean, s) for s in (12, 13, 14)]
    assert all(not np.array_equal(_pixels(first), _pixels(o)) for o in others)
    # a grayscale input comes back RGB, same size
    gray = augment_photo(clean.convert("L"), 11)
    assert gray.mode == "RGB" and gray.size == clean.size


def test_a_view_differs_from_the_clean_photo(photo_paths):
    for path in photo_paths:
        clean = load_image(path)
        for view in range(3):
            augmented = augment_photo(clean, view_seed(0, path, view))
            assert np.abs(_pixels(augmented) - _pixels(clean)).mean() > 1.0, (path, view)


def test_view_seed_depends_on_seed_file_name_and_view_not_folder():
    assert view_seed(0, "/a/b/10000.jpg", 1) == view_seed(0, "/elsewhere/10000.jpg", 1)
    seeds = {view_seed(s, f"{n}.jpg", v) for s in (0, 1) for n in (10000, 10001) for v in (0, 1, 2)}
    assert len(seeds) == 12 and all(0 <= s < 2 ** 31 for s in seeds)


def test_every_step_can_be_switched_off(photo_paths):
    """Every step can be switched off through the config: then the view is the clean photo."""
    off = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, rotate_deg=0.0,
                        jitter_p=0.0, downscale_p=0.0, jpeg_p=0.0)
    clean = load_image(photo_paths[1])
    assert np.abs(_pixels(augment_photo(clean, 5, off)) - _pixels(clean)).max() <= 1
    with pytest.raises(ValueError, match="empty image"):
        augment_photo(Image.new("RGB", (0, 0)), 1)


def test_augmented_cache_rows_keys_and_cache_key(tiny_model, photo_paths, tmp_path):
    backbones = tiny_model.backbones
    missing = str(tmp_path / "missing.jpg")
    table = cache_augmented_images(backbones, photo_paths + [photo_paths[0], missing], tmp_path, views=2,
                                   seed=3, progress=False)
    assert table.keys == [augmented_key(p, v) for p in photo_paths + [missing] for v in range(2)]
    assert table.tokens.shape[0] == 2 * (len(photo_paths) + 1)
    assert table.meta["views"] == 2 and table.meta["seed"] == 3
    assert all(table.row(augmented_key(p, v)) >= 0 for p in photo_paths for v in range(2))
    assert table.row(augmented_key(missing, 0)) == -1 and augmented_key(missing, 1) in table.errors
    clean = cache_images(backbones, photo_paths, tmp_path, progress=False)
    r_clean, r_aug = clean.row(photo_paths[0]), table.row(augmented_key(photo_paths[0], 0))
    assert table.tokens.shape[1:] == clean.tokens.shape[1:]
    assert not np.array_equal(table.tokens[r_aug], clean.tokens[r_clean])
    # the same settings reuse the folder; another view count, seed or config gets a new one
    assert cache_augmented_images(backbones, photo_paths + [missing], tmp_path, views=2, seed=3,
                                  progress=False).folder == table.folder
    folders = {cache_augmented_images(backbones, photo_paths, tmp_path, progress=False, **kw).folder
               for kw in ({"views": 2, "seed": 3}, {"views": 3, "seed": 3}, {"views": 2, "seed": 4},
                          {"views": 2, "seed": 3, "config": AugmentConfig(jpeg_p=0.0)})}
    assert len(folders) == 4
    rebuilt = cache_augmented_images(backbones, photo_paths, tmp_path / "again", views=2, seed=3, progress=False)
    r = rebuilt.row(augmented_key(photo_paths[2], 1))
    assert np.array_equal(rebuilt.tokens[r], table.tokens[table.row(augmented_key(photo_paths[2], 1))])
    with pytest.raises(ValueError, match="views"):
        cache_augmented_images(backbones, photo_paths, tmp_path, views=0, progress=False)
