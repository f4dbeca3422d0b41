"""Metadata filters (equality / any-of) and the filtered top_k search over one index version.

Filtering uses the index's facets instead of over-fetch + post-filter (our choice): the
filters are turned into the set of allowed internal ids (``IndexVersion.ids_with``, LMDB
facet lists), and the search is restricted to it (``search(..., allowed=...)``: exact over
the allowed items when the set is small, a faiss ``IDSelectorBatch`` otherwise). So a
filtered query returns top_k hits whenever top_k products match, whatever the filters'
selectivity, in one search. ``bench/bench_grpc.py`` measures its cost.
Everything here is synchronous and runs in the server's search thread pool.
"""
from __future__ import annotations

import collections
import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Collection, Iterable, Mapping, Protocol, Sequence

import numpy as np


MERGED_FIELDS = ("attributes", "extra")  # nested record dicts flattened into Hit.metadata


class FilterError(ValueError):
    """A filter names an unknown field, or has no value. Mapped to INVALID_ARGUMENT."""


@dataclass(frozen=True)
class MetadataFilter:
    """Keep products whose ``field`` equals one of ``values`` (exact, case-sensitive)."""

    field: str
    values: frozenset[str]


def flatten_record(record: dict[str, Any]) -> dict[str, str]:
    """Product record → flat ``str -> str`` map, as sent on the wire (``Hit.metadata``).

    The ``attributes`` and ``extra`` dicts of an indexer record are merged into the top
    level (a nested key never overrides a top-level one); other dicts are JSON text; lists
    are joined with ``","``; None values and empty lists / dicts are left out.
    """
    flat: dict[str, str] = {}
    nested: list[dict] = []
    for key, value in record.items():
        if isinstance(value, dict) and key in MERGED_FIELDS:
            nested.append(value)
        elif isinstance(value, dict):
            if value:
                flat[str(key)] = json.dumps(value, ensure_ascii=False, sort_keys=True)
        elif value is None:
            continue
        elif isinstance(value, (list, tuple)):
            if value:
                flat[str(key)] = ",".join(str(v) for v in value)
        else:
            flat[str(key)] = str(value)
    for inner in nested:
        for key, value in flatten_record(inner).items():
            flat.setdefault(key, value)
    return flat


def parse_filters(pairs: Iterable[tuple[str, Sequence[str]]],
                  known_fields: Collection[str]) -> list[MetadataFilter]:
    """Validate ``(field, values)`` pairs. Filters are ANDed, so two filters on one field
    keep the values both accept (their intersection).

    Raises:
        FilterError: empty field name, unknown field (the message lists the known ones),
            or a filter with no value.
    """
    merged: dict[str, set[str]] = {}
    for field, values in pairs:
        if not field:
            raise FilterError("filter has an empty field name")
        if field not in known_fields:
            raise FilterError(
                f"unknown filter field {field!r}; known fields: {', '.join(sorted(known_fields))}")
        if len(values) == 0:
            raise FilterError(f"filter on {field!r} has no value")
        merged[field] = merged[field] & set(values) if field in merged else set(values)
    return [MetadataFilter(field, frozenset(values)) for field, values in merged.items()]


class SearchableIndex(Protocol):
    """What the filtered search needs from an ``indexer.search.IndexVersion``."""

    def ids_with(self, filters: Mapping[str, Sequence[str]]) -> np.ndarray: ...

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None, *,
               allowed: np.ndarray | None = None) -> tuple[np.ndarray, list[list[str | None]]]: ...

    def get_products(self, ids: Sequence[str]) -> list[dict | None]: ...


@dataclass(frozen=True)
class FoundHit:
    """One hit: product id, inner-product score, and its flattened metadata record (possibly
    shared with other hits through a ``FlatRecordCache``: do not change it)."""

    product_id: str
    score: float
    record: dict[str, str]


@dataclass(frozen=True)
class FilteredSearchResult:
    """Hits in rank order, time in ms spent searching and reading metadata, and how many
    products the filters allowed (None without filters)."""

    hits: list[FoundHit]
    search_ms: float
    metadata_ms: float
    allowed_count: int | None


class FlatRecordCache:
    """Flattened metadata records (``flatten_record``) of one index version, least recently
    used first out. Thread-safe. A record is read from LMDB and flattened once, not on every
    hit: that was ~0.14 ms of each query's 0.32 ms of search + metadata (10 hits, fashion
    index, one thread). Source: our choice; capacity 65,536 records by default.
    """

    def __init__(self, index: SearchableIndex, capacity: int = 65_536):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._index = index
        self._capacity = capacity
        self._records: collections.OrderedDict[str, dict[str, str] | None] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, product_ids: Sequence[str]) -> list[dict[str, str] | None]:
        """Flat records of ``product_ids`` in order (None for an id without a record). The
        dicts are shared between calls: read them, never change them."""
        with self._lock:
            known = {pid: self._records[pid] for pid in product_ids if pid in self._records}
            for pid in known:
                self._records.move_to_end(pid)
        missing = [pid for pid in dict.fromkeys(product_ids) if pid not in known]
        if missing:
            fresh = {pid: None if record is None else flatten_record(record)
                     for pid, record in zip(missing, self._index.get_products(missing))}
            known.update(fresh)
            with self._lock:
                self._records.update(fresh)
                while len(self._records) > self._capacity:
                    self._records.popitem(last=False)
        return [known[pid] for pid in product_ids]


def search_filtered(index: SearchableIndex, query: np.ndarray, top_k: int,
                    filters: Sequence[MetadataFilter], *, nprobe: int | None = None,
                    flat_records: FlatRecordCache | None = None) -> FilteredSearchResult:
    """Top ``top_k`` products for one query vector that pass ``filters``.

    Args:
        index: an open index version.
        query: ``float32 (d,)`` query embedding.
        top_k: hits wanted (>= 1).
        filters: metadata filters; empty means no filtering.
        nprobe: IVF lists probed per shard, or None for the index default.
        flat_records: the version's ``FlatRecordCache``; None reads and flattens every hit.

    Returns:
        ``FilteredSearchResult``; fewer than ``top_k`` hits only when fewer products pass
        the filters (or the probed lists hold fewer). A product whose metadata record is
        missing is left out.
    """
    queries = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
    t0 = time.perf_counter()
    allowed = index.ids_with({f.field: sorted(f.values) for f in filters}) if filters else None
    t1 = time.perf_counter()
    scores, ids = index.search(queries, top_k, nprobe=nprobe, allowed=allowed)
    t2 = time.perf_counter()
    found = [(pid, float(score)) for pid, score in zip(ids[0], scores[0]) if pid is not None]
    pids = [pid for pid, _ in found]
    records = flat_records(pids) if flat_records is not None else [
        None if record is None else flatten_record(record) for record in index.get_products(pids)]
    hits = [FoundHit(pid, score, record) for (pid, score), record in zip(found, records) if record is not None]
    t3 = time.perf_counter()
    return FilteredSearchResult(hits, search_ms=(t2 - t1) * 1e3, metadata_ms=((t1 - t0) + (t3 - t2)) * 1e3,
                                allowed_count=None if allowed is None else int(len(allowed)))
