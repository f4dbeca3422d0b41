"""engine.tokens.cache on a tiny random model and real photos: reuse, fidelity, bad images."""
from __future__ import annotations

import shutil

import numpy as np
import torch

from engine.catalog import read_catalog
from engine.tokens.cache import cache_images, cache_texts
from engine.tokens.views import TokenBatch, encode_views


def _sample(fashion_dir, n=12):
    products = read_catalog(fashion_dir, limit=n).products
    return [p.title for p in products], [p.image for p in products]


def test_second_run_reads_the_cache_without_calling_the_backbones(tiny_model, fashion_dir, tmp_path):
    texts, images = _sample(fashion_dir)
    bb = tiny_model.backbones
    calls = (bb.text.calls, bb.image.calls)
    t1 = cache_texts(bb, texts, tmp_path, batch_size=5, progress=False)
    i1 = cache_images(bb, images, tmp_path, batch_size=5, progress=False)
    assert bb.text.calls > calls[0] and bb.image.calls > calls[1]
    after_first = (bb.text.calls, bb.image.calls)
    t2 = cache_texts(bb, texts, tmp_path, progress=False)
    i2 = cache_images(bb, images, tmp_path, progress=False)
    assert (bb.text.calls, bb.image.calls) == after_first  # no backbone call the second time
    assert t2.folder == t1.folder and i2.folder == i1.folder
    assert t1.tokens.dtype == np.float16 and isinstance(t2.tokens, np.memmap)
    np.testing.assert_array_equal(np.asarray(t1.tokens), np.asarray(t2.tokens))
    # another sample list is another cache
    t3 = cache_texts(bb, texts[:5], tmp_path, progress=False)
    assert t3.folder != t1.folder


def test_cached_tokens_equal_the_backbone_output(tiny_model, fashion_dir, tmp_path):
    texts, images = _sample(fashion_dir, 6)
    bb = tiny_model.backbones
    table = cache_texts(bb, texts, tmp_path, progress=False)
    itable = cache_images(bb, images, tmp_path, progress=False)
    with torch.inference_mode():
        direct, mask = bb.text.encode([texts[2]])
    got, got_mask, present = table.gather(np.array([table.row(texts[2])]))
    n = int(mask.sum())
    assert bool(present[0]) and int(got_mask.sum()) == n
    torch.testing.assert_close(got[0, :n], direct[0, :n], atol=2e-3, rtol=2e-3)  # fp16 storage
    from engine.model.images import load_image
    with torch.inference_mode():
        pixels = bb.image.preprocess(load_image(images[1]))[None]
        direct_img, _ = bb.image.encode(pixels)
    got_img, _, _ = itable.gather(np.array([itable.row(images[1])]))
    torch.testing.assert_close(got_img, direct_img, atol=5e-3, rtol=5e-3)
    # views from the cache equal the tower's own encode on raw input
    batch = TokenBatch.gather(table, itable, table.rows(texts[:3]), itable.rows(images[:3]))
    with torch.inference_mode():
        emb, ok = encode_views(tiny_model.item_tower, batch)
    want_f = tiny_model.item_tower.encode(texts[:3], images[:3])
    want_t = tiny_model.item_tower.encode(texts[:3], None, view="text")
    want_v = tiny_model.item_tower.encode(None, images[:3], view="image")
    np.testing.assert_allclose(emb["F"].numpy(), want_f, atol=2e-3)
    np.testing.assert_allclose(emb["T"].numpy(), want_t, atol=2e-3)
    np.testing.assert_allclose(emb["V"].numpy(), want_v, atol=2e-3)
    assert all(bool(m.all()) for m in ok.values())


def test_missing_and_corrupt_images_are_reported_and_the_rest_cached(tiny_model, fashion_dir, tmp_path):
    _, images = _sample(fashion_dir, 5)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    copy = tmp_path / "copy.jpg"
    shutil.copy(images[0], copy)
    paths = [str(copy), str(tmp_path / "nope.jpg"), str(corrupt)] + images[1:]
    table = cache_images(tiny_model.backbones, paths, tmp_path / "cache", batch_size=2, progress=False)
    assert table.row(str(tmp_path / "nope.jpg")) == -1 and table.row(str(corrupt)) == -1
    assert set(table.errors) == {str(tmp_path / "nope.jpg"), str(corrupt)}
    assert all(table.row(p) >= 0 for p in [str(copy)] + images[1:])
    tokens, mask, present = table.gather(table.rows([str(copy), str(corrupt), None]))
    assert present.tolist() == [True, False, False] and not mask[1:].any()


def test_a_larger_image_cache_reuses_the_rows_of_finished_ones(tiny_model, fashion_dir, tmp_path):
    """The whole-catalogue cache (eval --robust) copies the rows the split caches hold; a cache
    one of whose files changed since (other size / mtime) is not trusted, so that file is encoded
    again; a photo that failed before is tried again and recorded as an error."""
    _, images = _sample(fashion_dir, 12)
    bb = tiny_model.backbones
    changed = tmp_path / "changed.jpg"
    shutil.copy(images[0], changed)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not a jpeg")
    first = cache_images(bb, images[:6] + [str(corrupt)], tmp_path / "c", batch_size=4, progress=False)
    second = cache_images(bb, images[6:], tmp_path / "c", batch_size=4, progress=False)
    cache_images(bb, [str(changed)], tmp_path / "c", progress=False)
    shutil.copy(images[1], changed)  # new content, new size: its cached row is stale
    calls = bb.image.calls
    both = cache_images(bb, images + [str(changed), str(corrupt)], tmp_path / "c", batch_size=4, progress=False)
    assert bb.image.calls == calls + 1  # one batch: only the changed photo was encoded
    assert both.folder not in (first.folder, second.folder)
    for table in (first, second):
        for key in table.keys:
            if key in images:
                r, s = both.row(key), table.row(key)
                np.testing.assert_array_equal(np.asarray(both.tokens[r]), np.asarray(table.tokens[s]))
                assert both.lengths[r] == table.lengths[s]
    assert both.row(str(corrupt)) == -1 and str(corrupt) in both.errors
    fresh = cache_images(bb, [str(changed)], tmp_path / "fresh", progress=False)
    np.testing.assert_array_equal(np.asarray(both.tokens[both.row(str(changed))]), np.asarray(fresh.tokens[0]))
