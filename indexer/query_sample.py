"""Query-tower vectors of a seeded sample of catalogue products, for choosing nprobe.

An IVF index's nprobe is chosen as the smallest that reaches the target recall@10 against
exact search (``indexer.version.measure_quality``). Item vectors as the queries measure the
easy case: an item sits next to its own IVF centroid. Real queries come from the query tower,
whose vectors sit farther from the item clusters, and each kind of query on its own side: a
photo query matches the image part of the item vectors, a typed query the text part. On the
fashion index (11,882 products, IVF256,PQ64, docs/results.md) items alone chose nprobe 4
(recall@10 0.960 on items, 0.922 on titles, photos and title + photo pairs pooled); with those
the build chose 8, and 2,000 augmented photo queries over gRPC found their product at rank 1
83.85 % of the time against 79.75 % at nprobe 4 (exact search: 84.50 %). With the text-private
block (engine/model/private_block.py) the pooled sample still reached 0.95 at nprobe 8 while
served augmented photos fell to 77.95 % (exact 84.50 %): a pooled figure hides the kind that
misses. So the build now measures each kind apart, as shoppers send them (``QUERY_KINDS``):

- ``typed text``: a brand + type query ("puma sports shoes") where the title gives a brand,
  else a run of title words (``engine.catalog.shopper_queries``);
- ``augmented photo``: one augmented view of the photo (``engine.model.augment`` defaults);
- ``title + photo``: the product's title and photo (fused query);
- ``photo + modifier``: the photo and a modifier ("in red", "for women") that another product
  of its type satisfies (the composed query).

Source: our choice.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from engine.model.errors import InputError

QUERY_KINDS = ("typed text", "augmented photo", "title + photo", "photo + modifier")
# the Search request each kind stands for (the manifest's per-kind nprobe, indexer.version)
REQUEST_KIND = {"typed text": "text", "augmented photo": "image", "title + photo": "text+image",
                "photo + modifier": "text+image"}


def _typed_query(product, facets: dict, rng: np.random.Generator) -> str | None:
    from engine.catalog.shopper_queries import brand_queries, partial_title

    options = brand_queries(facets)
    if options:
        return options[int(rng.integers(len(options)))][0]
    return partial_title(product.title, rng) or product.title


def query_samples(products: Sequence, per_kind: int, seed: int = 0) -> dict[str, list[tuple]]:
    """``{kind: [(text or None, image or None)]}``: up to ``per_kind`` queries of each of
    ``QUERY_KINDS`` (module docstring) made from ``products`` (objects with ``title``, ``image``
    and ``attributes``), drawn with ``seed``; images are paths, or ``PIL.Image`` views."""
    from engine.model.images import load_image
    from engine.model.augment import augment_photo, view_seed
    from engine.catalog.shopper_queries import composed_query, composed_targets, product_facets

    rng = np.random.default_rng(seed)

    def pick(candidates: list) -> list:
        if not candidates or per_kind <= 0:
            return []
        return [candidates[i] for i in np.sort(rng.choice(len(candidates), size=min(per_kind, len(candidates)),
                                                          replace=False))]

    facets = [product_facets(getattr(p, "attributes", None) or {}, p.title) for p in products]
    titled = pick([i for i, p in enumerate(products) if p.title])
    out: dict[str, list[tuple]] = {"typed text": [(_typed_query(products[i], facets[i], rng), None) for i in titled]}
    views = []
    for i in pick([i for i, p in enumerate(products) if p.image]):
        try:
            image = load_image(products[i].image)
        except InputError:
            continue  # unreadable photo: the indexer's rejects report names it
        views.append((None, augment_photo(image, view_seed(seed, str(products[i].image), 0))))
    out["augmented photo"] = views
    both = [i for i, p in enumerate(products) if p.title and p.image]
    out["title + photo"] = [(products[i].title, products[i].image) for i in pick(both)]
    targets = composed_targets(facets)
    composed = [(made[0], products[i].image) for i in pick(both)
                if (made := composed_query(facets[i], targets, rng)) is not None]
    out["photo + modifier"] = composed
    return out


def query_tower_sample(model, products: Sequence, per_kind: int, *, seed: int = 0, precision: str = "fp32",
                       log: Callable[[str], None] = print) -> dict[str, np.ndarray]:
    """``{kind: float32 (q, model.dim)}``: query-tower vectors of ``query_samples(products,
    per_kind, seed)``. A photo the tower refuses (``InputError``: unreadable, too large) is skipped
    and counted in the log line; a kind without queries is left out (``per_kind`` 0: ``{}``).
    """
    out: dict[str, np.ndarray] = {}
    skipped = 0
    for kind, queries in query_samples(products, per_kind, seed).items():
        parts = []
        if kind == "typed text" and queries:
            parts.append(model.query_tower.encode([t for t, _ in queries], None, precision=precision))
        else:
            for text, image in queries:
                try:
                    parts.append(model.query_tower.encode(None if text is None else [text], [image],
                                                          precision=precision))
                except InputError:
                    skipped += 1
        if parts:
            out[kind] = np.concatenate(parts).astype(np.float32, copy=False)
    log("recall queries through the query tower: " + ", ".join(f"{len(v)} {k}" for k, v in out.items())
        + (f" ({skipped} with a photo refused)" if skipped else ""))
    return out
