"""Training pairs (query → product), made from a catalogue or read from a pairs file.

From a catalogue without query logs (METHOD.md §3; M-BEER "trigger / recall" form):

- ``instance``: a product's own title and photo as the query, the product as the item. The
  query's views give the three unimodal forms at once: its text-only view is
  title → product, its image-only view photo → product, its fused view (title+photo) →
  product (so one forward pass serves all three, our choice).
- ``photo_query`` / ``title_query`` (optional, our choice): the product's photo alone / title
  alone as the query → the product. The ``instance`` pair already trains these forms through
  its unimodal views; these extra pairs make the one-modality query the query's fused view
  too, so the fused ranking terms (CMAL's (Fq, Fi) InfoNCE and hinge) also see photo-only
  and title-only queries, as the server receives them.
- ``similar``: product a (title+photo) → another product b sharing its category
  attributes (by default gender, articleType and baseColour all equal).
- ``attribute_query`` (our choice): the attribute phrase of a product, e.g. "women black
  heels" (gender, baseColour, articleType, lower-cased) → that product: a short
  category-level query like the ones users type.
- ``attribute_photo`` (our choice, issue 12 item 4): product a's attribute phrase + a's photo →
  another product b of a's group: the attribute-level m-query of the nine scenarios (METHOD.md
  §4: the phrase and a group member's photo), which the other kinds never form (``similar`` uses
  a's title, ``attribute_query`` no photo).

Queries as shoppers type them and composed queries (``shopper_pairs``; issue 12 items 2-3;
texts from ``engine.catalog.shopper_queries``):

- ``brand_query``: "puma sports shoes" / "puma black sports shoes" → the product; every
  product of that brand and type (and colour) is relevant.
- ``partial_title``: a run of the title's words ("men black sports") → the product itself,
  so rare title words keep their weight.
- ``phrase_query``: attribute phrases in other word orders ("black heels for women",
  "formal shirts") → the product; every product with those facets is relevant.
- ``composed`` (M-BEER trigger → recall): photo of product A + a modifier text ("in red",
  "for women", "for sports", "in leather") → a product B of A's type with the modified facet;
  every product of that type with that facet is relevant, A itself is not (unless it has it).

A pairs file (JSONL, one pair per line) carries real query logs:
``{"query_text": str?, "query_image": path?, "product_id": str}`` (aliases: ``query`` /
``text``, ``image`` / ``image_path``, ``item_id`` / ``id``). Relative image paths resolve
against the file's folder. Bad lines become rejects with a reason; the rest is used.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from engine.catalog import Product
from engine.catalog.shopper_queries import (
    attribute_phrases, brand_queries, composed_query, composed_targets, partial_title, product_facets,
)

KINDS = ("instance", "photo_query", "title_query", "similar", "attribute_query", "pairs_file",
         "brand_query", "partial_title", "phrase_query", "composed", "attribute_photo")
DEFAULT_GROUP_FIELDS: tuple[str, ...] = ("gender", "baseColour", "articleType")


@dataclass(frozen=True)
class TrainingPair:
    """One positive (query, item) pair.

    kind: one of ``KINDS``. item_id: the product the query should retrieve.
    query_text / query_image: the query's text and image path (either may be None, not both).
    query_product_id: the catalogue product the query was made from, if any (that product is
        then relevant to the query too, and is left out of its in-batch negatives).
    group: attribute group of the item when the pair is attribute-level (``similar``,
        ``attribute_query``): every in-batch item of the same group is relevant, not a negative.
    fields: the facet fields ``group`` is a key over (``engine.catalog.shopper_queries.facet_key`` of
        ``product_facets``); None: the catalogue pairs' group fields (``DEFAULT_GROUP_FIELDS``).
    item_text_only: the item is presented by its title alone, its photo left out (the m2t form of
        ``attribute_photo`` pairs under ``attribute_photo_text_items``); ignored for an item without a title.
    """

    kind: str
    item_id: str
    query_text: str | None
    query_image: str | None
    query_product_id: str | None = None
    group: str | None = None
    fields: tuple[str, ...] | None = None
    item_text_only: bool = False


@dataclass(frozen=True)
class PairReject:
    """A pairs-file line that was not used, or only partly used (``kept`` says how)."""

    line: int
    reason: str
    raw: str
    kept: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def group_key(product: Product, fields: Sequence[str] = DEFAULT_GROUP_FIELDS) -> str | None:
    """``"Women|Black|Heels"``-style key from ``fields`` of ``product.attributes``; None if any is missing."""
    values = [product.attributes.get(f) for f in fields]
    if any(not v for v in values):
        return None
    return "|".join(values)


def attribute_phrase(attributes: dict[str, str], fields: Sequence[str] = DEFAULT_GROUP_FIELDS) -> str | None:
    """Category query text, e.g. ``"women black heels"`` (fields in order, lower-cased); None if any is missing."""
    values = [attributes.get(f) for f in fields]
    if any(not v for v in values):
        return None
    return " ".join(v.strip().lower() for v in values)


def catalog_pairs(products: Sequence[Product], seed: int = 0, *, similar_rate: float = 0.35,
                  attribute_query_rate: float = 0.35, photo_query_rate: float = 0.0,
                  title_query_rate: float = 0.0, attribute_photo_rate: float = 0.0,
                  attribute_photo_text_items: bool = False,
                  group_fields: Sequence[str] = DEFAULT_GROUP_FIELDS) -> list[TrainingPair]:
    """Pairs made from the catalogue itself (METHOD.md §3).

    Every product gets an ``instance`` pair; a seeded ``photo_query_rate`` share of the
    products with both a title and a photo get a ``photo_query`` pair (photo only → product)
    and a ``title_query_rate`` share a ``title_query`` pair (title only → product; a product
    with one modality needs neither, its instance pair is already that); a seeded ``similar_rate`` share of the
    products with a group partner get a ``similar`` pair (partner drawn at random from its
    group); an ``attribute_query_rate`` share of the products with all group fields get an
    ``attribute_query`` pair; an ``attribute_photo_rate`` share of the products with a photo, all
    group fields and a group partner an ``attribute_photo`` pair (the phrase + the product's photo →
    a partner drawn at random; with ``attribute_photo_text_items`` the partner is presented by its
    title alone, the m2t form of the nine scenarios). Rates are our choice. Deterministic for a given seed (the similar /
    attribute draws do not depend on the photo / title / attribute-photo rates).
    Raises ValueError when a rate lies outside [0, 1].
    """
    rates = {"similar_rate": similar_rate, "attribute_query_rate": attribute_query_rate,
             "photo_query_rate": photo_query_rate, "title_query_rate": title_query_rate,
             "attribute_photo_rate": attribute_photo_rate}
    bad = {k: v for k, v in rates.items() if not 0.0 <= v <= 1.0}
    if bad:
        raise ValueError(f"pair rates must lie in [0, 1], got {bad}")
    view_rng = np.random.default_rng([seed, 1])  # separate stream: adding these pairs keeps the others
    photo_rng = np.random.default_rng([seed, 2])  # likewise for the attribute-photo pairs
    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = {}
    keys = [group_key(p, group_fields) for p in products]
    for i, k in enumerate(keys):
        if k is not None:
            groups.setdefault(k, []).append(i)
    pairs: list[TrainingPair] = []
    for i, p in enumerate(products):
        pairs.append(TrainingPair("instance", p.product_id, p.title, p.image, p.product_id, None))
        draw_photo, draw_title = view_rng.random(), view_rng.random()
        if p.image and p.title and draw_photo < photo_query_rate:
            pairs.append(TrainingPair("photo_query", p.product_id, None, p.image, p.product_id, None))
        if p.image and p.title and draw_title < title_query_rate:
            pairs.append(TrainingPair("title_query", p.product_id, p.title, None, p.product_id, None))
        k = keys[i]
        if k is None:
            continue
        members = groups[k]
        if len(members) > 1 and rng.random() < similar_rate:
            j = members[int(rng.integers(len(members) - 1))]  # uniform over the others
            j = j if j != i else members[-1]
            pairs.append(TrainingPair("similar", products[j].product_id, p.title, p.image, p.product_id, k))
        phrase = attribute_phrase(p.attributes, group_fields)
        if phrase is not None and rng.random() < attribute_query_rate:
            pairs.append(TrainingPair("attribute_query", p.product_id, phrase, None, None, k))
        draw, pick = photo_rng.random(), photo_rng.integers(max(len(members) - 1, 1))
        if p.image and phrase is not None and len(members) > 1 and draw < attribute_photo_rate:
            j = members[int(pick)]  # uniform over the others, as for "similar"
            j = j if j != i else members[-1]
            pairs.append(TrainingPair("attribute_photo", products[j].product_id, phrase, p.image, p.product_id, k,
                                      item_text_only=attribute_photo_text_items))
    return pairs


def shopper_pairs(products: Sequence[Product], seed: int = 0, *, brand_query_rate: float = 0.0,
                  partial_title_rate: float = 0.0, phrase_query_rate: float = 0.0,
                  composed_rate: float = 0.0) -> list[TrainingPair]:
    """Queries as shoppers type them and composed queries (module docstring; issue 12 items 2-3).

    Each product draws, with the given probability (our choice of rates), one ``brand_query``
    (form drawn among those its facets allow), one ``partial_title``, one ``phrase_query``
    (template drawn likewise) and, when it has a photo and a modifier applies, one
    ``composed`` pair (target drawn uniformly among the other products of that type with
    that facet). Each kind has its own seeded stream: deterministic for a given seed, and a
    kind's pairs do not change with the other rates. Raises ValueError when a rate lies
    outside [0, 1].
    """
    rates = {"brand_query_rate": brand_query_rate, "partial_title_rate": partial_title_rate,
             "phrase_query_rate": phrase_query_rate, "composed_rate": composed_rate}
    bad = {k: v for k, v in rates.items() if not 0.0 <= v <= 1.0}
    if bad:
        raise ValueError(f"pair rates must lie in [0, 1], got {bad}")
    facets = [product_facets(p.attributes, p.title) for p in products]
    targets = composed_targets(facets) if composed_rate > 0 else {}
    rngs = {k: np.random.default_rng([seed, 10 + n]) for n, k in enumerate(rates)}
    pairs: list[TrainingPair] = []
    for i, (p, f) in enumerate(zip(products, facets)):
        draws = {k: r.random() for k, r in rngs.items()}
        for kind, rate, options in (("brand_query", brand_query_rate, brand_queries(f)),
                                    ("phrase_query", phrase_query_rate, attribute_phrases(f))):
            if options and draws[kind + "_rate"] < rate:
                text, fields = options[int(rngs[kind + "_rate"].integers(len(options)))]
                pairs.append(TrainingPair(kind, p.product_id, text, None, None, "|".join(f[x] for x in fields), fields))
        if draws["partial_title_rate"] < partial_title_rate:
            fragment = partial_title(p.title, rngs["partial_title_rate"])
            if fragment:
                pairs.append(TrainingPair("partial_title", p.product_id, fragment, None, p.product_id, None))
        if p.image and draws["composed_rate"] < composed_rate:
            made = composed_query(f, targets, rngs["composed_rate"])
            others = [] if made is None else [j for j in made[3] if j != i]
            if others:
                j = others[int(rngs["composed_rate"].integers(len(others)))]
                pairs.append(TrainingPair("composed", products[j].product_id, made[0], p.image, None, made[2], made[1]))
    return pairs


_TEXT_KEYS = ("query_text", "query", "text")
_IMAGE_KEYS = ("query_image", "image", "image_path")
_ID_KEYS = ("product_id", "item_id", "id")


def _first(obj: dict, keys: Sequence[str]):
    for k in keys:
        if k in obj and obj[k] is not None:
            return obj[k]
    return None


def read_pairs_file(path: str | Path, known_ids: set[str] | dict) -> tuple[list[TrainingPair], list[PairReject]]:
    """Read a JSONL pairs file; returns ``(pairs, rejects)``, every non-blank line in one of them.

    A line is rejected (with its reason) when it is not a JSON object, names no product or a
    product id not in ``known_ids``, or has no usable query. A query image file that does
    not exist drops the image: the pair is kept text-only when it has text (a reject line
    with ``kept="text-only"`` says so), rejected otherwise.
    Raises FileNotFoundError when the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file not found: {path}")
    pairs: list[TrainingPair] = []
    rejects: list[PairReject] = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line_no, line in enumerate(fh, start=1):
            raw = line.rstrip("\r\n")
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                rejects.append(PairReject(line_no, f"invalid JSON ({exc.msg} at column {exc.colno})", raw))
                continue
            if not isinstance(obj, dict):
                rejects.append(PairReject(line_no, f"JSON {type(obj).__name__}, expected an object", raw))
                continue
            pid = _first(obj, _ID_KEYS)
            if pid is None or not str(pid).strip():
                rejects.append(PairReject(line_no, "no product id (product_id / item_id / id)", raw))
                continue
            pid = str(pid).strip()
            if pid not in known_ids:
                rejects.append(PairReject(line_no, f"unknown product id {pid!r} (not in the training catalogue)", raw))
                continue
            text = _first(obj, _TEXT_KEYS)
            text = str(text).strip() if text is not None and str(text).strip() else None
            image = _first(obj, _IMAGE_KEYS)
            image_path = None
            if image is not None and str(image).strip():
                p = Path(str(image)).expanduser()
                p = p if p.is_absolute() else path.parent / p
                if os.path.isfile(p):
                    image_path = str(p.resolve())
                elif text is not None:
                    rejects.append(PairReject(line_no, f"query image not found: {p}", raw, kept="text-only"))
                else:
                    rejects.append(PairReject(line_no, f"query image not found: {p} and no query text", raw))
                    continue
            if text is None and image_path is None:
                rejects.append(PairReject(line_no, "no query: query_text is empty and no query_image given", raw))
                continue
            pairs.append(TrainingPair("pairs_file", pid, text, image_path, None, None))
    return pairs, rejects


def write_pair_rejects(rejects: Sequence[PairReject], path: str | Path) -> Path:
    """Append-free write of pair rejects as JSONL (one ``PairReject.to_dict()`` per line)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as fh:
        for r in rejects:
            fh.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
    return out
