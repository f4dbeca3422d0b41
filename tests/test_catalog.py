"""engine.catalog: the shared catalogue reader, on the real fashion data and seeded bad catalogues."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from engine.catalog import (
    FLAG_IMAGE_MISSING, CatalogError, FieldMapping, read_catalog, read_split, write_rejects,
)


def _data_dir() -> Path:
    env = os.environ.get("ECSEARCH_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fashion-products"


DATA = _data_dir()
needs_data = pytest.mark.skipif(not (DATA / "styles.csv").is_file(), reason=f"fashion data not found at {DATA}")

HEADER = "id,gender,masterCategory,subCategory,articleType,baseColour,season,usage,productDisplayName\n"


def _real_rows(n: int) -> list[str]:
    with open(DATA / "styles.csv", encoding="utf-8") as fh:
        return fh.read().splitlines()[1 : n + 1]


def _seed_fashion(tmp_path: Path, rows: list[str]) -> Path:
    root = tmp_path / "fashion"
    (root / "images").mkdir(parents=True)
    (root / "styles.csv").write_text(HEADER + "".join(r + "\n" for r in rows), encoding="utf-8")
    for r in rows:
        pid = r.split(",", 1)[0]
        src = DATA / "images" / f"{pid}.jpg"
        if src.is_file():
            shutil.copy(src, root / "images" / f"{pid}.jpg")
    return root


@needs_data
def test_real_fashion_catalogue_reads_every_product():
    result = read_catalog(DATA)
    assert result.layout == "fashion"
    assert result.read_count == 11882
    assert len(result.products) == 11882 and result.rejects == []
    first = result.products[0]
    assert first.product_id == "1563" and first.title == "Quechua Men Sweat Proof Blue T-shirt"
    assert first.image == str((DATA / "images" / "1563.jpg").resolve())
    assert first.attributes["articleType"] == "Tshirts" and first.row == 2
    # articleType is empty for 640 products: kept, attribute left out
    assert sum("articleType" not in p.attributes for p in result.products) == 640


@needs_data
def test_limit_and_split():
    assert read_catalog(DATA, limit=25).read_count == 25
    split = read_split(DATA)
    assert len(split) == 11882
    assert sum(v == "test" for v in split.values()) == 2000


@needs_data
def test_seeded_bad_fashion_catalogue_accounts_for_every_row(tmp_path):
    good = _real_rows(6)
    rows = list(good)
    rows.append(good[0])                                        # duplicate id (line 8)
    rows.append("999001,Men,Apparel,Topwear,Tshirts,Blue,Fall,Casual,")      # empty title, no image file
    rows.append("999002,Men,Apparel,Topwear,Tshirts,Blue,Fall,Casual,Acme Men, Blue Tee")  # comma in title
    rows.append('999003,Men,"Apparel,Topwear,Tshirts,Blue,Fall,Casual,Broken quote')      # bad quoting
    rows.append("999004,Men,Apparel,Topwear,Tshirts,Blue,Fall,Casual,Acme Men Blue Tee")  # title, no image
    root = _seed_fashion(tmp_path, rows)
    result = read_catalog(root)
    assert result.read_count == len(products_ids := [p.product_id for p in result.products]) + len(result.rejects)
    by_reason = {r.row: r for r in result.rejects}
    assert "duplicate product id" in by_reason[8].reason and by_reason[8].product_id == good[0].split(",")[0]
    assert "neither a usable title nor a usable image" in by_reason[9].reason
    assert "10 fields, header has 9" in by_reason[10].reason
    assert "CSV error" in by_reason[11].reason and "Broken quote" in by_reason[11].raw
    assert "999004" in products_ids
    text_only = next(p for p in result.products if p.product_id == "999004")
    assert text_only.image is None and text_only.flags == [FLAG_IMAGE_MISSING]
    assert len(result.products) == 7

    out = write_rejects(result.rejects, tmp_path / "rejects.jsonl")
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == len(result.rejects)
    assert {"row", "product_id", "reason", "raw"} <= set(lines[0])


@needs_data
def test_jsonl_with_mapping_and_bad_lines(tmp_path):
    img = str(DATA / "images" / "1563.jpg")
    lines = [
        json.dumps({"sku": "a1", "name": "Red Shoe", "photo": img, "colour": "Red", "price": 10}),
        "",                                                      # blank: skipped, not counted
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"sku": "", "name": "No id"}),
        json.dumps({"sku": "a2", "name": "", "photo": "http://example.com/a2.jpg"}),  # URI: kept unchecked
        json.dumps({"sku": "a3", "name": "   "}),
        json.dumps({"sku": "a1", "name": "Again"}),
    ]
    path = tmp_path / "cat.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    mapping = FieldMapping(id="sku", title="name", image="photo", attributes=("colour",))
    result = read_catalog(path, mapping)
    assert result.layout == "jsonl" and result.read_count == 7
    assert [p.product_id for p in result.products] == ["a1", "a2"]
    assert result.products[0].attributes == {"colour": "Red"} and result.products[0].extra == {"price": 10}
    assert result.products[1].image == "http://example.com/a2.jpg" and result.products[1].title is None
    reasons = sorted(r.reason.split(" (")[0] for r in result.rejects)
    assert reasons == sorted([
        "malformed row: invalid JSON", "malformed row: JSON list, expected an object",
        "missing product id", "neither a usable title nor a usable image", "duplicate product id 'a1'",
    ])


def test_csv_autodetect_header_and_template(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "x1.png").write_bytes(b"not checked for decoding here")
    path = tmp_path / "cat.csv"
    path.write_text('product_id,title,gender\nx1,"Blue, striped shirt",Men\nx2,Plain shirt,\n'
                    'x3,"Two-line\ntitle",Women\n', encoding="utf-8")
    result = read_catalog(path, FieldMapping(image="pics/{id}.png"))
    assert result.layout == "csv" and result.rejects == []
    x1, x2, x3 = result.products
    assert x3.title == "Two-line\ntitle" and x3.row == 4
    assert x1.title == "Blue, striped shirt" and x1.image == str((tmp_path / "pics" / "x1.png").resolve())
    assert x1.attributes == {"gender": "Men"} and x2.attributes == {}
    assert x2.flags == [FLAG_IMAGE_MISSING] and "x2.png" in x2.flag_detail[FLAG_IMAGE_MISSING]


def test_invalid_utf8_row_is_rejected_not_fatal(tmp_path):
    path = tmp_path / "cat.csv"
    path.write_bytes(b"id,title\n1,ok\n2,bad \xff byte\n3,fine\n")
    result = read_catalog(path)
    assert [p.product_id for p in result.products] == ["1", "3"]
    assert result.rejects[0].row == 3 and "invalid UTF-8" in result.rejects[0].reason


def test_unusable_catalogue_raises(tmp_path):
    with pytest.raises(CatalogError, match="no such catalogue"):
        read_catalog(tmp_path / "missing.csv")
    with pytest.raises(CatalogError, match="styles.csv"):
        read_catalog(tmp_path)
    (tmp_path / "noid.csv").write_text("name,title\na,b\n", encoding="utf-8")
    with pytest.raises(CatalogError, match="no product id field"):
        read_catalog(tmp_path / "noid.csv")
