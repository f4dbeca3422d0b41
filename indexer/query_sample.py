"""Query-tower vectors of a seeded sample of catalogue products, for choosing nprobe.

An IVF index's nprobe is chosen as the smallest that reaches the target recall@10 against
exact search (``indexer.version.measure_quality``). Item vectors as the queries measure the
easy case: an item sits next to its own IVF centroid. Real queries come from the query tower
(a title typed as text, a photo alone), whose vectors sit farther from the item clusters. On
the fashion index (11,882 products, IVF256,PQ64, docs/results.md) items alone chose nprobe 4
(recall@10 0.960 on items, 0.922 on these queries); with them the build chooses 8 (0.975), and
2,000 augmented photo queries over gRPC find their product at rank 1 / in the top 10 83.85 / 95.15 %
of the time against 79.75 / 90.00 % at nprobe 4 (exact search: 84.50 / 96.95 %). This module
gives the build those queries: the query tower's text-only
vector of sampled titles, the image-only vector of sampled photos, and the fused vector of sampled
(title, photo) pairs of one product (the photo + text query kind). Source: our choice.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from engine.model.errors import InputError


def query_tower_sample(model, products: Sequence, per_kind: int, *, seed: int = 0, precision: str = "fp32",
                       log: Callable[[str], None] = print) -> np.ndarray:
    """``float32 (q, model.dim)``: query-tower vectors of up to ``per_kind`` titles (text only),
    ``per_kind`` photos (image only) and ``per_kind`` (title, photo) pairs of one product (text +
    image) of ``products`` (objects with ``title`` and ``image``), drawn with ``seed``. A photo the
    tower refuses (``InputError``: unreadable, too large) is skipped and counted in the log line;
    ``per_kind`` 0 returns an empty array.
    """
    rng = np.random.default_rng(seed)

    def pick(values: list) -> list:
        if not values or per_kind <= 0:
            return []
        return [values[i] for i in np.sort(rng.choice(len(values), size=min(per_kind, len(values)), replace=False))]

    titles = pick([p.title for p in products if p.title])
    photos = [(None, image) for image in pick([p.image for p in products if p.image])]
    pairs = pick([(p.title, p.image) for p in products if p.title and p.image])
    parts = [model.query_tower.encode(titles, None, precision=precision)] if titles else []
    skipped = 0
    for text, photo in photos + pairs:
        try:
            parts.append(model.query_tower.encode([text], [photo], precision=precision))
        except InputError:
            skipped += 1
    vectors = np.concatenate(parts) if parts else np.zeros((0, model.dim), np.float32)
    log(f"recall queries: {len(titles)} titles, {len(photos)} photos and {len(pairs)} title + photo pairs through "
        f"the query tower" + (f" ({skipped} with a photo refused)" if skipped else ""))
    return vectors.astype(np.float32, copy=False)
