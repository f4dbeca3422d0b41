"""Index builds reuse the backbone tokens a training token cache holds (``--token-cache``):
real fashion products and images, tiny random backbones, real cache folders."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.catalog import read_catalog
from engine.cli import main as ecsearch
from engine.cpu_features import bf16_runs, describe_cpu
from engine.model.model_folder import load_model
from engine.tokens.cache import cache_images, cache_texts
from engine.tokens.lookup import TokenLookup
from indexer.encode import FLAG_IMAGE_UNREADABLE, EncodeOptions, encode_products
from tests.tiny_models import make_tiny_bert, make_tiny_model

N_PRODUCTS, N_CACHED = 24, 16
HEADER = "id,gender,masterCategory,subCategory,articleType,baseColour,season,usage,productDisplayName\n"


def _catalogue(fashion_dir: Path, dest: Path) -> Path:
    """A fashion-layout copy of the first N_PRODUCTS real products (images copied, so tests may change them)."""
    rows = (fashion_dir / "styles.csv").read_text(encoding="utf-8").splitlines()[1:N_PRODUCTS + 1]
    (dest / "images").mkdir(parents=True)
    for r in rows:
        pid = r.split(",", 1)[0]
        shutil.copy2(fashion_dir / "images" / f"{pid}.jpg", dest / "images" / f"{pid}.jpg")
    (dest / "styles.csv").write_text(HEADER + "\n".join(rows) + "\n", encoding="utf-8")
    return dest


def _train_cache(backbones, products, root: Path) -> None:
    """Cache the first N_CACHED products' titles and photos, as ``engine.training.job`` does for its split."""
    seen = products[:N_CACHED]
    cache_texts(backbones, [p.title for p in seen if p.title], root, progress=False)
    cache_images(backbones, [p.image for p in seen if p.image], root, progress=False)


def _encode(model, products, work: Path, token_cache: Path | None, precision: str = "fp32", view: str = "fused"):
    options = EncodeOptions(batch_size=8, chunk_size=10, workers=0, precision=precision, view=view,
                            token_cache=str(token_cache) if token_cache else None)
    return encode_products(model, products, work, options, log=lambda _m: None)


def _cosines(a, b) -> np.ndarray:
    return np.sum(a.vectors * b.vectors, axis=1) / (np.linalg.norm(a.vectors, axis=1) * np.linalg.norm(b.vectors, axis=1))


@pytest.fixture()
def setup(fashion_dir, tiny_model_dir, tmp_path):
    catalog = _catalogue(fashion_dir, tmp_path / "fashion")
    products = read_catalog(catalog).products
    model = load_model(tiny_model_dir)
    cache = tmp_path / "cache"
    _train_cache(model.backbones, products, cache)
    return model, products, cache, tmp_path


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cached_tokens_give_the_fresh_vectors_and_the_rest_is_encoded(setup, precision):
    if precision == "bf16" and not bf16_runs():
        pytest.skip(f"bf16 kernels do not run here ({describe_cpu()})")
    model, products, cache, tmp = setup
    fresh = _encode(model, products, tmp / "fresh", None, precision)
    reused = _encode(model, products, tmp / "reused", cache, precision)
    assert reused.indexed == fresh.indexed == list(range(len(products)))
    assert _cosines(reused, fresh).min() >= 0.999
    seen, rest = products[:N_CACHED], products[N_CACHED:]
    assert reused.sources == {
        "texts_from_cache": sum(p.title is not None for p in seen),
        "images_from_cache": sum(p.image is not None for p in seen),
        "texts_from_backbones": sum(p.title is not None for p in rest),
        "images_from_backbones": sum(p.image is not None for p in rest)}
    assert fresh.sources["texts_from_cache"] == fresh.sources["images_from_cache"] == 0
    assert fresh.sources["images_from_backbones"] == sum(p.image is not None for p in products)


@pytest.mark.parametrize("view", ["text", "image"])
def test_one_modality_views_use_only_that_modality_of_the_cache(setup, view):
    model, products, cache, tmp = setup
    fresh = _encode(model, products, tmp / "fresh", None, view=view)
    reused = _encode(model, products, tmp / "reused", cache, view=view)
    assert _cosines(reused, fresh).min() >= 0.999
    used, unused = ("texts", "images") if view == "text" else ("images", "texts")
    has = (lambda p: p.title is not None) if view == "text" else (lambda p: p.image is not None)
    assert reused.sources[f"{used}_from_cache"] == sum(map(has, products[:N_CACHED]))
    assert reused.sources[f"{used}_from_backbones"] == sum(map(has, products[N_CACHED:]))
    assert reused.sources[f"{unused}_from_cache"] == reused.sources[f"{unused}_from_backbones"] == 0


def test_a_changed_photo_is_encoded_again_and_a_touched_one_is_not(setup):
    model, products, cache, tmp = setup
    touched, replaced = products[1].image, products[2].image
    st = os.stat(touched)
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))      # same bytes, new mtime
    shutil.copy(products[N_CACHED + 1].image, replaced)                           # another photo at that path
    lookup = TokenLookup(model.backbones, cache)
    assert lookup.image(touched) is not None and lookup.image(replaced) is None   # by the recorded digest
    older = shutil.copytree(cache, tmp / "cache-without-digests")                 # as written before the digests
    for meta_file in older.glob("image-*/meta.json"):
        meta = json.loads(meta_file.read_text())
        del meta["digests"]
        meta_file.write_text(json.dumps(meta))
    assert TokenLookup(model.backbones, older).image(touched) is None              # mtime alone decides there
    reused = _encode(model, products, tmp / "reused", cache)
    fresh = _encode(model, products, tmp / "fresh", None)
    assert reused.sources["images_from_cache"] == sum(p.image is not None for p in products[:N_CACHED]) - 1
    assert _cosines(reused, fresh).min() >= 0.999   # product 2 got the new photo's vector, not the cached one
    old_photo = _encode(model, products[N_CACHED + 1:N_CACHED + 2], tmp / "other", None).vectors[0]
    assert float(reused.vectors[2] @ old_photo) < float(reused.vectors[2] @ fresh.vectors[2])


def test_a_cache_of_other_backbones_or_preprocessing_is_not_used(setup, tiny_backbone_dir):
    model, products, _cache, tmp = setup
    other = make_tiny_model(tiny_backbone_dir, text_backbone={"type": "hf", "path": str(tiny_backbone_dir / "tiny-bert"),
                                                              "max_length": 16})
    assert other.backbones.text_fingerprint == model.backbones.text_fingerprint   # same weights, other max_length
    _train_cache(other.backbones, products, tmp / "other-cache")
    lookup = TokenLookup(model.backbones, tmp / "other-cache")
    text_folders = [name for name in lookup.skipped if name.startswith("text-")]
    assert text_folders and "max_length" in lookup.skipped[text_folders[0]]
    reused = _encode(model, products, tmp / "reused", tmp / "other-cache")
    assert reused.sources["texts_from_cache"] == 0   # texts differ in max_length; products need both modalities
    other_bert = make_tiny_bert(tmp / "tiny-bert-seed7", seed=7)                   # other weights
    retrained = make_tiny_model(tiny_backbone_dir, text_backbone={"type": "hf", "path": str(other_bert),
                                                                  "max_length": 64})
    _train_cache(retrained.backbones, products, tmp / "third-cache")
    lookup = TokenLookup(model.backbones, tmp / "third-cache")
    assert any("fingerprint differs" in why for why in lookup.skipped.values())
    assert _encode(model, products, tmp / "third", tmp / "third-cache").sources["texts_from_cache"] == 0


def test_bad_photos_keep_todays_handling(setup):
    model, products, cache, tmp = setup
    corrupt = products[3].image
    data = Path(corrupt).read_bytes()
    Path(corrupt).write_bytes(data[: len(data) // 2])
    _train_cache(model.backbones, products, tmp / "cache-with-corrupt")          # the cache records the failure
    reused = _encode(model, products, tmp / "reused", tmp / "cache-with-corrupt")
    fresh = _encode(model, products, tmp / "fresh", None)
    assert FLAG_IMAGE_UNREADABLE in reused.flags[3]
    assert reused.flags == fresh.flags and reused.rejects == fresh.rejects
    assert reused.sources["images_from_cache"] == sum(p.image is not None for p in products[:N_CACHED]) - 1


def test_a_folder_without_per_image_stats_is_used_all_or_nothing(setup):
    model, products, cache, tmp = setup
    image_folder = next(cache.glob("image-*"))
    meta = json.loads((image_folder / "meta.json").read_text())
    del meta["files"]                                                             # as written before the stats
    (image_folder / "meta.json").write_text(json.dumps(meta))
    assert image_folder.name in TokenLookup(model.backbones, cache).used
    st = os.stat(products[0].image)
    os.utime(products[0].image, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    lookup = TokenLookup(model.backbones, cache)
    assert "images changed" in lookup.skipped[image_folder.name]
    assert _encode(model, products, tmp / "reused", cache).sources["images_from_cache"] == 0


def test_augmented_view_folders_are_left_to_the_views_step_and_named_so(setup):
    # the training job's augmented caches live beside the clean ones; the clean lookup says why it
    # leaves them (the item photo views read them), not that they are not cache folders
    from engine.tokens.augment_cache import cache_augmented_images

    model, products, cache, tmp = setup
    aug = cache_augmented_images(model.backbones, [products[0].image], cache, views=1, seed=0, progress=False)
    lookup = TokenLookup(model.backbones, cache)
    assert aug.folder.name not in lookup.used
    assert "augmented photo views" in lookup.skipped[aug.folder.name]


def test_cli_records_the_sources_in_the_manifest(setup, tiny_model_dir, capsys):
    model, products, cache, tmp = setup
    root = tmp / "root"
    status = ecsearch(["index", "--catalog", str(tmp / "fashion"), "--model", str(tiny_model_dir), "--index-root",
                       str(root), "--token-cache", str(cache), "--workers", "0", "--recall-queries", "8"])
    assert status == 0
    summary = json.loads(capsys.readouterr().out)
    manifest = json.loads((Path(summary["path"]) / "manifest.json").read_text())
    assert manifest["build"]["token_cache"] == str(cache)
    assert manifest["build"]["sources"] == summary["sources"]
    assert 0 < manifest["timings_s"]["encode_from_cache"] <= manifest["timings_s"]["encode"]
    assert summary["sources"]["images_from_cache"] == sum(p.image is not None for p in products[:N_CACHED])
    assert summary["sources"]["images_from_backbones"] == sum(p.image is not None for p in products[N_CACHED:])


def test_cli_refuses_a_token_cache_that_is_not_a_folder(setup, tiny_model_dir, capsys):
    _model, _products, _cache, tmp = setup
    status = ecsearch(["index", "--catalog", str(tmp / "fashion"), "--model", str(tiny_model_dir), "--index-root",
                       str(tmp / "root"), "--token-cache", str(tmp / "no-such-cache")])
    assert status == 2
    assert "no-such-cache: not a folder" in capsys.readouterr().err
