"""Catalogue changes for an incremental index version: a changes file, or a catalogue diff.

A **changes file** is JSONL, one change per line (our choice)::

    {"op": "upsert", "row": {...}}                  # a full product row, in the catalogue's own fields
    {"op": "upsert", "row": {...}, "image": "new.jpg"}   # optional: the photo (relative: to this file)
    {"op": "delete", "product_id": "15970"}

``row`` holds the fields a catalogue row holds (for the fashion layout the ``styles.csv``
columns; for JSONL / CSV catalogues their own fields) and is read with the base version's
field mapping, so an upsert becomes exactly the ``Product`` a full build would read.
Every line is applied or rejected with its reason (malformed JSON, unknown op, a second
change of one product id, a delete of an id the base does not hold, a row the catalogue
rules reject); nothing is dropped silently.

A **catalogue diff** compares a new catalogue with the base version's metadata records:
a product is upserted (re-encoded) when what its item vector depends on differs: its title
or its photo's sha256 (or it is new); it is a metadata update (vector kept, record
replaced) when only its attributes, extra fields or image path differ; it is deleted when
it is gone. Image checksums are stored in every record by the full build
(``image_sha256``); a base record without one counts as changed when it has an image.
Source: our choice.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from engine.catalog import CatalogReadResult, FieldMapping, Product, Reject, read_catalog
from engine.catalog.formats import iter_jsonl_records
from engine.model.file_hashing import sha256_file

COMPARED_FIELDS = ("title", "image", "attributes", "extra")


@dataclass
class ChangeSet:
    """What an incremental build applies to its base.

    upserts: products to (re-)encode, in change order; deletes: product ids to remove;
    updates: products whose record changes but whose item vector does not (catalogue diff);
    rejects: change lines (or new catalogue rows) not applied, with their reason;
    read_count: change lines (or catalogue rows) read; source: the file they came from.
    """

    upserts: list[Product] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)
    updates: list[Product] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    read_count: int = 0
    source: str = ""


def image_checksum(image: str | None) -> str | None:
    """``sha256`` hex digest of a local image file, None for no image, a URI or a missing file."""
    if not image or "://" in image:
        return None
    path = Path(image)
    return sha256_file(path) if path.is_file() else None


def read_changes(path: Path, mapping: FieldMapping, image_root: Path, base_ids: set[str]) -> ChangeSet:
    """Read a changes file (see the module docstring).

    mapping: the base catalogue's field mapping (rows are read with it); image_root: folder
    relative image paths of rows resolve against (the base catalogue's); base_ids: product
    ids of the base version (a delete of another id is rejected).
    Raises CatalogError when the file does not exist; bad lines are rejects.
    """
    from engine.catalog import CatalogError

    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"{path}: no such changes file")
    out = ChangeSet(source=str(path.resolve()))
    deletes: list[tuple[int, str, Any]] = []
    rows: list[tuple[int, dict, str | None, Any]] = []
    for line_no, fields, raw, error in iter_jsonl_records(path):
        out.read_count += 1
        change, reason = _parse_change(fields, error)
        pid = change.get("product_id") if change else None
        if reason is None and change["op"] == "delete" and pid not in base_ids:
            reason = f"delete of product id {pid!r}, which the base version does not hold"
        if reason is not None:
            out.rejects.append(Reject(line_no, pid, reason, raw))
        elif change["op"] == "delete":
            deletes.append((line_no, pid, raw))
        else:
            rows.append((line_no, change["row"], change.get("image"), raw))
    upserts = _read_upserts(rows, mapping, image_root, path.parent.resolve(), out)
    _one_change_per_product(deletes, upserts, out)
    return out


def _one_change_per_product(deletes: list[tuple[int, str, Any]], upserts: list[tuple[int, Product, Any]],
                            out: ChangeSet) -> None:
    """Apply the first change of each product id (in line order); reject the later ones."""
    first: dict[str, int] = {}
    changes = sorted([(n, pid, None, raw) for n, pid, raw in deletes] +
                     [(n, p.product_id, p, raw) for n, p, raw in upserts], key=lambda c: c[0])
    for line_no, pid, product, raw in changes:
        if pid in first:
            out.rejects.append(Reject(line_no, pid, f"a second change of product id {pid!r} (first at line "
                                      f"{first[pid]}); one change per product", raw))
            continue
        first[pid] = line_no
        if product is None:
            out.deletes.append(pid)
        else:
            out.upserts.append(product)
    out.rejects.sort(key=lambda r: r.row)


def _parse_change(fields: dict | None, error: str | None) -> tuple[dict | None, str | None]:
    """``(change, None)`` with ``op``, ``product_id`` (str, for a delete) / ``row``, or ``(None, reason)``."""
    if error is not None or fields is None:
        return None, error or "malformed change line"
    op = fields.get("op")
    if op == "delete":
        pid = fields.get("product_id")
        if not isinstance(pid, (str, int)) or not str(pid).strip():
            return None, "delete without a product_id (a non-empty string)"
        return {"op": "delete", "product_id": str(pid).strip()}, None
    if op == "upsert":
        row = fields.get("row")
        if not isinstance(row, dict) or not row:
            return None, "upsert without a row (a JSON object of the catalogue's fields)"
        image = fields.get("image")
        if image is not None and (not isinstance(image, str) or not image.strip()):
            return None, "upsert image must be a non-empty path string"
        return {"op": "upsert", "row": row, "image": image, "product_id": None}, None
    return None, f"unknown op {op!r}; expected 'upsert' or 'delete'"


def _read_upserts(rows: list[tuple[int, dict, str | None, Any]], mapping: FieldMapping, image_root: Path,
                  changes_dir: Path, out: ChangeSet) -> list[tuple[int, Product, Any]]:
    """Turn upsert rows into products with the catalogue reader (the same rules as a full
    build), through a temporary JSONL file; line numbers are those of the changes file.
    Rows the reader rejects go to ``out.rejects``; returns ``(line, product, raw)``."""
    if not rows:
        return []
    mapping = FieldMapping(mapping.id, mapping.title, mapping.image, mapping.attributes, mapping.extra,
                           str(mapping.image_root or image_root))
    with tempfile.TemporaryDirectory(prefix="ecsearch-upserts-") as tmp:
        file = Path(tmp) / "upserts.jsonl"
        file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for _, r, _, _ in rows), encoding="utf-8")
        read = read_catalog(file, mapping, layout="jsonl")
    by_line = {n + 1: entry for n, entry in enumerate(rows)}
    for reject in read.rejects:
        line_no, _, _, raw = by_line[reject.row]
        reason = reject.reason.split(" (first seen at row")[0] if "duplicate" in reject.reason else reject.reason
        out.rejects.append(Reject(line_no, reject.product_id, reason, raw))
    found = []
    for product in read.products:
        line_no, _, image, raw = by_line[product.row]
        product.row = line_no
        if image is not None:
            _set_image(product, Path(image) if Path(image).is_absolute() else changes_dir / image)
        found.append((line_no, product, raw))
    return found


def _set_image(product: Product, path: Path) -> None:
    """The upsert's own photo; a missing file is flagged as the catalogue reader flags it."""
    from engine.catalog import FLAG_IMAGE_MISSING

    if path.is_file():
        product.image = str(path.resolve())
        return
    product.image = None
    product.flags.append(FLAG_IMAGE_MISSING)
    product.flag_detail[FLAG_IMAGE_MISSING] = f"image file not found: {path}"


def diff_catalog(catalog: CatalogReadResult, base_records: Iterable[dict[str, Any]]) -> ChangeSet:
    """Changes that turn the base version (its metadata ``base_records``) into ``catalog``.

    Upserts: products new to the base, or whose title or photo (sha256) differ, in
    catalogue order; updates: products whose other ``COMPARED_FIELDS`` differ; deletes:
    base products absent from ``catalog`` (a product the new catalogue rejects counts as
    absent), in base order; rejects: the catalogue's.
    """
    base = {str(r["product_id"]): r for r in base_records}
    out = ChangeSet(rejects=list(catalog.rejects), read_count=catalog.read_count, source=catalog.source)
    present = set()
    for product in catalog.products:
        present.add(product.product_id)
        record = base.get(product.product_id)
        if record is None or _vector_input_differs(product, record):
            out.upserts.append(product)
        elif any(getattr(product, name) != record.get(name) for name in COMPARED_FIELDS):
            out.updates.append(product)
    out.deletes = [pid for pid in base if pid not in present]
    return out


def _vector_input_differs(product: Product, record: dict[str, Any]) -> bool:
    """Whether the item vector may differ: another title, or another photo (by sha256)."""
    if product.title != record.get("title") or (product.image is None) != (record.get("image") is None):
        return True
    if product.image is None:
        return False
    stored = record.get("image_sha256")
    return stored is None or stored != image_checksum(product.image)
