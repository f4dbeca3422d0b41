"""Queries as shoppers type them, made from catalogue fields (issue 12, items 2 and 3).

Used by ``engine.training.pairs`` (training pairs) and by the evaluation (brand + type and composed
queries). Every query comes with the *facet fields* that define what is relevant to it: a
product is relevant when its facets equal the query's on those fields (``facet_key``).

Facets of a product (``product_facets``): its catalogue attributes (gender, baseColour,
articleType, usage, ...), plus two derived from the title (our choice, heuristics checked on
the fashion catalogue):

- ``brand``: the title words before the first gender word ("Puma Men Black Sports Shoes" →
  "puma"; "United Colors of Benetton Women ..." → "united colors of benetton"), when 1-4 words
  precede it; none otherwise.
- ``material``: "leather" when the title has that word (the only material with enough
  products in the fashion catalogue: 184 titles; denim 19, canvas 29).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

GENDER_WORDS = frozenset({"men", "women", "woman", "boys", "girls", "boy", "girl", "unisex", "kids"})
MATERIALS = ("leather",)
# Modifier texts of composed queries, per facet (our choice). ``None`` value: generic template.
USAGE_MODIFIERS = {"sports": "for sports", "formal": "for formal wear", "casual": "for casual wear",
                   "ethnic": "in ethnic style", "party": "for a party", "smart casual": "smart casual"}
COMPOSED_FIELDS: tuple[str, ...] = ("baseColour", "gender", "usage", "material")


def brand_of(title: str | None) -> str | None:
    """Lower-cased brand of a title (words before the first gender word, 1-4 of them), else None."""
    if not title:
        return None
    words = title.split()
    for i, word in enumerate(words):
        if word.lower() in GENDER_WORDS:
            return " ".join(words[:i]).lower() if 1 <= i <= 4 else None
    return None


def product_facets(attributes: dict[str, str], title: str | None) -> dict[str, str]:
    """Catalogue attributes plus ``brand`` and ``material`` from the title (module docstring)."""
    facets = {k: v for k, v in attributes.items() if v}
    brand = brand_of(title)
    if brand:
        facets["brand"] = brand
    words = {w.lower() for w in (title or "").split()}
    for material in MATERIALS:
        if material in words:
            facets["material"] = material
    return facets


def facet_key(facets: dict[str, str], fields: Sequence[str]) -> str | None:
    """``"Women|Black|Heels"``-style key of ``fields``; None when a field is missing or ``NA``."""
    values = [facets.get(f) for f in fields]
    if any(not v or v == "NA" for v in values):
        return None
    return "|".join(values)


def _words(value: str) -> str:
    return " ".join(value.strip().lower().split())


def brand_queries(facets: dict[str, str]) -> list[tuple[str, tuple[str, ...]]]:
    """``[(text, fields)]``: "puma sports shoes" (brand + type) and "puma black sports shoes"
    (brand + colour + type), those the facets allow."""
    out = []
    if facet_key(facets, ("brand", "articleType")):
        out.append((f"{facets['brand']} {_words(facets['articleType'])}", ("brand", "articleType")))
        if facet_key(facets, ("baseColour",)):
            out.append((f"{facets['brand']} {_words(facets['baseColour'])} {_words(facets['articleType'])}",
                        ("brand", "baseColour", "articleType")))
    return out


def attribute_phrases(facets: dict[str, str]) -> list[tuple[str, tuple[str, ...]]]:
    """``[(text, fields)]`` in the word orders shoppers use: "black heels", "heels for women",
    "black heels for women", and usage phrases ("formal shirts"; not for usage Casual)."""
    if not facet_key(facets, ("articleType",)):
        return []
    kind = _words(facets["articleType"])
    out = []
    if facet_key(facets, ("baseColour",)):
        out.append((f"{_words(facets['baseColour'])} {kind}", ("baseColour", "articleType")))
    if facet_key(facets, ("gender",)):
        out.append((f"{kind} for {_words(facets['gender'])}", ("gender", "articleType")))
        if facet_key(facets, ("baseColour",)):
            out.append((f"{_words(facets['baseColour'])} {kind} for {_words(facets['gender'])}",
                        ("gender", "baseColour", "articleType")))
    if facet_key(facets, ("usage",)) and _words(facets["usage"]) != "casual":
        out.append((f"{_words(facets['usage'])} {kind}", ("usage", "articleType")))
    return out


def partial_title(title: str | None, rng: np.random.Generator) -> str | None:
    """A contiguous run of 2 to n-1 words of an n-word title (n ≥ 3), lower-cased; else None."""
    words = (title or "").split()
    if len(words) < 3:
        return None
    length = int(rng.integers(2, len(words)))  # 2 .. n-1
    start = int(rng.integers(0, len(words) - length + 1))
    return " ".join(words[start:start + length]).lower()


def modifier_text(field: str, value: str) -> str:
    """Modifier of a composed query: "in red" (colour, material), "for women" (gender), "for sports" (usage)."""
    v = _words(value)
    if field == "gender":
        return f"for {v}"
    if field == "usage":
        return USAGE_MODIFIERS.get(v, f"for {v} wear")
    return f"in {v}"


def composed_targets(facets: Sequence[dict[str, str]],
                     fields: Sequence[str] = COMPOSED_FIELDS) -> dict[str, list[tuple[str, str, list[int]]]]:
    """``{articleType: [(field, value, product indices)]}``: the composed queries' targets."""
    index: dict[tuple[str, str, str], list[int]] = {}
    for i, f in enumerate(facets):
        kind = f.get("articleType")
        if not kind:
            continue
        for field in fields:
            if facet_key(f, (field,)):
                index.setdefault((kind, field, f[field]), []).append(i)
    by_kind: dict[str, list[tuple[str, str, list[int]]]] = {}
    for (kind, field, value), members in index.items():
        by_kind.setdefault(kind, []).append((field, value, members))
    return by_kind


def composed_query(source: dict[str, str], targets: dict[str, list[tuple[str, str, list[int]]]],
                   rng: np.random.Generator) -> tuple[str, tuple[str, ...], str, list[int]] | None:
    """One composed query for a photo of the product with facets ``source``: a modifier that
    changes one facet to a value other products of the same type have (``composed_targets``).

    Returns ``(modifier text, relevance fields ("articleType", field), relevance key, target
    product indices)`` or None when no modifier applies. The source's own value is never the
    target (a material modifier applies only when the source lacks that material).
    """
    options = [(field, value, members) for field, value, members in targets.get(source.get("articleType", ""), [])
               if source.get(field) != value]
    if not options:
        return None
    field, value, members = options[int(rng.integers(len(options)))]
    return modifier_text(field, value), ("articleType", field), f"{source['articleType']}|{value}", members
