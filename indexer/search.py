"""Open an index version and search it: the API the gRPC server calls.

::

    from indexer.search import open_index
    index = open_index("var/index")              # ROOT (follows ROOT/CURRENT) or a version folder
    scores, pids = index.search(q, k=10)          # q float32 (n, d) -> float32 (n, k), n lists of k
    index.get_products(pids[0])                   # -> [dict | None, ...]
    allowed = index.ids_with({"gender": "Women", "articleType": ["Heels", "Flats"]})
    scores, pids = index.search(q, k=10, allowed=allowed)   # metadata-filtered search
    index.close()

Search = per shard IVF-PQ search (same trained quantizer in every shard) -> merge by score ->
optional refine: the top ``k * k_factor`` candidates are re-scored exactly with the stored
fp16 item vectors. All of it is one faiss call (``IndexRefine`` over ``IndexShards``, the
refine index an fp16 ``IndexScalarQuantizer`` holding the exact vectors), which releases the
GIL: a single query takes 0.04 ms instead of 0.16 ms with a Python merge + numpy refine
(fashion index, 2 shards, nprobe 4, k_factor 10, one thread), with the same hits.

Exact k: a query whose probed lists held fewer than ``min(k, matching items)`` candidates is
searched again with more lists, then exactly (``indexer.widening``); ``search_served`` says
how each query was served. Lexical: ``search_lexical`` (BM25, ``indexer.lexical``).

Filtering: ``allowed`` (internal ids, e.g. from ``ids_with``) is applied inside the IVF
scan with an ``IDSelectorBatch``; when it is small (``<= exact_filter_max`` ids) the search
is instead exact over just those items (a scan of the fp16 vectors with the same selector:
0.08 ms for 878 allowed of 11,882, against 0.35 ms gathering them into numpy), which is
faster and never misses.
``id_filter`` takes product ids (a collection, mapped to ``allowed``) or a predicate on the
product id (applied to over-fetched results, fetching more until k pass or all are seen).
Source: faiss IVFADC + re-ranking (Jégou et al., ICASSP 2011, "Searching in one billion
vectors: re-rank with source coding"); filtering strategy our choice.
"""
from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Iterator, Mapping, Sequence

import faiss
import numpy as np

from engine.retrieval.lexical import LexicalIndex
from indexer.errors import IndexIntegrityError, IndexVersionError, SearchArgumentError
from indexer.lexical import LexicalUnavailableError, open_lexical
from indexer.manifest import MANIFEST, read_manifest, verify_files
from indexer.metadata import MetadataReader
from indexer.publish import resolve_version_dir
from indexer.refine import exact_subset_search, open_refine, search_pipeline
from indexer.search_checks import MAX_SEARCH_K, check_k, check_nprobe, check_queries
from indexer.widening import ProbeCapacity, SearchServed, refine_k_factor, widened_search

# allowed sets up to this size are searched exactly over their own vectors (our choice:
# ~20k x 256 fp16 dot products take a few ms, and exact never misses a filtered item).
EXACT_FILTER_MAX = 20_000

IdFilter = Collection[str] | Callable[[str], bool] | None


class IndexVersion:
    """One opened, immutable index version. Thread-safe on its own: any number of threads may
    call ``search`` / ``get_products`` / ... at once, and ``close()`` may come from any thread
    at any time: calls already running finish on the open files, later ones raise
    ``IndexVersionError``, and the files (LMDB environment, faiss shards, vector memmap) are
    released when the last running call returns (at once when none runs). The server's
    leases (``server.index_holder``) come on top: they decide *when* to close.

    Attributes: ``path`` (version folder), ``manifest`` (dict), ``version`` (str), ``dim``
    (int), ``n_items`` (int), ``nlist`` (int), ``nprobe_default`` (int), ``refine_default``
    (bool), ``k_factor_default`` (int), ``metric`` ("inner_product").

    Raises (constructor): IndexIntegrityError when a manifest value has the wrong type.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], shards: list[faiss.Index],
                 vectors: np.ndarray, metadata: MetadataReader, lexical: LexicalIndex | None = None):
        self.path = path
        self.manifest = manifest
        try:
            self.version: str = str(manifest["version"])
            self.dim: int = int(manifest["dim"])
            self.metric: str = manifest.get("metric", "inner_product")
            self.n_items: int = int(manifest["counts"]["indexed"])
            self.nlist: int = int(manifest["index"]["nlist"])
            self.nprobe_default: int = int(manifest["index"]["nprobe_default"])
            self.refine_default: bool = bool(manifest["refine"]["default"])
            self.k_factor_default: int = int(manifest["refine"]["k_factor"])
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexIntegrityError(f"{path / MANIFEST}: bad value in the manifest ({exc!r})") from exc
        self._shards = shards
        self._vectors = vectors
        self.refine_storage: str = manifest.get("refine", {}).get("storage", "fp16_ram")
        self._sharded, self._exact, self._refined = search_pipeline(shards, open_refine(path, manifest, vectors),
                                                                     self.dim, self.refine_storage)
        self._capacity = ProbeCapacity.of_shards(shards)
        self._metadata = metadata
        self.lexical = lexical  # BM25 index (None: a version built without one)
        self.exact_filter_max = EXACT_FILTER_MAX  # allowed sets up to this size: exact search
        self.hidden: frozenset[str] = frozenset()  # product ids no search returns (live deletes, server.tombstones)
        self._lock = threading.Lock()
        self._closed = False  # no new call starts
        self._running = 0  # calls in progress
        self._released = False  # files released

    @contextlib.contextmanager
    def _in_use(self) -> Iterator[None]:
        """Count a call in progress; refuse it once closed; release the files after the
        last call that was running when ``close()`` came."""
        with self._lock:
            if self._closed:
                raise IndexVersionError(f"index version {self.version} is closed")
            self._running += 1
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1
                release = self._closed and self._running == 0 and not self._released
                self._released = self._released or release
            if release:
                self._release()

    # ------------------------------------------------------------------ search

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None, id_filter: IdFilter = None, *,
               allowed: np.ndarray | Collection[int] | None = None, refine: bool | None = None,
               k_factor: int | None = None) -> tuple[np.ndarray, list[list[str | None]]]:
        """Top-``k`` products for each query vector.

        queries: float32 (n, d) (a (d,) vector is taken as n = 1), rows L2-normalised.
        k: top_k, 1..10,000. nprobe: lists probed per shard (default from the manifest;
        values above nlist are clipped). id_filter: product ids allowed (a collection) or a
        predicate ``f(product_id) -> bool``. allowed: internal ids allowed (int64), e.g.
        from ``ids_with``; combined with ``id_filter`` by intersection. refine: re-score the
        top ``k * k_factor`` candidates exactly (default from the manifest).

        Returns ``(scores float32 (n, k), product_ids: n lists of k)``, best first; inner
        product scores (exact when refined, PQ-approximate otherwise); ``-inf`` / ``None``
        where fewer than k items qualify.
        Raises SearchArgumentError for bad shapes / dtypes / non-finite values / k / nprobe.
        """
        with self._in_use():
            scores, iids = self.search_ids(queries, k, nprobe, id_filter, allowed=allowed, refine=refine,
                                           k_factor=k_factor)
            return scores, self._metadata.product_ids(iids)

    def search_ids(self, queries: np.ndarray, k: int, nprobe: int | None = None, id_filter: IdFilter = None, *,
                   allowed: np.ndarray | Collection[int] | None = None, refine: bool | None = None,
                   k_factor: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """As ``search`` but returns internal ids: ``(scores float32 (n, k), ids int64 (n, k))``, ``-1`` padding."""
        with self._in_use():
            served = self._search_ids(queries, k, nprobe, id_filter, allowed, refine, k_factor)
            return served.scores, served.ids

    def search_served(self, queries: np.ndarray, k: int, nprobe: int | None = None, *,
                      allowed: np.ndarray | Collection[int] | None = None, names: bool = True) -> SearchServed:
        """As ``search`` (same hits), plus how each query was served (``indexer.widening.SearchServed``);
        its ``product_ids`` only when ``names`` (a caller reading a few of the ids skips the rest)."""
        with self._in_use():
            served = self._search_ids(queries, k, nprobe, None, allowed, None, None)
            served.product_ids = self._metadata.product_ids(served.ids) if names else None
            return served

    def search_lexical(self, text: str, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """BM25 top ``k`` of ``text`` among ``allowed`` internal ids (None: all): ``(scores float32 (m,),
        ids int64 (m,))``, m <= k, products sharing a word with the text only (``LexicalIndex.search``).
        Raises LexicalUnavailableError when the version has no lexical index."""
        with self._in_use():
            if self.lexical is None:
                raise LexicalUnavailableError(f"index version {self.version} has no lexical index (built before it "
                                              "existed, or no product had a title): dense retrieval only")
            return self.lexical.search(text, check_k(k), allowed)

    def _search_ids(self, queries, k, nprobe, id_filter, allowed, refine, k_factor) -> SearchServed:
        q = check_queries(queries, self.dim, int(self.manifest.get("query_dim", self.dim)))  # indexer/served_width.py
        k = check_k(k)
        nprobe = check_nprobe(nprobe, self.nprobe_default, self.nlist)
        refine = self.refine_default if refine is None else bool(refine)
        k_factor = self.k_factor_default if k_factor is None else int(k_factor)
        if k_factor < 1:
            raise SearchArgumentError(f"k_factor must be >= 1, got {k_factor}")
        predicate = None
        if callable(id_filter):
            predicate = id_filter
        elif id_filter is not None:
            if isinstance(id_filter, (str, bytes)):
                raise SearchArgumentError("id_filter must be a collection of product ids or a predicate, not a string")
            by_pid = self._metadata.internal_ids(id_filter)
            allowed = self._intersect(allowed, by_pid[by_pid >= 0])
        allowed_ids = None if allowed is None else self._as_id_array(allowed)
        if self.hidden:  # live deletes go through the predicate path: exact k still honoured
            predicate = _not_hidden(self.hidden, predicate)

        if predicate is None:
            return self._widened(q, k, nprobe, allowed_ids, refine, k_factor)
        scores, ids = self._search_predicate(q, k, nprobe, allowed_ids, refine, k_factor, predicate)
        no = np.zeros(q.shape[0], bool)
        return SearchServed(scores, ids, np.full(q.shape[0], nprobe, np.int32), no, no)

    def _widened(self, q, k, nprobe, allowed, refine, k_factor) -> SearchServed:
        """``_search_once``, widened until each query has min(k, allowed items) hits (``indexer.widening``)."""
        candidates = self._sharded.ntotal if allowed is None else allowed.size
        exact_first = allowed is not None and allowed.size <= self.exact_filter_max
        return widened_search(lambda rows, probe, exact: self._search_once(q[rows], k, probe, allowed, refine,
                                                                           k_factor, exact),
                              q.shape[0], min(k, candidates), nprobe, self.nlist, exact_first, candidates)

    def _search_predicate(self, q, k, nprobe, allowed_ids, refine, k_factor, predicate):
        """Over-fetch, keep results whose product id passes ``predicate``; fetch 4x more
        until k pass in every row or everything reachable was seen (our choice)."""
        out_s, out_i = _empty(q.shape[0], k)
        todo = np.arange(q.shape[0])
        fetch = min(max(4 * k, 64), MAX_SEARCH_K * 4)
        while todo.size:
            served = self._widened(q[todo], fetch, nprobe, allowed_ids, refine, k_factor)
            scores, iids = served.scores, served.ids
            names = self._metadata.product_ids(iids)
            still = []
            for row, qi in enumerate(todo):
                keep = [j for j, name in enumerate(names[row]) if name is not None and predicate(name)][:k]
                out_s[qi, :len(keep)] = scores[row, keep]
                out_i[qi, :len(keep)] = iids[row, keep]
                exhausted = (iids[row] < 0).any() or fetch >= self.n_items
                if len(keep) < k and not exhausted:
                    still.append(qi)
            todo = np.asarray(still, dtype=np.int64)
            fetch = min(fetch * 4, max(self.n_items, 1))
        return out_s, out_i

    def _search_once(self, q: np.ndarray, k: int, nprobe: int, allowed: np.ndarray | None,
                     refine: bool, k_factor: int, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        if self._sharded.ntotal == 0 or (allowed is not None and allowed.size == 0):
            return _empty(q.shape[0], k)
        selector = None if allowed is None else faiss.IDSelectorBatch(allowed.size, faiss.swig_ptr(allowed))
        if exact or (selector is not None and allowed.size <= self.exact_filter_max):
            if self._exact is None:  # the refine index is not exact (sq8 / none): scan the fp16 memmap
                rows = np.arange(self.n_items, dtype=np.int64) if allowed is None else allowed
                return exact_subset_search(self._vectors, q, k, rows)
            # exact over the allowed items: the fp16 vectors, scanned with the selector
            scores, ids = self._exact.search(q, k, params=faiss.SearchParameters(sel=selector))
            scores[ids < 0] = -np.inf
            return scores, ids
        base = faiss.SearchParametersIVF(nprobe=nprobe)
        if selector is not None:
            base.sel = selector  # the selector stays alive (local) until the search ends
        if refine and self._refined is not None:  # refine storage "none": PQ scores only
            k_factor = max(1, min(k_factor, MAX_SEARCH_K * 4 // k))  # at most 40,000 candidates
            k_factor = refine_k_factor(k, k_factor, nprobe, self._capacity)  # same hits, smaller heaps
            params = faiss.IndexRefineSearchParameters(k_factor=k_factor, base_index_params=base)
            scores, ids = self._refined.search(q, k, params=params)
        else:
            scores, ids = self._sharded.search(q, k, params=base)
        scores[ids < 0] = -np.inf
        return scores, ids

    # ------------------------------------------------------------------ metadata

    def get_products(self, product_ids: Iterable[str | None]) -> list[dict | None]:
        """Metadata records for product ids (None for an unknown id or a None entry).

        A record: ``{"product_id", "title", "image", "attributes", "extra", "flags", "shard", "row"}``.
        """
        pids = list(product_ids)
        with self._in_use():
            iids = self._metadata.internal_ids(pids)
            return self._metadata.records(int(i) for i in iids)

    def product_ids(self, internal_ids: np.ndarray) -> list[str | None]:
        """Product ids of ``int64 (m,)`` internal ids (None for -1 / unknown)."""
        with self._in_use():
            return self._metadata.product_ids(np.asarray(internal_ids, dtype=np.int64).reshape(1, -1))[0]

    def records(self, internal_ids: Iterable[int]) -> list[dict | None]:
        """Metadata records (as ``get_products``) by internal id, 0 .. ``n_items`` - 1."""
        with self._in_use():
            return self._metadata.records(int(i) for i in internal_ids)

    def internal_ids(self, product_ids: Iterable[str]) -> np.ndarray:
        """``int64 (n,)`` internal ids of product ids, ``-1`` for unknown ones."""
        with self._in_use():
            return self._metadata.internal_ids(product_ids)

    def ids_with(self, filters: Mapping[str, str | Sequence[str]]) -> np.ndarray:
        """Internal ids (sorted int64) of products matching attribute ``filters``.

        ``{"gender": "Women", "articleType": ["Heels", "Flats"]}`` = gender is Women AND
        articleType is Heels OR Flats (exact, case-sensitive values as in the catalogue).
        Pass the result as ``search(..., allowed=...)``.
        """
        result: np.ndarray | None = None
        with self._in_use():
            for attribute, values in filters.items():
                values = [values] if isinstance(values, str) else list(values)
                ids = np.unique(np.concatenate([self._metadata.facet_ids(attribute, v) for v in values])) \
                    if values else np.empty(0, np.int64)
                result = ids if result is None else np.intersect1d(result, ids, assume_unique=True)
        return result if result is not None else np.arange(self.n_items, dtype=np.int64)

    def facet_values(self) -> dict[str, list[str]]:
        """``{attribute: [values...]}`` available for ``ids_with``."""
        with self._in_use():
            return self._metadata.facet_values()

    def vectors(self, internal_ids: np.ndarray) -> np.ndarray:
        """Stored item vectors as float32 (n, d) for internal ids (fp16 on disk)."""
        ids = np.asarray(internal_ids, dtype=np.int64)
        with self._in_use():
            if ids.size and (ids.min() < 0 or ids.max() >= self._vectors.shape[0]):
                raise SearchArgumentError(f"internal ids must be in [0, {self._vectors.shape[0]})")
            return np.asarray(self._vectors[ids], dtype=np.float32)

    def _as_id_array(self, allowed: np.ndarray | Collection[int]) -> np.ndarray:
        ids = np.unique(np.fromiter((int(i) for i in allowed), dtype=np.int64)
                        if not isinstance(allowed, np.ndarray) else allowed.astype(np.int64, copy=False))
        return ids[(ids >= 0) & (ids < self._vectors.shape[0])]

    def _intersect(self, allowed, ids: np.ndarray) -> np.ndarray:
        return ids if allowed is None else np.intersect1d(self._as_id_array(allowed), ids)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Refuse new calls and release the shards, the vector memmap and the LMDB
        environment: now when no call is running, else when the last running one returns.
        Idempotent; never blocks."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            release = self._running == 0
            self._released = release
        if release:
            self._release()

    def _release(self) -> None:
        self._sharded = self._exact = self._refined = None  # _sharded points into the shards below
        self._shards = []
        self._vectors = np.empty((0, self.dim), np.float16)
        self.lexical = None
        self._metadata.close()

    def __enter__(self) -> "IndexVersion":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"IndexVersion({self.version!r}, items={self.n_items}, dim={self.dim}, shards={len(self._shards)})"


def _not_hidden(hidden: frozenset[str], predicate: Callable[[str], bool] | None) -> Callable[[str], bool]:
    """A predicate on product ids: not in ``hidden`` and, when given, passing ``predicate``."""
    return (lambda pid: pid not in hidden) if predicate is None else \
        (lambda pid: pid not in hidden and predicate(pid))


def _empty(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """No result: ``-inf`` scores and ``-1`` ids of shape (n, k)."""
    return np.full((n, k), -np.inf, dtype=np.float32), np.full((n, k), -1, dtype=np.int64)


def open_index(path: str | Path, *, verify: bool = True) -> IndexVersion:
    """Open the index version at ``path``: an index ROOT (follows ``ROOT/CURRENT``) or a
    version folder.

    verify: recompute every file's sha256 against the manifest (sizes are always checked).
    Raises NoCurrentVersionError, IndexIntegrityError (corrupted / truncated file, with its
    name) or IndexVersionError.
    """
    version_dir = resolve_version_dir(path)
    manifest = read_manifest(version_dir)
    verify_files(version_dir, manifest, checksums=verify)
    shards = []
    for entry in manifest["shards"]:
        file = version_dir / entry["file"]
        try:
            index = faiss.read_index(str(file))
        except RuntimeError as exc:
            raise IndexIntegrityError(f"{file}: faiss cannot read this shard ({str(exc).splitlines()[0]})") from exc
        if index.d != int(manifest["dim"]) or index.ntotal != int(entry["items"]):
            raise IndexIntegrityError(
                f"{file}: dim {index.d} / {index.ntotal} items, manifest says {manifest['dim']} / {entry['items']}")
        shards.append(index)
    vectors_file = version_dir / manifest["vectors"]["file"]
    try:
        vectors = np.load(vectors_file, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise IndexIntegrityError(f"{vectors_file}: unreadable exact vectors ({exc})") from exc
    if vectors.dtype != np.float16 or vectors.shape != (manifest["counts"]["indexed"], manifest["dim"]):
        raise IndexIntegrityError(f"{vectors_file}: {vectors.dtype} {vectors.shape}, manifest says float16 "
                                  f"({manifest['counts']['indexed']}, {manifest['dim']})")
    lexical = open_lexical(version_dir, manifest)
    metadata = MetadataReader(version_dir / manifest["metadata"]["file"])
    try:
        return IndexVersion(version_dir, manifest, shards, vectors, metadata, lexical)
    except BaseException:
        metadata.close()
        raise
