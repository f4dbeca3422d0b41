"""Choosing an index version's nprobe: the default, and one per kind of Search request.

The build measures refined recall@10 against exact search at each candidate nprobe on the
recall samples (item vectors, and the query tower's vectors per kind of shopper query,
``indexer.query_sample``) and writes the smallest that reaches the target: one default for
every set, and per kind of request the smallest its own kinds need
(``nprobe_by_request_kind``), with a stricter target for requests that carry a photo
(``request_target_recall``). Source: our choice (faiss IVF search, nprobe = lists visited).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from indexer.recall import exact_search, recall_at_k

if TYPE_CHECKING:
    from indexer.version import VersionOptions

NPROBE_CANDIDATES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def query_sets(index, query_vectors, k: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"query_tower:<kind>": (float32 (q, d) queries, exact top-k ids)}`` of ``query_vectors``
    (``{kind: array}``, or one array: kind "all"); empty kinds are left out."""
    if query_vectors is None:
        return {}
    groups = query_vectors if isinstance(query_vectors, dict) else {"all": query_vectors}
    out = {}
    for kind, vectors in groups.items():
        if len(vectors):
            vectors = np.ascontiguousarray(vectors, dtype=np.float32)
            out[f"query_tower:{kind}"] = (vectors, exact_search(index._vectors, vectors, k)[1])
    return out


def nprobe_by_request_kind(by_nprobe: dict[int, dict[str, float]], options: VersionOptions,
                            chosen: int) -> dict[str, dict[str, int]]:
    """``{"nprobe_by_query_kind": {"text" | "image" | "text+image": nprobe}}``: per kind of Search
    request, the smallest measured nprobe at which every sample kind it stands for
    (``indexer.query_sample.REQUEST_KIND``) reaches its recall target (``request_target_recall``;
    else the measured nprobe, at least ``chosen``, where they come closest); ``{}`` without
    query-tower sets. The server probes that
    many lists for a request of that kind that names no nprobe (our choice: a text query need not
    pay for the lists a photo + modifier query needs)."""
    kinds: dict[str, list[str]] = {}
    for name in by_nprobe[chosen]:
        request_kind = request_kind_of(name)
        if request_kind is not None:
            kinds.setdefault(request_kind, []).append(name)
    out = {}
    for request_kind, names in kinds.items():
        target = request_target_recall(request_kind, options)
        reached = [p for p in sorted(by_nprobe) if min(by_nprobe[p][n] for n in names) >= target]
        # else: the measured nprobe at which its kinds come closest (the smallest such), never below chosen
        best = max((p for p in by_nprobe if p >= chosen), key=lambda p: (min(by_nprobe[p][n] for n in names), -p))
        out[request_kind] = int(reached[0]) if reached else int(best)
    return {"nprobe_by_query_kind": out} if out else {}


def request_target_recall(request_kind: str, options: VersionOptions) -> float:
    """Recall@10 that a kind of Search request (``"text"``, ``"image"``, ``"text+image"``) must reach
    when its nprobe is chosen: ``options.target_recall`` for text, the larger of that and
    ``options.photo_target_recall`` for a request carrying a photo.

    Why (our choice, measured on the fashion index, docs/results.md "Served photo queries and
    nprobe"): a photo query is most often a search for one product, where its rank 1 counts, and at
    recall@10 0.97 (nprobe 8) 2,000 augmented photos found their product at rank 1 91.65 % of the time
    over gRPC against 93.30 % with exact search (93.05 % at nprobe 16, recall@10 0.99); the photo's
    backbone takes about 15 ms per query, the extra lists about 0.1 ms, while a text query's
    latency is the search's own."""
    if request_kind == "text":
        return options.target_recall
    return max(options.target_recall, options.photo_target_recall)


def query_tower_report(sets: dict, by_nprobe: dict[int, dict[str, float]], chosen: int) -> dict[str, Any]:
    """Manifest fields of the query-tower sets: pooled recall@10 (weighted by queries) at the chosen
    nprobe and per nprobe, and per kind at the chosen nprobe and per nprobe; ``{}`` without them."""
    kinds = [name for name in sets if name.startswith("query_tower:")]
    if not kinds:
        return {}
    sizes = {name: len(sets[name][0]) for name in kinds}
    total = sum(sizes.values())

    def pooled(recalls: dict[str, float]) -> float:
        return round(sum(recalls[name] * sizes[name] for name in kinds) / total, 4)

    return {"query_tower_queries": int(total), "recall_at_10_query_tower": pooled(by_nprobe[chosen]),
            "recall_at_10_query_tower_by_nprobe": {str(p): pooled(r) for p, r in by_nprobe.items()},
            "recall_at_10_query_tower_by_kind": {name.split(":", 1)[1]: round(by_nprobe[chosen][name], 4)
                                                 for name in kinds},
            "recall_at_10_query_tower_by_kind_by_nprobe": {
                str(p): {name.split(":", 1)[1]: round(r[name], 4) for name in kinds} for p, r in by_nprobe.items()}}


def request_kind_of(name: str) -> str | None:
    """The kind of Search request (``indexer.query_sample.REQUEST_KIND``) a recall sample
    ``"query_tower:<kind>"`` stands for; None for the item sample and kinds without one."""
    from indexer.query_sample import REQUEST_KIND

    return REQUEST_KIND.get(name.split(":", 1)[1]) if name.startswith("query_tower:") else None


def set_target_recall(name: str, options: VersionOptions) -> float:
    """The recall target of one recall sample: ``"items"`` and kinds a text request stands for take
    ``options.target_recall``; kinds of a request carrying a photo, ``request_target_recall``."""
    return request_target_recall(request_kind_of(name) or "text", options)


# the sweep goes past the default nprobe for a set under its own target only while doubling the
# lists still raises that set's recall@10 by this much (our choice)
MIN_RECALL_GAIN = 0.005


def choose_nprobe(index, sets: dict[str, tuple[np.ndarray, np.ndarray]], options: VersionOptions,
                  k: int) -> tuple[int, dict[int, dict[str, float]]]:
    """``(nprobe, {nprobe: {set: refined recall@k}})``: ``options.nprobe``, else the smallest
    candidate reaching ``options.target_recall`` on every set, else the best measured.

    The sweep over ``NPROBE_CANDIDATES`` goes on past that nprobe while a set is under its own
    target (``set_target_recall``: a photo request's kinds aim higher) and doubling still gains
    ``MIN_RECALL_GAIN``, so ``nprobe_by_request_kind`` can give such a request more lists."""
    if options.nprobe is not None:
        candidates = [min(options.nprobe, index.nlist)]
    else:
        candidates = sorted({min(p, index.nlist) for p in NPROBE_CANDIDATES})
    targets = {name: set_target_recall(name, options) for name in sets}
    by_nprobe: dict[int, dict[str, float]] = {}
    chosen = None
    for nprobe in candidates:
        previous = by_nprobe[max(by_nprobe)] if by_nprobe else None
        by_nprobe[nprobe] = {}
        for name, (queries, exact_i) in sets.items():
            _, ann = index.search_ids(queries, k, nprobe=nprobe, refine=True, k_factor=options.probe_k_factor)
            by_nprobe[nprobe][name] = recall_at_k(ann, exact_i, k)
        if options.nprobe is not None:
            return candidates[0], by_nprobe
        if chosen is None and min(by_nprobe[nprobe].values()) >= options.target_recall:
            chosen = nprobe
        if chosen is None:
            continue
        unmet = [name for name, r in by_nprobe[nprobe].items() if r < targets[name]]
        if not unmet or (previous is not None and nprobe > chosen
                         and all(by_nprobe[nprobe][n] - previous[n] < MIN_RECALL_GAIN for n in unmet)):
            break
    if chosen is None:  # target not reached
        chosen = max(by_nprobe, key=lambda p: (min(by_nprobe[p].values()), -p))
    return chosen, by_nprobe
