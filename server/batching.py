"""Micro-batching of concurrent queries into one query tower call.

Requests submit one sample each (text and/or preprocessed image) from the event loop; one
dedicated tower thread takes up to ``max_batch_size`` pending samples, waiting at most
``max_wait_ms`` after the first one, runs one ``encode(texts, images) -> float32 (B, d)``
call, hands the results back to the loop in one callback, and takes the next batch at once.
The tower never waits for the event loop between batches (an earlier asyncio-task design
did: the loop had to wake up, deliver, and start the next call, which cost text queries
1-2 ms each at concurrency 8 on 2 cores). While a call runs, new requests queue up and form
the next batch, so under load batches fill without waiting; hence the default
``max_wait_ms = 0`` ("greedy" batching: a lone query is encoded at once, queries arriving
during a tower call share the next one), which measured best on 2 cores
(bench/bench_grpc.py). Text-only samples and samples with
an image go in separate calls (the oldest pending sample decides which kind is next, so
neither starves), with their own size limits. Source: our choice (the usual dynamic
batching of inference servers).

**Then stage** (optional, ``then_fn`` + ``then_executor``): what each sample needs after its
vector, run for the whole batch in one job on another thread, e.g. the query server's
searches (``server.search_stage``); its results travel back with the vectors in the same
single callback. Doing the searches there, instead of the loop handing each request's
vector to a search thread and taking the hits back, removed two thread hops per request;
measured with bench/bench_grpc.py, text at concurrency 8, interleaved runs: p50 13.8 / 11.1
/ 11.4 -> 10.5 / 10.2 / 11.0 ms, p99 43.9 / 29.7 / 22.7 -> 22.4 / 22.5 / 23.0 ms. Each sample may carry a ``concurrent.futures.Future`` (``track``) that is
done once the batcher has finished with it, whatever happened (results delivered, error,
cancelled, closed): the server holds its index lease until then.

Isolation: a bad sample never fails the others. When the encoder raises an ``InputError``
whose ``.index`` names a sample, that sample alone gets the error and the rest of the batch
is encoded again; any other exception makes the batch fall back to one call per sample, so
only the guilty sample fails.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from engine.errors import InputError

log = logging.getLogger(__name__)

EncodeFn = Callable[[Sequence[str | None], Sequence[Any | None]], np.ndarray]
# (payloads of the batch's samples, their vectors float32 (B, d)) -> B results (an
# exception instance fails that sample alone)
ThenFn = Callable[[Sequence[Any], np.ndarray], Sequence[Any]]


@dataclass(frozen=True)
class BatchConfig:
    """Micro-batcher settings.

    Attributes:
        max_batch_size: most text-only samples in one query tower call.
        max_wait_ms: longest a sample waits for companions before its batch is encoded.
        max_image_batch_size: most samples with an image in one call. Our choice, 8: on 2
            busy cores the image backbone alone costs more per image in bigger batches
            (25 ms at 1, 38 at 4, 54 at 8), yet end to end (bench/bench_grpc.py, image
            queries at concurrency 8) batches of up to 8 gave 14-16 QPS against 12-13 with
            batches of 1, so the per-call overhead dominates.
    """

    max_batch_size: int = 32
    max_wait_ms: float = 0.0
    max_image_batch_size: int = 8

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_image_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.max_batch_size}, {self.max_image_batch_size}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")


@dataclass(frozen=True)
class EncodedQuery:
    """One encoded sample: ``vector`` float32 (d,), time queued and encoding (ms), batch
    size, and the then stage's result for it (None without a then stage)."""

    vector: np.ndarray
    queue_ms: float
    encode_ms: float
    batch_size: int
    result: Any = None


class BatchDeadlineError(Exception):
    """The sample's deadline passed while it waited in the queue (it was not encoded)."""


class BatcherClosedError(Exception):
    """The batcher is closed; no more samples are accepted."""


@dataclass
class _Pending:
    text: str | None
    image: Any | None
    future: asyncio.Future
    enqueued_s: float
    deadline_s: float | None  # time.monotonic() deadline, or None
    payload: Any = None
    finished: concurrent.futures.Future | None = None  # done when the batcher is done with it

    def release(self) -> None:
        if self.finished is not None and not self.finished.done():
            self.finished.set_result(None)


class MicroBatcher:
    """Collects concurrent ``encode`` calls into batched calls of ``encode_fn`` on one thread.

    ``encode_fn(texts, images)`` gets equal-length lists (elements may be None) and returns
    ``float32 (B, d)``; it always runs on the batcher's own thread, one call at a time.
    ``on_batch(size, seconds)`` is called on that thread after each call. ``then_fn(payloads,
    vectors)``, when given, runs once per encoded batch in ``then_executor`` and returns one
    result per sample (see the module docstring). Create, ``start()`` and ``close()`` inside
    one running event loop.
    """

    def __init__(self, encode_fn: EncodeFn, config: BatchConfig = BatchConfig(),
                 on_batch: Callable[[int, float], None] | None = None, thread_name: str = "tower",
                 then_fn: ThenFn | None = None, then_executor: concurrent.futures.Executor | None = None):
        if (then_fn is None) != (then_executor is None):
            raise ValueError("give both then_fn and then_executor, or neither")
        self._encode_fn = encode_fn
        self.config = config
        self._on_batch = on_batch
        self._thread_name = thread_name
        self._then_fn = then_fn
        self._then_executor = then_executor
        self._pending: collections.deque[_Pending] = collections.deque()
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self) -> None:
        """Start the tower thread; results are delivered to the running loop."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._work, name=self._thread_name, daemon=True)
        self._thread.start()

    async def close(self) -> None:
        """Stop accepting samples, fail the queued ones, and wait for the running call to end."""
        with self._cond:
            self._closed = True
            queued = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for item in queued:
            item.release()
            _settle(item.future, error=BatcherClosedError("server is shutting down"))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    async def encode(self, text: str | None, image: Any | None, deadline_s: float | None = None, *,
                     payload: Any = None,
                     track: Callable[[concurrent.futures.Future], None] | None = None) -> EncodedQuery:
        """Encode one sample in the next batch (and run the then stage on it).

        Args:
            text: query text or None.
            image: image as accepted by the encoder (e.g. a preprocessed tensor) or None.
            deadline_s: ``time.monotonic()`` time after which the sample is dropped unencoded.
            payload: what ``then_fn`` gets for this sample.
            track: called at once with a ``concurrent.futures.Future`` that is done when the
                batcher has finished with this sample (even after this call was cancelled).

        Raises:
            InputError: the encoder rejected this sample (``.index`` is reset to 0).
            BatchDeadlineError: the deadline passed before the sample was encoded.
            BatcherClosedError: the batcher is closed.
        """
        if self._closed or self._thread is None:
            raise BatcherClosedError("server is shutting down")
        future = asyncio.get_running_loop().create_future()
        item = _Pending(text, image, future, time.monotonic(), deadline_s, payload)
        if track is not None:
            item.finished = concurrent.futures.Future()
            track(item.finished)
        with self._cond:
            if self._closed:
                item.release()
                raise BatcherClosedError("server is shutting down")
            self._pending.append(item)
            self._cond.notify()
        return await future

    # ------------------------------------------------------------ tower thread
    def _work(self) -> None:
        wait_s = self.config.max_wait_ms / 1e3
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                if wait_s > 0:
                    until = time.monotonic() + wait_s
                    while not self._closed and self._same_kind_pending() < self._limit_for(self._pending[0]):
                        remaining = until - time.monotonic()
                        if remaining <= 0:
                            break
                        self._cond.wait(remaining)
                    if self._closed:
                        return
                batch = self._take_batch()
            try:
                self._encode_batch(batch)
            except Exception as exc:  # never let the tower thread die
                log.exception("micro-batch failed unexpectedly")
                self._deliver([(item, None, exc) for item in batch], batch_size=len(batch), encode_ms=0.0)

    def _limit_for(self, item: _Pending) -> int:
        return self.config.max_image_batch_size if item.image is not None else self.config.max_batch_size

    def _same_kind_pending(self) -> int:
        with_image = self._pending[0].image is not None
        return sum((p.image is not None) == with_image for p in self._pending)

    def _take_batch(self) -> list[_Pending]:
        """The oldest sample decides the batch kind (with image / text-only); take the oldest
        samples of that kind up to its limit, leaving the others queued in order."""
        with_image = self._pending[0].image is not None
        limit = self._limit_for(self._pending[0])
        batch, rest = [], collections.deque()
        while self._pending and len(batch) < limit:
            item = self._pending.popleft()
            (batch if (item.image is not None) == with_image else rest).append(item)
        rest.extend(self._pending)
        self._pending = rest
        return batch

    def _encode_batch(self, batch: list[_Pending]) -> None:
        now = time.monotonic()
        live, late = [], []
        for item in batch:
            if item.future.done():  # caller cancelled (deadline, client gone)
                item.release()
                continue
            if item.deadline_s is not None and now >= item.deadline_s:
                late.append((item, None, BatchDeadlineError("deadline passed while queued for the query tower")))
                continue
            live.append(item)
        if late:
            self._deliver(late, batch_size=0, encode_ms=0.0)
        while live:
            started = time.monotonic()
            try:
                vectors = self._call(live)
            except InputError as exc:
                if exc.index is None or not 0 <= exc.index < len(live):
                    self._encode_one_by_one(live)
                    return
                bad = live.pop(exc.index)
                exc.index = 0  # the request's own view: it sent one sample
                self._deliver([(bad, None, exc)], batch_size=0, encode_ms=0.0)
                continue
            except Exception:
                if len(live) == 1:
                    raise
                log.warning("batch of %d failed; retrying sample by sample", len(live), exc_info=True)
                self._encode_one_by_one(live)
                return
            self._finish(live, vectors, started)
            return

    def _encode_one_by_one(self, items: list[_Pending]) -> None:
        for item in items:
            if item.future.done():
                item.release()
                continue
            started = time.monotonic()
            try:
                vectors = self._call([item])
            except Exception as exc:
                if isinstance(exc, InputError):
                    exc.index = 0
                self._deliver([(item, None, exc)], batch_size=0, encode_ms=0.0)
                continue
            self._finish([item], vectors, started)

    def _call(self, items: list[_Pending]) -> np.ndarray:
        vectors = np.asarray(self._encode_fn([p.text for p in items], [p.image for p in items]), dtype=np.float32)
        if vectors.shape[0] != len(items):
            raise RuntimeError(f"encoder returned {vectors.shape[0]} vectors for {len(items)} samples")
        return vectors

    def _finish(self, items: list[_Pending], vectors: np.ndarray, started: float) -> None:
        finished = time.monotonic()
        if self._on_batch is not None:
            self._on_batch(len(items), finished - started)
        encode_ms = (finished - started) * 1e3
        if self._then_fn is None:
            self._deliver([(item, (row.copy(), None), None) for item, row in zip(items, vectors)],
                          batch_size=len(items), encode_ms=encode_ms, started=started)
            return
        try:
            self._then_executor.submit(self._then, items, vectors, encode_ms, started)
        except RuntimeError as exc:  # the executor is shut down
            self._deliver([(item, None, BatcherClosedError(f"server is shutting down ({exc})")) for item in items],
                          batch_size=len(items), encode_ms=encode_ms, started=started)

    def _then(self, items: list[_Pending], vectors: np.ndarray, encode_ms: float, started: float) -> None:
        """The then stage of one batch (in ``then_executor``): one result or error per sample."""
        try:
            results = list(self._then_fn([item.payload for item in items], vectors))
            if len(results) != len(items):
                raise RuntimeError(f"then stage returned {len(results)} results for {len(items)} samples")
        except Exception as exc:
            log.exception("then stage failed for a batch of %d", len(items))
            results = [exc] * len(items)
        outcomes = [(item, None, result) if isinstance(result, BaseException) else (item, (row.copy(), result), None)
                    for item, row, result in zip(items, vectors, results)]
        self._deliver(outcomes, batch_size=len(items), encode_ms=encode_ms, started=started)

    def _deliver(self, outcomes: list[tuple[_Pending, tuple[np.ndarray, Any] | None, BaseException | None]], *,
                 batch_size: int, encode_ms: float, started: float | None = None) -> None:
        """Hand a batch's outcomes (item, (vector, then result) or None, error or None) to the
        event loop in one callback."""
        settled = []
        for item, value, error in outcomes:
            item.release()
            if error is not None:
                settled.append((item.future, None, error))
            else:
                vector, result = value
                settled.append((item.future, EncodedQuery(
                    vector=vector, queue_ms=(started - item.enqueued_s) * 1e3, encode_ms=encode_ms,
                    batch_size=batch_size, result=result), None))
        try:
            self._loop.call_soon_threadsafe(_settle_all, settled)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def _settle(future: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    """Set a future's outcome unless it is already done (cancelled). Loop thread only."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _settle_all(settled: list[tuple[asyncio.Future, Any, BaseException | None]]) -> None:
    for future, result, error in settled:
        _settle(future, result, error)
