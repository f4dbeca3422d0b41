"""Form input → ``SearchRequest``, responses → JSON for the page, gRPC errors → readable text.

Facet counts: the gRPC API returns hits, not aggregations, so the page asks for
``FACET_POOL`` hits (or ``top_k`` when larger), shows the first ``top_k`` and counts each
metadata field's values over all of them ("among the top N matches"). A field is a facet
when it is not an identity / display field (``NOT_FACETS``) and has at most
``MAX_FACET_VALUES`` distinct values in the pool. Source: our choice (issue 17).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from server.ui.images import image_url

FACET_POOL = 200
MAX_TOP_K = 1000
MAX_FACET_VALUES = 40
NOT_FACETS = frozenset({"product_id", "id", "title", "productDisplayName", "image", "row", "shard",
                        "flags", "flag_detail"})


class QueryError(ValueError):
    """Input the page cannot send (HTTP 400), with a message for the user."""


@dataclass
class PageQuery:
    """One search from the page: text and/or photo bytes, top_k (1..1000), filters."""

    text: str
    image: bytes
    top_k: int
    filters: dict[str, list[str]] = field(default_factory=dict)

    @property
    def pool(self) -> int:
        """Hits fetched from the server: enough for the grid and the facet counts."""
        return min(MAX_TOP_K, max(self.top_k, FACET_POOL))


def parse_query(text: str | None, image: bytes, top_k: str | None, filters: str | None) -> PageQuery:
    """Validate the page's form fields.

    Args:
        text: query text (blank means none). image: uploaded photo bytes (b"" for none).
        top_k: hits wanted as text, 1..1000 (empty: 10). filters: JSON ``{field: [values]}``.

    Raises:
        QueryError: nothing to search for, top_k not an integer in 1..1000, filters not a JSON
            object of string lists.
    """
    text = (text or "").strip()
    if not text and not image:
        raise QueryError("Type a query or add a photo.")
    try:
        k = int(top_k) if top_k not in (None, "") else 10
    except ValueError:
        raise QueryError(f"top_k must be a whole number, got {top_k!r}") from None
    if not 1 <= k <= MAX_TOP_K:
        raise QueryError(f"top_k must be between 1 and {MAX_TOP_K}, got {k}")
    try:
        parsed = json.loads(filters) if filters else {}
    except json.JSONDecodeError as exc:
        raise QueryError(f"filters are not valid JSON: {exc}") from None
    if not isinstance(parsed, dict) or not all(
            isinstance(v, list) and all(isinstance(x, str) for x in v) for v in parsed.values()):
        raise QueryError("filters must be a JSON object of field -> list of values")
    return PageQuery(text, image, k, {f: v for f, v in parsed.items() if v})


def facet_counts(metadata: list[dict[str, str]], selected: dict[str, list[str]]) -> list[dict[str, Any]]:
    """``[{"field", "values": [{"value", "count", "selected"}]}]`` over the hits' metadata,
    fields by name, values by count (descending) then name; selected values always listed."""
    counts: dict[str, Counter] = {}
    for meta in metadata:
        for name, value in meta.items():
            if name not in NOT_FACETS:
                counts.setdefault(name, Counter())[value] += 1
    for name, values in selected.items():
        counts.setdefault(name, Counter()).update({v: 0 for v in values})
    facets = []
    for name in sorted(counts):
        chosen = set(selected.get(name, ()))
        if len(counts[name]) > MAX_FACET_VALUES and not chosen:
            continue
        ordered = sorted(counts[name].items(), key=lambda kv: (-kv[1], kv[0]))
        facets.append({"field": name, "values": [{"value": v, "count": n, "selected": v in chosen}
                                                 for v, n in ordered]})
    return facets


def _product_json(product_id: str, metadata: dict[str, str], images: Path | None) -> dict[str, Any]:
    return {"product_id": product_id,
            "title": metadata.get("title") or metadata.get("productDisplayName") or product_id,
            "image_url": image_url(images, metadata.get("image")),
            "attributes": {k: v for k, v in sorted(metadata.items()) if k not in NOT_FACETS}}


def search_json(response, query: PageQuery, images: Path | None) -> dict[str, Any]:
    """A ``SearchResponse`` as the page's JSON: the first ``top_k`` hits (rank, score, title,
    image URL, attributes), facets over every hit returned, index version, timings in ms."""
    hits = [dict(_product_json(h.product_id, dict(h.metadata), images), rank=h.rank, score=round(h.score, 4))
            for h in response.hits[:query.top_k]]
    t = response.timings
    return {"hits": hits, "index_version": response.index_version,
            "facets": facet_counts([dict(h.metadata) for h in response.hits], query.filters),
            "facet_pool": len(response.hits), "encode_batch_size": response.encode_batch_size,
            "timings_ms": {"decode": t.decode_ms, "queue": t.queue_ms, "encode": t.encode_ms,
                           "search": t.search_ms, "metadata": t.metadata_ms, "total": t.total_ms}}


def products_json(response, images: Path | None) -> dict[str, Any]:
    """A ``GetProductsResponse`` as JSON: products (with every metadata field), missing ids."""
    return {"products": [dict(_product_json(p.product_id, dict(p.metadata), images), metadata=dict(p.metadata))
                         for p in response.products],
            "missing_product_ids": list(response.missing_product_ids), "index_version": response.index_version}


# gRPC status → (HTTP status, what the user is told). Source: our choice.
_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "The search server rejected the query"),
    grpc.StatusCode.UNAVAILABLE: (503, "The search server at {target} is unavailable (is `ecsearch serve` "
                                       "running and has it loaded an index version?)"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "The search server at {target} did not answer in time"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (413, "The search server refused the request as too large or too many"),
    grpc.StatusCode.NOT_FOUND: (404, "Not found on the search server"),
}


def rpc_error(exc: grpc.RpcError, target: str) -> tuple[int, str]:
    """``(HTTP status, one readable line)`` for a failed call: what happened and the server's
    own detail, never a traceback."""
    code = exc.code() if hasattr(exc, "code") else None
    status, text = _STATUS.get(code, (502, "The search server at {target} answered with an error"))
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    name = code.name if code is not None else "UNKNOWN"
    return status, f"{text.format(target=target)}: {name}: {detail}"
