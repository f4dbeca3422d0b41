"""Filter parsing, record flattening and the per-version cache (server.filters)."""
from __future__ import annotations

import numpy as np
import pytest

from server.filters import FilterError, MetadataFilter, flatten_record, parse_filters
from tests.test_server_support import index_root, server_model, subset  # noqa: F401

FIELDS = {"gender", "articleType", "baseColour"}


def test_filters_on_one_field_are_anded_and_values_any_of():
    parsed = parse_filters([("gender", ["Women"]), ("articleType", ["Heels", "Flats"])], FIELDS)
    assert parsed == [MetadataFilter("gender", frozenset({"Women"})),
                      MetadataFilter("articleType", frozenset({"Heels", "Flats"}))]
    twice = parse_filters([("articleType", ["Heels", "Flats"]), ("articleType", ["Flats", "Sandals"])], FIELDS)
    assert twice == [MetadataFilter("articleType", frozenset({"Flats"}))]


@pytest.mark.parametrize("pairs,message", [
    ([("colour", ["Red"])], "unknown filter field 'colour'; known fields: articleType, baseColour, gender"),
    ([("", ["Red"])], "empty field name"),
    ([("gender", [])], "no value"),
])
def test_bad_filters_are_rejected_with_a_precise_message(pairs, message):
    with pytest.raises(FilterError, match=message):
        parse_filters(pairs, FIELDS)


def test_flatten_record_of_an_indexer_record():
    record = {"product_id": "15970", "title": "Turtle Check Men Navy Blue Shirt", "image": "/data/15970.jpg",
              "attributes": {"gender": "Men", "articleType": "Shirts", "title": "never overrides"},
              "extra": {"year": 2011}, "flags": ["text_only", "x"], "flag_detail": {"text_only": "no image"},
              "row": 3, "shard": 0, "missing": None, "empty": [], "nothing": {}}
    flat = flatten_record(record)
    assert flat == {"product_id": "15970", "title": "Turtle Check Men Navy Blue Shirt", "image": "/data/15970.jpg",
                    "gender": "Men", "articleType": "Shirts", "year": "2011", "flags": "text_only,x",
                    "flag_detail": '{"text_only": "no image"}', "row": "3", "shard": "0"}


def test_version_cache_gives_what_the_index_gives_and_stays_bounded(index_root):
    from indexer.search import open_index
    from server.filters import VersionCache

    with open_index(index_root) as index:
        pids = sorted({pid for row in index.search(index.vectors(np.arange(3)), 4)[1] for pid in row})[:6]
        cache = VersionCache(index, records=4, filter_sets=2)
        expected = [flatten_record(r) for r in index.get_products(pids)]
        assert cache.records(pids) == expected  # 6 records through a cache of 4
        assert cache.records(pids[:2] + ["no such id"] + pids[:1]) == expected[:2] + [None] + expected[:1]
        assert len(cache._records._items) <= 4
        filters = parse_filters([("gender", ["Women", "Men"])], index.facet_values())
        allowed = cache.allowed_ids(filters)
        assert allowed.tolist() == index.ids_with({"gender": ["Men", "Women"]}).tolist()
        assert cache.allowed_ids(filters) is allowed and not allowed.flags.writeable
        for values in (["Women"], ["Men"], ["Boys"]):
            cache.allowed_ids(parse_filters([("gender", values)], index.facet_values()))
        assert len(cache._allowed._items) <= 2

