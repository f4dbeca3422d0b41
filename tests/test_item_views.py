"""engine/model/item_views.py and engine/tokens/item_views.py: the item photo views of the image-private block: the arithmetic, the
model setting, the indexer's encode stage (a real build over real photos) and the evaluation, which
must give the vectors the index stores."""
from __future__ import annotations

import numpy as np
import pytest

from engine.evaluation.evaluate import build_pool, item_views, tower_views
from engine.model.item_views import image_private_span, refine_with_views
from engine.model.model_folder import load_model, save_model
from engine.model.towers import ModelConfig
from engine.tokens.item_views import apply_item_views
from engine.training.job import load_products
from indexer.pipeline import IndexJobConfig, run_index_job
from indexer.search import open_index
from indexer.version import VersionOptions
from tests.test_incremental import ENCODE
from tests.test_private_block import P, _with_block
from tests.test_train import _mini_fashion

N = 24
VERSION = VersionOptions(n_shards=2, factory="IVF,Flat")


def _rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_refine_adds_the_views_directions_and_keeps_the_rest_of_the_vector():
    rng = np.random.default_rng(1)
    span, h = (4, 10), 5
    weight, bias = rng.normal(size=(6, h)), rng.normal(size=6)
    vectors = _rows(3, 16)
    views = rng.normal(size=(2, 3, h))
    out = refine_with_views(vectors, views, weight, bias, span)
    outside = [i for i in range(16) if not span[0] <= i < span[1]]
    np.testing.assert_array_equal(out[:, outside], vectors[:, outside])
    old, new = vectors[:, 4:10].astype(np.float64), out[:, 4:10].astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(new, axis=1), np.linalg.norm(old, axis=1), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)  # still unit vectors
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    expected = unit(unit(old) + unit(views[0] @ weight.T + bias) + unit(views[1] @ weight.T + bias))
    np.testing.assert_allclose(unit(new), expected, atol=1e-5)
    # views that look like the catalogue photo leave its part as it was
    g = rng.normal(size=(3, h))
    same = vectors.copy()
    same[:, 4:10] = unit(g @ weight.T + bias) * np.linalg.norm(old, axis=1, keepdims=True)
    np.testing.assert_allclose(refine_with_views(same, np.stack([g, g]), weight, bias, span), same, atol=1e-6)


def test_refine_refuses_what_does_not_fit():
    vectors = _rows(3, 16)
    weight, bias = np.ones((6, 5)), np.zeros(6)
    with pytest.raises(ValueError, match="do not fit"):
        refine_with_views(vectors, np.ones((2, 4, 5)), weight, bias, (4, 10))  # 4 rows of views for 3 vectors
    with pytest.raises(ValueError, match="do not fit"):
        refine_with_views(vectors, np.ones((2, 3, 5)), weight, bias, (4, 9))
    vectors[1, 4:10] = 0
    with pytest.raises(ValueError, match="1 rows have no image-private part"):
        refine_with_views(vectors, np.ones((2, 3, 5)), weight, bias, (4, 10))


def test_the_setting_is_checked_and_kept_by_model_folders(tiny_backbone_dir, tmp_path):
    with pytest.raises(ValueError, match="item_photo_views must be an integer >= 0"):
        ModelConfig(item_photo_views=-1)
    model = _with_block(tiny_backbone_dir)
    model.config.item_photo_views, model.config.item_photo_views_seed = 2, 5
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert (again.config.item_photo_views, again.config.item_photo_views_seed) == (2, 5)
    assert image_private_span(again.item_tower) == (32, 32 + P - 1)


@pytest.fixture(scope="module")
def view_models(tiny_backbone_dir, tmp_path_factory):
    """The same tiny model with an image-private block, without and with two item photo views."""
    plain, views = tmp_path_factory.mktemp("plain"), tmp_path_factory.mktemp("views")
    model = _with_block(tiny_backbone_dir)
    save_model(model, plain)
    model.config.item_photo_views = 2
    save_model(model, views)
    return plain, views


def test_apply_leaves_rows_without_a_photo_and_models_without_views(view_models, fashion_dir, tmp_path):
    plain, views = (load_model(f) for f in view_models)
    catalog = _mini_fashion(fashion_dir, tmp_path / "fashion", n=4)
    photos = sorted(str(p) for p in (catalog / "images").iterdir())[:3]
    items = views.item_tower.encode(["black heels", "red kurta", "watch"], photos, use_graphs=False)
    same, stats = apply_item_views(plain, items, photos, tmp_path / "cache", progress=False)
    np.testing.assert_array_equal(same, items)
    assert stats == {"views": 0, "photos": 0, "unreadable": 0}
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    out, stats = apply_item_views(views, items, [photos[0], None, str(broken)], tmp_path / "cache", progress=False)
    assert stats == {"views": 2, "photos": 1, "unreadable": 1}
    np.testing.assert_array_equal(out[1:], items[1:])  # no photo, unreadable views: as encoded
    start, stop = image_private_span(views.item_tower)
    assert not np.allclose(out[0, start:stop], items[0, start:stop])
    np.testing.assert_array_equal(out[0, :start], items[0, :start])
    assert len(list((tmp_path / "cache").glob("image-aug-*"))) >= 1  # the views' tokens are cached


def test_an_index_build_stores_the_views_and_the_evaluation_gives_the_same_vectors(view_models, fashion_dir, tmp_path):
    catalog = _mini_fashion(fashion_dir, tmp_path / "fashion", n=N)
    built = {}
    for name, folder in zip(("plain", "views"), view_models):
        built[name] = run_index_job(IndexJobConfig(catalog=catalog, model_dir=folder, index_root=tmp_path / name,
                                                   device="cpu", encode=ENCODE, version=VERSION),
                                    log=lambda _m: None)
    stats = built["views"].manifest["build"]["item_photo_views"]
    assert stats["views"] == 2 and stats["photos"] == N and stats["unreadable"] == 0
    assert built["plain"].manifest["build"]["item_photo_views"] == {}
    stored = {}
    for name, b in built.items():
        version = open_index(b.path)
        stored[name] = version.vectors(np.arange(N)).astype(np.float32)
        version.close()
    model = load_model(view_models[1])
    start, stop = image_private_span(model.item_tower)
    np.testing.assert_allclose(stored["views"][:, :start], stored["plain"][:, :start], atol=2e-3)  # fp16 copies
    moved = np.linalg.norm(stored["views"][:, start:stop] - stored["plain"][:, start:stop], axis=1)
    assert np.all(moved > 1e-2)
    # the evaluation's item vectors of the same products are the ones the index stores
    rows = [ln.split(",") for ln in (catalog / "styles.csv").read_text().splitlines()[1:]]
    products, _ = load_products(str(catalog), None)
    pool = build_pool(products, model.backbones, str(tmp_path / "eval-cache"), progress=False)
    views = item_views(model, pool, tower_views(model.item_tower, pool.texts, pool.images, pool.text_rows,
                                                pool.image_rows, views=("F",)))
    by_id = {p.product_id: i for i, p in enumerate(pool.products)}
    order = [by_id[r[0]] for r in rows if r[0] in by_id]
    assert len(order) == N
    np.testing.assert_allclose(views["F"][order], stored["views"], atol=3e-3)


def test_view_caches_reuse_the_rows_another_cache_holds(view_models, fashion_dir, tmp_path):
    from engine.tokens.augment_cache import augmented_key, cache_augmented_images

    model = load_model(view_models[1])
    catalog = _mini_fashion(fashion_dir, tmp_path / "fashion", n=4)
    photos = sorted(str(p) for p in (catalog / "images").iterdir())[:4]
    first = cache_augmented_images(model.backbones, photos[:3], tmp_path / "a", views=1, seed=0, progress=False)
    assert first.meta["reused"] == 0
    both = cache_augmented_images(model.backbones, photos, tmp_path / "a", views=2, seed=0, progress=False)
    assert both.meta["reused"] == 3  # view 0 of the first three photos
    fresh = cache_augmented_images(model.backbones, photos, tmp_path / "b", views=2, seed=0, progress=False)
    assert fresh.meta["reused"] == 0
    for p in photos:
        for v in range(2):
            key = augmented_key(p, v)
            np.testing.assert_allclose(both.tokens[both.row(key)].astype(np.float32),
                                       fresh.tokens[fresh.row(key)].astype(np.float32), atol=1e-3)
    other_seed = cache_augmented_images(model.backbones, photos[:1], tmp_path / "a", views=1, seed=1, progress=False)
    assert other_seed.meta["reused"] == 0  # another seed makes other views


def test_view_rows_outlive_a_new_mtime_but_not_new_bytes(view_models, fashion_dir, tmp_path):
    # A copied or re-synced catalogue gets new mtimes: the views of the same bytes are still found
    # (by the content digest the cache records), those of a changed photo are not.
    import os

    from engine.model.augment import AugmentConfig
    from engine.tokens.augment_cache import cache_augmented_images, find_view_rows, reuse_key
    from engine.tokens.cache import file_stat

    model = load_model(view_models[1])
    catalog = _mini_fashion(fashion_dir, tmp_path / "fashion", n=3)
    photos = sorted(str(p) for p in (catalog / "images").iterdir())[:3]
    cache_augmented_images(model.backbones, photos, tmp_path / "c", views=2, seed=0, progress=False)
    shared = reuse_key(model.backbones, 0, AugmentConfig())

    def found() -> set[int]:
        return set(find_view_rows(tmp_path / "c", shared, photos, [file_stat(p) for p in photos], 2))

    assert found() == set(range(6))
    for p in photos:
        st = os.stat(p)
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert found() == set(range(6))  # same bytes, new mtime
    with open(photos[1], "r+b") as fh:  # same size, other bytes
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    assert found() == {0, 1, 4, 5}  # photo 1's two views are gone
