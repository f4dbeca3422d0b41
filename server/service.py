"""``ecsearch.v1.SearchService`` handlers: validate → decode → micro-batched encode → search.

One Search request goes through these stages (timed, returned in ``StageTimings`` and
recorded in the Prometheus histograms):

1. validate the request (cheap, on the event loop);
2. **decode**: image bytes → RGB (pixel limit checked before decoding) → preprocessed
   tensor, in the decode thread pool;
3. **queue** + **encode**: one sample of a micro-batched query tower call;
4. **search** + **metadata**: faiss search over the shards and LMDB reads, with metadata
   filters (facet id sets, see ``server.filters``; a photo-only query in two stages,
   ``engine.retrieval.instance_first``), done for the whole micro-batch in one
   job of the search thread pool (``server.search_stage``, the batcher's post-encode
   search stage), under a lease on the index version that stays held until that work is
   done.

Every failure becomes a precise gRPC status (see ``_status_of``); nothing a request sends
can crash the server or poison later requests. Source: our choice.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, Callable

import grpc

from engine.model.errors import (BlankTextError, EmptySampleError, ImageDecodeError, ImageTooLargeError,
                           InputError)
from engine.retrieval.instance_first import INSTANCE_FIRST
from indexer.errors import SearchArgumentError
from indexer.lexical import LexicalUnavailableError
from indexer.search import MAX_SEARCH_K
from server.batching import BatchDeadlineError, BatcherClosedError, MicroBatcher
from server.filters import FilterError, FoundHit, flatten_record, parse_filters
from server.gen.ecsearch.v1 import search_pb2, search_pb2_grpc
from server.index_holder import IndexHolder, NoIndexError, ServedVersion
from server.prometheus_metrics import ServerMetrics
from server.paging import PageTokenError, decode_page_token, encode_page_token, query_fingerprint
from server.retrieval import DENSE, HYBRID, LEXICAL, HybridConfig, SearchJob, query_kind_nprobe, run_job

log = logging.getLogger(__name__)

# the wire contract's limit on top_k (proto: 1 to 1000), within the library's MAX_SEARCH_K
MAX_REQUEST_TOP_K = 1000
DEFAULT_TOP_K = 10
MAX_PRODUCT_IDS = 1000
MAX_NPROBE = 65536
_MODES = {search_pb2.RETRIEVAL_UNSPECIFIED: DENSE, search_pb2.RETRIEVAL_DENSE: DENSE,
          search_pb2.RETRIEVAL_LEXICAL: LEXICAL, search_pb2.RETRIEVAL_HYBRID: HYBRID}
_WIRE_MODES = {DENSE: search_pb2.RETRIEVAL_DENSE, LEXICAL: search_pb2.RETRIEVAL_LEXICAL,
               HYBRID: search_pb2.RETRIEVAL_HYBRID}
_FUSIONS = {search_pb2.FUSION_UNSPECIFIED: "rrf", search_pb2.FUSION_RRF: "rrf",
            search_pb2.FUSION_WEIGHTED: "weighted"}


@dataclass(frozen=True)
class ServiceLimits:
    """Request limits (our choice). ``max_text_chars``: longer texts are rejected."""

    max_top_k: int = MAX_REQUEST_TOP_K
    default_top_k: int = DEFAULT_TOP_K
    max_product_ids: int = MAX_PRODUCT_IDS
    max_text_chars: int = 2048

    def __post_init__(self) -> None:
        if not 1 <= self.max_top_k <= MAX_SEARCH_K:
            raise ValueError(f"max_top_k must be in [1, {MAX_SEARCH_K}] (indexer.search.MAX_SEARCH_K), "
                             f"got {self.max_top_k}")


class RequestError(Exception):
    """A request fails with ``code`` and ``detail``."""

    def __init__(self, code: grpc.StatusCode, detail: str):
        super().__init__(detail)
        self.code = code
        self.detail = detail


_INPUT_ERROR_WHAT = {
    EmptySampleError: "empty query",
    BlankTextError: "blank text",
    ImageDecodeError: "undecodable image",
    ImageTooLargeError: "image over limits",
}


def _status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map an exception raised while serving to (status code, detail)."""
    if isinstance(exc, RequestError):
        return exc.code, exc.detail
    if isinstance(exc, InputError):
        what = next((w for t, w in _INPUT_ERROR_WHAT.items() if isinstance(exc, t)), "invalid input")
        return grpc.StatusCode.INVALID_ARGUMENT, f"{what}: {exc.reason}"
    if isinstance(exc, LexicalUnavailableError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, (FilterError, SearchArgumentError, PageTokenError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, NoIndexError):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, BatcherClosedError):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, BatchDeadlineError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}): {exc}"


class _Lease:
    """A request's lease on an index version, returned only after its thread work is done.

    Reference counted: the request itself holds one reference (dropped by ``release()``,
    once, however often it is called) and every tracked future one (dropped when it is done,
    in whatever thread finishes it). The version's lease is returned exactly once, when the
    count reaches zero. Thread-safe. Source: our choice.
    """

    def __init__(self, served: ServedVersion):
        self.served = served
        self._lock = threading.Lock()
        self._holders = 1  # the request itself
        self._released = False

    async def run(self, executor: Executor, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        future = executor.submit(fn, *args, **kwargs)
        self.track(future)
        return await asyncio.wrap_future(future)

    def track(self, future: Future) -> None:
        """Keep the lease until ``future`` (thread work on this version) is done.

        Raises:
            RuntimeError: the lease was already returned (the work would run unleased).
        """
        with self._lock:
            if self._holders == 0:
                raise RuntimeError(f"index version {self.served.version}: tracking work after the lease ended")
            self._holders += 1
        future.add_done_callback(self._drop)

    def release(self) -> None:
        """The request is done with the version; the lease ends when its tracked work is done too."""
        with self._lock:
            if self._released:
                return
            self._released = True
        self._drop(None)

    def _drop(self, _future: Future | None) -> None:
        with self._lock:
            self._holders -= 1
            last = self._holders == 0
        if last:
            self.served.release()


class SearchService(search_pb2_grpc.SearchServiceServicer):
    """The gRPC servicer. ``decode_image(bytes) -> encoder image input`` raises InputError."""

    def __init__(self, holder: IndexHolder, batcher: MicroBatcher, *,
                 decode_image: Callable[[bytes], Any], decode_executor: Executor,
                 pretokenize: Callable[[str], Any] = lambda text: text,
                 search_executor: Executor, metrics: ServerMetrics,
                 limits: ServiceLimits = ServiceLimits(), photo_instance_first: int = INSTANCE_FIRST):
        self._holder = holder
        self._batcher = batcher
        self._decode_image = decode_image
        self._pretokenize = pretokenize
        self._decode_executor = decode_executor
        self._search_executor = search_executor
        self._metrics = metrics
        self._limits = limits
        self._instance_first = photo_instance_first  # engine.retrieval.instance_first; 0: one stage

    # ---------------------------------------------------------------- Search
    async def Search(self, request: search_pb2.SearchRequest,
                     context: grpc.aio.ServicerContext) -> search_pb2.SearchResponse:
        started = time.perf_counter()
        return await self._guarded("Search", lambda: self._search(request, context, started), context)

    async def _guarded(self, method: str, call, context: grpc.aio.ServicerContext):
        """Run ``call()``; map any exception to its gRPC status (``_status_of``), count the
        request by status, and log unexpected (INTERNAL) errors with their traceback."""
        code = grpc.StatusCode.OK
        try:
            return await call()
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code, detail = _status_of(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", method)
        finally:
            self._metrics.count_request(method, code.name)
        await context.abort(code, detail)

    async def _search(self, request: search_pb2.SearchRequest, context: grpc.aio.ServicerContext,
                      started: float) -> search_pb2.SearchResponse:
        text, image_bytes, top_k, nprobe = self._validate(request)
        mode, hybrid, page_size = self._validate_retrieval(request, text, image_bytes)
        if page_size and not request.HasField("top_k"):
            top_k = self._limits.max_top_k  # paging walks the whole list, up to the limit
        fingerprint = query_fingerprint(request) if page_size else ""
        deadline_s = _deadline(context)
        lease = _Lease(self._holder.acquire())
        try:
            served = lease.served
            filters = parse_filters(((f.field, list(f.values)) for f in request.filters),
                                    served.metadata_fields)
            offset = decode_page_token(request.page_token, served.version, fingerprint, top_k) \
                if request.page_token else 0
            if nprobe is None:  # the version's nprobe for this kind of query
                nprobe = query_kind_nprobe(served.index.manifest, text is not None, image_bytes is not None)
            two_stage = text is None and self._instance_first > 0  # a photo-only query
            job = SearchJob(served.index, served.cache, top_k, tuple(filters), nprobe, mode, text, hybrid,
                            offset, page_size or None, served.instance if two_stage else None, self._instance_first)
            result, encoded, decode_ms = await self._retrieve(job, image_bytes, deadline_s, lease)
            _check_deadline(deadline_s)
        finally:
            lease.release()
        response = search_pb2.SearchResponse(index_version=served.version, retrieval=_WIRE_MODES[mode],
                                             encode_batch_size=0 if encoded is None else encoded.batch_size)
        for rank, hit in enumerate(result.hits, start=offset + 1):
            _add_hit(response, hit, rank)
        if page_size and offset + page_size < result.total_hits:
            response.next_page_token = encode_page_token(served.version, fingerprint, offset + page_size)
        if result.dense is not None:
            response.dense_serving.CopyFrom(search_pb2.DenseServing(
                nprobe=result.dense.nprobe, exact=result.dense.exact, widened=result.dense.widened))
        timings = dict(decode_ms=decode_ms, queue_ms=0.0 if encoded is None else encoded.queue_ms,
                       encode_ms=0.0 if encoded is None else encoded.encode_ms, search_ms=result.search_ms,
                       metadata_ms=result.metadata_ms, lexical_ms=result.lexical_ms, fusion_ms=result.fusion_ms,
                       total_ms=(time.perf_counter() - started) * 1e3)
        response.timings.CopyFrom(search_pb2.StageTimings(**timings))
        skip = {"decode_ms": image_bytes is None or mode == LEXICAL, "queue_ms": encoded is None,
                "encode_ms": encoded is None, "search_ms": mode == LEXICAL, "lexical_ms": mode == DENSE,
                "fusion_ms": mode != HYBRID}
        self._metrics.observe_stages_ms(**{k[:-3]: v for k, v in timings.items() if not skip.get(k)})
        return response

    async def _retrieve(self, job: SearchJob, image_bytes: bytes | None, deadline_s: float | None,
                        lease: _Lease) -> tuple[Any, Any, float]:
        """``(FilteredSearchResult, the batcher's EncodeResult or None, decode_ms)`` of ``job``:
        lexical jobs straight in the search pool, the others through decode, the micro-batched
        query tower and the batcher's post-encode search stage (``server.search_stage``)."""
        if job.retrieval == LEXICAL:
            return await lease.run(self._search_executor, run_job, job, None), None, 0.0
        decode_ms = 0.0
        image = None
        if image_bytes is not None:
            t0 = time.perf_counter()
            image = await asyncio.wrap_future(self._decode_executor.submit(self._decode_image, image_bytes))
            decode_ms = (time.perf_counter() - t0) * 1e3
        _check_deadline(deadline_s)
        # Tokenized here, per request, so the tower thread (the server's one serial
        # stage) only pads the batch: 0.85 -> ~0.1 ms per batch at concurrency 8.
        tokens = None if job.text is None else self._pretokenize(job.text)
        encoded = await self._batcher.encode(tokens, image, deadline_s, payload=job, track=lease.track)
        return encoded.result, encoded, decode_ms

    def _validate_retrieval(self, request: search_pb2.SearchRequest, text: str | None,
                            image: bytes | None) -> tuple[str, HybridConfig, int]:
        """``(mode, hybrid options, page_size)``; raises RequestError (INVALID_ARGUMENT) on bad values."""
        bad = grpc.StatusCode.INVALID_ARGUMENT
        mode = _MODES.get(request.retrieval)
        if mode is None:
            raise RequestError(bad, f"unknown retrieval mode {request.retrieval}")
        if mode != DENSE and text is None:
            raise RequestError(bad, f"{mode} retrieval needs text (BM25 ranks words): an image-only query uses "
                                    "dense retrieval")
        if mode == LEXICAL and image is not None:
            raise RequestError(bad, "lexical retrieval uses text only: send no image, or use hybrid retrieval "
                                    "(text to both sides, the image to the dense side)")
        if request.page_size < 0:
            raise RequestError(bad, f"page_size must be >= 0, got {request.page_size}")
        if request.page_token and request.page_size == 0:
            raise RequestError(bad, "page_token needs page_size > 0")
        options = request.hybrid
        fusion = _FUSIONS.get(options.fusion)
        dense_w = options.dense_weight if options.HasField("dense_weight") else 1.0
        lexical_w = options.lexical_weight if options.HasField("lexical_weight") else 1.0
        rrf_k = options.rrf_k if options.HasField("rrf_k") else HybridConfig.rrf_k
        if fusion is None:
            raise RequestError(bad, f"unknown hybrid fusion {options.fusion}")
        if not all(math.isfinite(w) and w >= 0 for w in (dense_w, lexical_w)) or dense_w + lexical_w == 0:
            raise RequestError(bad, f"hybrid weights must be finite, >= 0 and not both 0, got dense {dense_w}, "
                                    f"lexical {lexical_w}")
        if rrf_k < 1:
            raise RequestError(bad, f"hybrid rrf_k must be >= 1, got {rrf_k}")
        hybrid = HybridConfig(fusion, dense_w, lexical_w, rrf_k)
        return mode, hybrid, request.page_size

    def _validate(self, request: search_pb2.SearchRequest) -> tuple[str | None, bytes | None, int, int | None]:
        bad = grpc.StatusCode.INVALID_ARGUMENT
        text = request.text if request.text != "" else None
        image = bytes(request.image) if len(request.image) > 0 else None
        if text is None and image is None:
            raise RequestError(bad, "empty query: give text, an image, or both")
        if text is not None and not text.strip():
            raise RequestError(bad, "blank text: the query text is whitespace only")
        if text is not None and len(text) > self._limits.max_text_chars:
            raise RequestError(bad, f"text is {len(text)} characters, over the limit of {self._limits.max_text_chars}")
        top_k = request.top_k if request.HasField("top_k") else self._limits.default_top_k
        if not 1 <= top_k <= self._limits.max_top_k:
            raise RequestError(bad, f"top_k must be in [1, {self._limits.max_top_k}], got {top_k}")
        nprobe = request.nprobe if request.HasField("nprobe") else None
        if nprobe is not None and not 1 <= nprobe <= MAX_NPROBE:
            raise RequestError(bad, f"nprobe must be in [1, {MAX_NPROBE}], got {nprobe}")
        return text, image, top_k, nprobe

    # ----------------------------------------------------------- GetProducts
    async def GetProducts(self, request: search_pb2.GetProductsRequest,
                          context: grpc.aio.ServicerContext) -> search_pb2.GetProductsResponse:
        return await self._guarded("GetProducts", lambda: self._get_products(request), context)

    async def _get_products(self, request: search_pb2.GetProductsRequest) -> search_pb2.GetProductsResponse:
        ids = list(request.product_ids)
        bad = grpc.StatusCode.INVALID_ARGUMENT
        if not ids:
            raise RequestError(bad, "no product_ids given")
        if len(ids) > self._limits.max_product_ids:
            raise RequestError(bad, f"{len(ids)} product_ids, over the limit of {self._limits.max_product_ids}")
        if any(not pid for pid in ids):
            raise RequestError(bad, "an empty product_id was given")
        lease = _Lease(self._holder.acquire())
        try:
            served = lease.served
            if served.cache is not None:  # flattened records, shared with Search's hits
                records = await lease.run(self._search_executor, served.cache.records, ids)
            else:
                raw = await lease.run(self._search_executor, served.index.get_products, ids)
                records = [None if record is None else flatten_record(record) for record in raw]
        finally:
            lease.release()
        response = search_pb2.GetProductsResponse(index_version=served.version)
        hidden = served.index.hidden  # live deletes (server.tombstones): missing, as in Search
        for pid, record in zip(ids, records):
            if record is None or pid in hidden:
                response.missing_product_ids.append(pid)
            else:
                product = response.products.add(product_id=pid)
                product.metadata.update(record)
        return response


def _add_hit(response: search_pb2.SearchResponse, hit: FoundHit, rank: int) -> None:
    out = response.hits.add(product_id=hit.product_id, score=hit.score, rank=rank)
    out.metadata.update(hit.record)


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The request deadline as a ``time.monotonic()`` time, or None."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _check_deadline(deadline_s: float | None) -> None:
    if deadline_s is not None and time.monotonic() >= deadline_s:
        raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the request finished")
