"""Filter parsing and record flattening (pure functions of server.filters)."""
from __future__ import annotations

import pytest

from server.filters import FilterError, MetadataFilter, flatten_record, parse_filters

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
