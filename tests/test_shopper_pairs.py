"""engine.catalog.shopper_queries and engine.training.pairs.shopper_pairs on the real fashion catalogue."""
from __future__ import annotations

import numpy as np
import pytest

from engine.catalog import read_catalog
from engine.training.pairs import shopper_pairs
from engine.catalog.shopper_queries import (
    attribute_phrases, brand_of, brand_queries, facet_key, modifier_text, partial_title, product_facets,
)


@pytest.fixture(scope="module")
def products(fashion_dir):
    return read_catalog(fashion_dir, limit=600).products


def test_brand_is_the_words_before_the_gender_word():
    assert brand_of("Puma Men Black Sports Shoes") == "puma"
    assert brand_of("United Colors of Benetton Women Multi Coloured Top") == "united colors of benetton"
    assert brand_of("ADIDAS Black Backpack") is None  # no gender word: no guess
    assert brand_of("Men Black Shoes") is None and brand_of(None) is None
    facets = product_facets({"articleType": "Formal Shoes", "baseColour": "Black", "gender": "Men"},
                            "Red Tape Men Black Leather Formal Shoes")
    assert facets["brand"] == "red tape" and facets["material"] == "leather"
    assert brand_queries(facets) == [("red tape formal shoes", ("brand", "articleType")),
                                     ("red tape black formal shoes", ("brand", "baseColour", "articleType"))]
    assert ("black formal shoes for men", ("gender", "baseColour", "articleType")) in attribute_phrases(facets)
    assert facet_key(facets, ("brand", "articleType")) == "red tape|Formal Shoes"
    assert facet_key({"usage": "NA"}, ("usage",)) is None
    assert [modifier_text(f, v) for f, v in (("baseColour", "Navy Blue"), ("gender", "Women"),
                                             ("usage", "Sports"), ("material", "leather"))] == \
        ["in navy blue", "for women", "for sports", "in leather"]


def test_partial_title_is_a_shorter_run_of_title_words():
    rng = np.random.default_rng(0)
    title = "Nike Men Air Max Elevate Black Sandals"
    for _ in range(50):
        part = partial_title(title, rng)
        n = len(part.split())
        assert 2 <= n < 7 and part in title.lower()
    assert partial_title("Two words", rng) is None


def test_shopper_pairs_kinds_and_relevance(products):
    by_id = {p.product_id: p for p in products}
    facets = {p.product_id: product_facets(p.attributes, p.title) for p in products}
    pairs = shopper_pairs(products, seed=1, brand_query_rate=1.0, partial_title_rate=1.0,
                          phrase_query_rate=1.0, composed_rate=1.0)
    kinds = {k: [p for p in pairs if p.kind == k] for k in ("brand_query", "partial_title", "phrase_query", "composed")}
    assert all(kinds.values()), {k: len(v) for k, v in kinds.items()}
    for pair in kinds["brand_query"] + kinds["phrase_query"]:
        item = facets[pair.item_id]
        assert pair.query_image is None and pair.group == facet_key(item, pair.fields)
        assert item["articleType"].lower() in pair.query_text
    for pair in kinds["brand_query"]:
        assert pair.query_text.startswith(facets[pair.item_id]["brand"] + " ")
    for pair in kinds["partial_title"]:
        assert pair.query_product_id == pair.item_id
        assert pair.query_text in " ".join(by_id[pair.item_id].title.lower().split())
    for pair in kinds["composed"]:
        source = next(p for p in products if p.image == pair.query_image)
        item, src = facets[pair.item_id], facets[source.product_id]
        field = pair.fields[1]
        assert pair.fields[0] == "articleType" and item["articleType"] == src["articleType"]
        assert source.product_id != pair.item_id and src.get(field) != item[field]
        assert pair.query_text == modifier_text(field, item[field])
        assert pair.group == facet_key(item, pair.fields) and pair.query_product_id is None
    assert {p.fields[1] for p in kinds["composed"]} >= {"baseColour", "gender"}


def test_shopper_pairs_are_seeded_and_kinds_independent(products):
    full = dict(brand_query_rate=0.5, partial_title_rate=0.5, phrase_query_rate=0.5, composed_rate=0.5)
    assert shopper_pairs(products, seed=2, **full) == shopper_pairs(products, seed=2, **full)
    assert shopper_pairs(products, seed=2, **full) != shopper_pairs(products, seed=3, **full)
    only_brand = shopper_pairs(products, seed=2, brand_query_rate=0.5)
    assert only_brand == [p for p in shopper_pairs(products, seed=2, **full) if p.kind == "brand_query"]
    assert shopper_pairs(products, seed=2) == []
    with pytest.raises(ValueError, match="composed_rate"):
        shopper_pairs(products, composed_rate=1.5)
