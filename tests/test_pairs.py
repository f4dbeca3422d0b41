"""engine.training.pairs: catalogue pairs (METHOD.md §3) and the JSONL pairs file with rejects."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.catalog import read_catalog
from engine.training.pairs import attribute_phrase, catalog_pairs, group_key, read_pairs_file


def _products(fashion_dir: Path, n: int = 200):
    return read_catalog(fashion_dir, limit=n).products


def test_catalog_pairs_follow_method_section_3(fashion_dir):
    products = _products(fashion_dir)
    by_id = {p.product_id: p for p in products}
    pairs = catalog_pairs(products, seed=3, similar_rate=1.0, attribute_query_rate=1.0)
    instance = [p for p in pairs if p.kind == "instance"]
    assert [p.item_id for p in instance] == [p.product_id for p in products]  # every product, once
    for pair in instance:
        product = by_id[pair.item_id]
        assert (pair.query_text, pair.query_image) == (product.title, product.image)
    similar = [p for p in pairs if p.kind == "similar"]
    assert similar
    for pair in similar:
        a, b = by_id[pair.query_product_id], by_id[pair.item_id]
        assert a.product_id != b.product_id and group_key(a) == group_key(b) == pair.group
    phrases = [p for p in pairs if p.kind == "attribute_query"]
    assert phrases and all(p.query_image is None for p in phrases)
    for pair in phrases:
        attrs = by_id[pair.item_id].attributes
        assert pair.query_text == f"{attrs['gender']} {attrs['baseColour']} {attrs['articleType']}".lower()
    assert catalog_pairs(products, seed=3) == catalog_pairs(products, seed=3)  # seeded
    assert catalog_pairs(products, seed=3) != catalog_pairs(products, seed=4)


def test_photo_only_and_title_only_query_pairs(fashion_dir):
    """photo_query / title_query pairs: one modality of the product as the query, the product
    as the item; the other pair kinds are drawn exactly as without them."""
    products = _products(fashion_dir)
    by_id = {p.product_id: p for p in products}
    plain = catalog_pairs(products, seed=3)
    assert not any(p.kind in ("photo_query", "title_query") for p in plain)  # off by default
    mixed = catalog_pairs(products, seed=3, photo_query_rate=1.0, title_query_rate=0.5)
    photo = [p for p in mixed if p.kind == "photo_query"]
    title = [p for p in mixed if p.kind == "title_query"]
    both = [p for p in products if p.title and p.image]
    assert len(photo) == len(both) and 0 < len(title) < len(both)
    for pair in photo:
        product = by_id[pair.item_id]
        assert (pair.query_text, pair.query_image, pair.query_product_id) == (None, product.image, product.product_id)
    for pair in title:
        product = by_id[pair.item_id]
        assert (pair.query_text, pair.query_image, pair.query_product_id) == (product.title, None, product.product_id)
    assert [p for p in mixed if p.kind not in ("photo_query", "title_query")] == plain
    with pytest.raises(ValueError, match="photo_query_rate"):
        catalog_pairs(products, photo_query_rate=1.5)


def test_attribute_photo_pairs_are_the_attribute_level_m_query(fashion_dir):
    """attribute_photo: a product's attribute phrase + its own photo -> another product of its group
    (the nine scenarios' attribute-level m-query); off by default, the other kinds drawn as without it."""
    products = _products(fashion_dir)
    by_id = {p.product_id: p for p in products}
    plain = catalog_pairs(products, seed=3)
    assert not any(p.kind == "attribute_photo" for p in plain)
    mixed = catalog_pairs(products, seed=3, attribute_photo_rate=1.0)
    made = [p for p in mixed if p.kind == "attribute_photo"]
    keys = [group_key(p) for p in products]
    eligible = [p for p, k in zip(products, keys)
                if p.image and k is not None and attribute_phrase(p.attributes) and keys.count(k) > 1]
    assert len(made) == len(eligible) > 0
    for pair in made:
        a, b = by_id[pair.query_product_id], by_id[pair.item_id]
        assert a.product_id != b.product_id and group_key(a) == group_key(b) == pair.group
        assert (pair.query_text, pair.query_image) == (attribute_phrase(a.attributes), a.image)
    assert [p for p in mixed if p.kind != "attribute_photo"] == plain
    half = [p for p in catalog_pairs(products, seed=3, attribute_photo_rate=0.5) if p.kind == "attribute_photo"]
    assert 0 < len(half) < len(made)
    with pytest.raises(ValueError, match="attribute_photo_rate"):
        catalog_pairs(products, attribute_photo_rate=-0.1)


def test_attribute_photo_pairs_can_present_their_items_by_title_alone(fashion_dir):
    """--attribute-photo-text-items: the same attribute_photo pairs, their items resolved without a
    photo (the m2t form); every other pair keeps its item's photo."""
    import numpy as np

    from engine.tokens.cache import TokenTable
    from engine.training.job import build_training_data

    products = _products(fashion_dir, 120)
    full = catalog_pairs(products, seed=3, attribute_photo_rate=1.0)
    text_items = catalog_pairs(products, seed=3, attribute_photo_rate=1.0, attribute_photo_text_items=True)
    assert [(p.kind, p.item_id, p.query_text) for p in full] == [(p.kind, p.item_id, p.query_text) for p in text_items]
    assert all(p.item_text_only == (p.kind == "attribute_photo") for p in text_items)

    def table(keys: list[str]) -> TokenTable:
        rng = np.random.default_rng(0)
        return TokenTable(Path("t"), keys, rng.standard_normal((len(keys), 3, 4)).astype(np.float16),
                          np.full(len(keys), 3, dtype=np.int32))

    texts = table(sorted({p.title for p in products} | {q.query_text for q in full if q.query_text}))
    images = table(sorted({p.image for p in products if p.image}))
    with_photo, _ = build_training_data(products, full, texts, images)
    by_title, _ = build_training_data(products, text_items, texts, images)
    kinds = with_photo.kinds
    assert (kinds == "attribute_photo").sum() > 0
    assert np.all(by_title.item_image[kinds == "attribute_photo"] == -1)
    assert np.all(with_photo.item_image[kinds == "attribute_photo"] >= 0)
    np.testing.assert_array_equal(by_title.item_image[kinds != "attribute_photo"],
                                  with_photo.item_image[kinds != "attribute_photo"])
    np.testing.assert_array_equal(by_title.item_text, with_photo.item_text)


def test_attribute_phrase_needs_all_fields():
    assert attribute_phrase({"gender": "Women", "baseColour": "Black", "articleType": "Heels"}) == "women black heels"
    assert attribute_phrase({"gender": "Women", "baseColour": "Black"}) is None


def test_pairs_file_rejects_bad_lines_and_keeps_the_rest(tmp_path, fashion_dir):
    products = _products(fashion_dir, 20)
    known = {p.product_id for p in products}
    good_image = products[1].image
    lines = [
        json.dumps({"query_text": "navy shirt", "product_id": products[0].product_id}),
        json.dumps({"query_image": good_image, "product_id": products[1].product_id}),
        json.dumps({"query_text": "red shoe", "product_id": "no-such-id"}),
        json.dumps({"query_text": "blue bag", "query_image": "missing/photo.jpg", "product_id": products[2].product_id}),
        json.dumps({"query_image": "missing/photo.jpg", "product_id": products[3].product_id}),
        "{not json",
        "",
        json.dumps(["a", "list"]),
        json.dumps({"query_text": "   ", "product_id": products[4].product_id}),
        json.dumps({"query_text": "no id"}),
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    pairs, rejects = read_pairs_file(path, known)
    assert [(p.item_id, p.query_text, p.query_image) for p in pairs] == [
        (products[0].product_id, "navy shirt", None),
        (products[1].product_id, None, good_image),
        (products[2].product_id, "blue bag", None),  # image missing: kept text-only
    ]
    reasons = {r.line: (r.reason, r.kept) for r in rejects}
    assert "unknown product id 'no-such-id'" in reasons[3][0]
    assert reasons[4][0].startswith("query image not found") and reasons[4][1] == "text-only"
    assert "no query text" in reasons[5][0] and reasons[5][1] is None
    assert reasons[6][0].startswith("invalid JSON")
    assert "expected an object" in reasons[8][0]
    assert "no query" in reasons[9][0]
    assert "no product id" in reasons[10][0]
    # every non-blank line is a pair or a reject (line 4 is both: kept text-only, noted)
    assert len(pairs) + len([r for r in rejects if r.kept is None]) == 9
