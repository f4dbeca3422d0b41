"""Catalogue rows → ``Product`` / ``Reject``: field mapping, image resolution, duplicate ids,
rejects report, fixed split; the rules are listed in ``engine.catalog``."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from engine.catalog.formats import CatalogError, iter_csv_records, iter_jsonl_records, detect_layout

FASHION_ATTRIBUTES: tuple[str, ...] = (
    "gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "usage",
)
# Column names tried, in order, when a FieldMapping field is left as None (our choice).
ID_CANDIDATES: tuple[str, ...] = ("product_id", "id", "item_id", "sku")
TITLE_CANDIDATES: tuple[str, ...] = ("title", "productDisplayName", "name", "product_name")
IMAGE_CANDIDATES: tuple[str, ...] = ("image", "image_path", "image_url", "image_uri", "imagePath")

FLAG_IMAGE_MISSING = "image_missing"


@dataclass
class FieldMapping:
    """Which catalogue field holds what. ``None`` means: detect from the header / keys.

    id: column holding the product id.
    title: column holding the product title.
    image: column holding an image path / URI, or a template containing ``{`` such as
        ``"images/{id}.jpg"`` formatted with the row's fields (``{id}`` is the product id).
        Relative paths are resolved against ``image_root``.
    attributes: columns copied into ``Product.attributes`` (category facets; values as str).
        ``None``: the fashion attribute names that are present.
    extra: columns copied into ``Product.extra``. ``None``: every column not used above.
    image_root: folder that relative image paths are resolved against; ``None``: the
        catalogue file's folder (the fashion folder itself for the fashion layout).
    """

    id: str | None = None
    title: str | None = None
    image: str | None = None
    attributes: Sequence[str] | None = None
    extra: Sequence[str] | None = None
    image_root: str | None = None


FASHION_MAPPING = FieldMapping(
    id="id", title="productDisplayName", image="images/{id}.jpg",
    attributes=FASHION_ATTRIBUTES, extra=(),
)


@dataclass
class Product:
    """One usable catalogue product.

    product_id: the catalogue's id, as a string (stripped).
    title: the product title, or None when empty.
    image: absolute local path or URI of the product photo, or None (no image, or a local
        file that does not exist: see ``flags``).
    attributes: category facets, str -> str (empty values left out).
    extra: other catalogue fields, kept as read.
    row: 1-based line number where the record starts in the source file (header = line 1).
    flags: catalogue-level notes, e.g. ``"image_missing"`` (see ``flag_detail``).
    """

    product_id: str
    title: str | None
    image: str | None
    attributes: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    row: int = 0
    flags: list[str] = field(default_factory=list)
    flag_detail: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict of every field."""
        return asdict(self)


@dataclass
class Reject:
    """A catalogue row that was not turned into a product, and why.

    row: 1-based line number in the source file; product_id: the id if one could be read;
    reason: a precise sentence; raw: the row as read (dict of fields, or the raw line).
    """

    row: int
    product_id: str | None
    reason: str
    raw: Any

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (raw is kept as read: a dict or a string)."""
        return {"row": self.row, "product_id": self.product_id, "reason": self.reason, "raw": self.raw}


@dataclass
class CatalogReadResult:
    """``products`` + ``rejects``; ``read_count`` rows were read (``= len(products) + len(rejects)``)."""

    products: list[Product]
    rejects: list[Reject]
    read_count: int
    layout: str = ""
    source: str = ""


# ----------------------------------------------------------------------------- detection


# ----------------------------------------------------------------------------- mapping


def _pick(keys: Sequence[str], wanted: str | None, candidates: Sequence[str]) -> str | None:
    return wanted if wanted is not None else next((c for c in candidates if c in keys), None)


@dataclass
class _ResolvedMapping:
    id: str
    title: str | None
    image: str | None
    image_is_template: bool
    attributes: tuple[str, ...]
    extra: tuple[str, ...] | None  # None: all unused keys
    image_root: Path


def _resolve_mapping(mapping: FieldMapping, keys: Sequence[str], image_root: Path,
                     source: Path) -> _ResolvedMapping:
    id_key = _pick(keys, mapping.id, ID_CANDIDATES)
    if id_key is None:
        raise CatalogError(
            f"{source}: no product id field (tried {', '.join(ID_CANDIDATES)}); set FieldMapping.id")
    title_key = _pick(keys, mapping.title, TITLE_CANDIDATES)
    image_key = _pick(keys, mapping.image, IMAGE_CANDIDATES)
    attrs = tuple(mapping.attributes) if mapping.attributes is not None else \
        tuple(a for a in FASHION_ATTRIBUTES if a in keys)
    return _ResolvedMapping(
        id=id_key, title=title_key, image=image_key,
        image_is_template=image_key is not None and "{" in image_key,
        attributes=attrs,
        extra=tuple(mapping.extra) if mapping.extra is not None else None,
        image_root=Path(mapping.image_root) if mapping.image_root is not None else image_root,
    )


def _as_text(value: Any) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    text = text.strip()
    return text or None


def _resolve_image(value: str, root: Path) -> tuple[str, bool]:
    """Return ``(absolute path or URI, is_local)``."""
    if value.startswith("file://"):
        return str(Path(value[len("file://"):]).resolve()), True
    if "://" in value:
        return value, False
    p = Path(value).expanduser()
    if not p.is_absolute():
        p = root / p
    return str(p.resolve()), True


def _to_product(line_no: int, fields: dict, m: _ResolvedMapping, check_images: bool) -> Product | Reject:
    pid = _as_text(fields.get(m.id))
    if pid is None:
        return Reject(line_no, None, f"missing product id (field {m.id!r} empty or absent)", fields)
    title = _as_text(fields.get(m.title)) if m.title else None
    image: str | None = None
    flags: list[str] = []
    detail: dict[str, str] = {}
    if m.image is not None:
        if m.image_is_template:
            try:
                image_value: str | None = m.image.format(**{k: str(v) for k, v in fields.items()} | {"id": pid})
            except (KeyError, IndexError, ValueError) as exc:
                return Reject(line_no, pid, f"image template {m.image!r} cannot be filled from this row ({exc})",
                              fields)
        else:
            image_value = _as_text(fields.get(m.image))
        if image_value:
            image, is_local = _resolve_image(image_value, m.image_root)
            if is_local and check_images and not os.path.isfile(image):
                flags.append(FLAG_IMAGE_MISSING)
                detail[FLAG_IMAGE_MISSING] = f"image file not found: {image}"
                image = None
    if title is None and image is None:
        why = detail.get(FLAG_IMAGE_MISSING, "no image given")
        return Reject(line_no, pid, f"neither a usable title nor a usable image (empty title; {why})", fields)
    used = {m.id, m.title, m.image, *m.attributes}
    attributes = {a: t for a in m.attributes if (t := _as_text(fields.get(a))) is not None}
    if m.extra is None:
        extra = {k: v for k, v in fields.items() if k not in used}
    else:
        extra = {k: fields[k] for k in m.extra if k in fields}
    return Product(pid, title, image, attributes, extra, line_no, flags, detail)


# ----------------------------------------------------------------------------- public API


def read_catalog(
    path: str | Path,
    mapping: FieldMapping | None = None,
    limit: int | None = None,
    *,
    layout: str | None = None,
    check_images: bool = True,
) -> CatalogReadResult:
    """Read a catalogue into products and rejects.

    path: a fashion folder (``styles.csv`` + ``images/``), a JSONL file or a CSV/TSV file.
    mapping: field mapping; ``None`` uses ``FASHION_MAPPING`` for the fashion layout and
        header detection otherwise (see ``FieldMapping``).
    limit: read at most this many rows (blank lines not counted).
    layout: force ``"fashion"``, ``"jsonl"``, ``"csv"`` or ``"tsv"`` instead of detecting.
    check_images: test that local image files exist (flag ``image_missing`` otherwise).

    Returns CatalogReadResult with ``len(products) + len(rejects) == read_count``.
    Raises CatalogError when the catalogue as a whole is unusable (missing path, unknown
    layout, no id field); bad rows are rejects, never exceptions.
    """
    src = Path(path)
    layout = layout or detect_layout(src)
    if layout == "fashion":
        data_file, image_root = src / "styles.csv", src
        mapping = mapping or FASHION_MAPPING
        records = iter_csv_records(data_file, ",")
    elif layout in ("csv", "tsv"):
        data_file, image_root = src, src.parent
        records = iter_csv_records(src, "," if layout == "csv" else "\t")
    elif layout == "jsonl":
        data_file, image_root = src, src.parent
        records = iter_jsonl_records(src)
    else:
        raise CatalogError(f"unknown catalogue layout {layout!r} (fashion, jsonl, csv, tsv)")
    mapping = mapping or FieldMapping()
    image_root = image_root.resolve()

    products: list[Product] = []
    rejects: list[Reject] = []
    seen: dict[str, int] = {}
    read_count = 0
    resolved: _ResolvedMapping | None = None
    for line_no, fields, raw, error in records:
        if limit is not None and read_count >= limit:
            break
        read_count += 1
        if error is not None or fields is None:
            rejects.append(Reject(line_no, None, error or "malformed row", raw))
            continue
        if resolved is None or (layout == "jsonl" and mapping.id is None and resolved.id not in fields):
            resolved = _resolve_mapping(mapping, list(fields), image_root, data_file)
        item = _to_product(line_no, fields, resolved, check_images)
        if isinstance(item, Reject):
            rejects.append(item)
            continue
        if item.product_id in seen:
            first = seen[item.product_id]
            rejects.append(Reject(line_no, item.product_id, f"duplicate product id {item.product_id!r} "
                                  f"(first seen at row {first}; first one wins)", raw))
            continue
        seen[item.product_id] = line_no
        products.append(item)
    return CatalogReadResult(products, rejects, read_count, layout, str(data_file))


def write_rejects(rejects: Sequence[Reject], path: str | Path) -> Path:
    """Write ``rejects`` as JSONL (``{"row", "product_id", "reason", "raw"}`` per line) to ``path``.

    The file is written to a temporary name then renamed, so a reader never sees half of it.
    Returns the path written.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in rejects:
            fh.write(json.dumps(r.to_dict(), ensure_ascii=False, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    return out


def read_split(fashion_dir: str | Path) -> dict[str, str]:
    """Read ``split.csv`` (``id,split``) of a fashion folder -> ``{product_id: "train" | "test"}``.

    Raises CatalogError when the file is missing, or a row is malformed or names another split.
    """
    path = Path(fashion_dir) / "split.csv"
    if not path.is_file():
        raise CatalogError(f"{path}: no split file")
    split: dict[str, str] = {}
    for line_no, fields, raw, error in iter_csv_records(path, ","):
        if error is not None or fields is None:
            raise CatalogError(f"{path}:{line_no}: {error}: {raw!r}")
        pid, name = _as_text(fields.get("id")), _as_text(fields.get("split"))
        if pid is None or name not in ("train", "test"):
            raise CatalogError(f"{path}:{line_no}: expected id and split in (train, test), got {raw!r}")
        split[pid] = name
    return split
