"""Catalogue file formats: layout detection and raw-record iterators for JSONL and CSV/TSV
(rows as ``(line_no, fields | None, raw, error | None)``); see ``engine.catalog`` for the rules."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator


class CatalogError(ValueError):
    """The catalogue as a whole cannot be read (no such path, unknown layout, no id column)."""


def detect_layout(path: str | Path) -> str:
    """Return ``"fashion"``, ``"jsonl"``, ``"csv"`` or ``"tsv"`` for ``path``.

    Raises CatalogError when the path does not exist or is a folder without ``styles.csv``.
    """
    p = Path(path)
    if p.is_dir():
        if (p / "styles.csv").is_file():
            return "fashion"
        raise CatalogError(f"{p}: a folder catalogue must contain styles.csv (fashion layout)")
    if not p.is_file():
        raise CatalogError(f"{p}: no such catalogue file or folder")
    by_suffix = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv"}
    if p.suffix.lower() in by_suffix:
        return by_suffix[p.suffix.lower()]
    with open(p, "rb") as fh:
        head = fh.read(4096).lstrip()
    return "jsonl" if head.startswith(b"{") else "csv"


# ----------------------------------------------------------------------------- raw records


def iter_jsonl_records(path: Path) -> Iterator[tuple[int, dict | None, Any, str | None]]:
    """Yield ``(line_no, fields | None, raw, error)`` per non-blank line."""
    with open(path, "rb") as fh:
        for line_no, raw_bytes in enumerate(fh, start=1):
            try:
                line = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield (line_no, None, raw_bytes.decode("utf-8", "replace").rstrip("\r\n"),
                       f"malformed row: invalid UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            if line_no == 1:
                line = line.lstrip("\ufeff")
            if not line.strip():
                continue
            text = line.rstrip("\r\n")
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                yield line_no, None, text, f"malformed row: invalid JSON ({exc.msg} at column {exc.colno})"
                continue
            if not isinstance(obj, dict):
                yield line_no, None, text, f"malformed row: JSON {type(obj).__name__}, expected an object"
                continue
            yield line_no, obj, obj, None


def _parse_record(lines: list[str], delimiter: str) -> tuple[list[str] | None, str | None]:
    try:
        rows = list(csv.reader(lines, delimiter=delimiter, strict=True))
    except csv.Error as exc:
        return None, f"malformed row: CSV error ({exc})"
    if len(rows) != 1:
        return None, f"malformed row: CSV error ({len(rows)} records where one was expected)"
    return rows[0], None


def iter_csv_records(path: Path, delimiter: str) -> Iterator[tuple[int, dict | None, Any, str | None]]:
    """Yield ``(line_no, fields | None, raw, error)`` per CSV record after the header.

    A record may span lines inside a quoted field. When such a multi-line record is
    malformed (an unclosed quote swallowing the next lines), only its first line is
    rejected and the following lines are read again as records of their own, so one bad
    quote never hides the products after it (our choice).
    """
    with open(path, "r", encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        physical = [(no, line) for no, line in enumerate(fh, start=1)]
    if not physical:
        return
    header_values, error = _parse_record([physical[0][1]], delimiter)
    if header_values is None:
        raise CatalogError(f"{path}: unreadable CSV header ({error})")
    header = [h.strip() for h in header_values]
    width = len(header)
    pos = 1
    while pos < len(physical):
        start, first = physical[pos]
        end = pos + 1
        quotes = first.count('"')
        while quotes % 2 == 1 and end < len(physical):  # inside a quoted field: record goes on
            quotes += physical[end][1].count('"')
            end += 1
        lines = [line for _, line in physical[pos:end]]
        values, error = _parse_record(lines, delimiter)
        if values is not None and len(values) != width:
            error = f"malformed row: {len(values)} fields, header has {width}"
        if error is not None and end - pos > 1:  # reject the first line only, re-read the rest
            lines, end = [first], pos + 1
            values, error = _parse_record(lines, delimiter)
            if values is not None and len(values) != width:
                error = f"malformed row: {len(values)} fields, header has {width}"
            error = error or "malformed row: unbalanced quotes"
        pos = end
        raw = "".join(lines).rstrip("\r\n")
        if not raw.strip():
            continue  # blank line
        if any("\udc80" <= ch <= "\udcff" for ch in raw):  # undecodable bytes (surrogateescape)
            yield start, None, raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), \
                "malformed row: invalid UTF-8"
            continue
        if error is not None or values is None:
            yield start, None, raw, error
            continue
        fields = dict(zip(header, values))
        yield start, fields, dict(fields), None
