"""Micro-batching of concurrent queries into one query tower call.

Contract: requests submit one sample each (text and/or preprocessed image) from the event
loop with ``await encode(...)``; one dedicated tower thread takes up to ``max_batch_size``
pending samples (``max_image_batch_size`` for samples with an image; text-only samples and
samples with an image go in separate calls, the oldest pending sample deciding which kind
is next), waiting at most ``max_wait_ms`` after the first one, runs one
``encode_fn(texts, images) -> float32 (B, d)`` call and takes the next batch at once,
without waiting for the event loop. ``max_wait_ms = 0`` is greedy batching: a lone query
is encoded at once, queries arriving during a call share the next one.

**Post-encode stage** (optional, ``post_encode_fn`` + ``post_encode_executor``): what each
sample needs after its vector, run for the whole batch in one job of another thread pool;
the query server's post-encode search stage (``server.search_stage``) searches there. Its
results travel back with the vectors.

Threads: the tower thread and the post-encode stage never touch asyncio objects; every
outcome reaches the loop through ``loop.call_soon_threadsafe`` (one callback per batch),
and a caller giving up (cancelled future) is seen by the tower thread through a flag the
loop sets. Each sample is handed on exactly once: to its caller (result or error), or to
the post-encode stage, which then answers it; an unexpected error later in the same batch
fails only the samples not yet handed on.

Tracking: a sample may carry a ``concurrent.futures.Future`` (``track``) that is done once
the batcher has finished with it, whatever happened (delivered, error, cancelled, closed);
the server holds its index lease until then.

Isolation: a bad sample never fails the others. When the encoder raises an ``InputError``
whose ``.index`` names a sample, that sample alone gets the error and the rest of the batch
is encoded again; any other exception makes the batch fall back to one call per sample, so
only the guilty sample fails. A failing post-encode stage fails its batch's samples.

Why this design, and what it measured against the alternatives (an asyncio-task batcher,
searches as separate thread hops): docs/serving.md. Source: our choice (the usual dynamic
batching of inference servers).
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

from engine.model.errors import InputError

log = logging.getLogger(__name__)

EncodeFn = Callable[[Sequence[str | None], Sequence[Any | None]], np.ndarray]
# (payloads of the batch's samples, their vectors float32 (B, d)) -> B results (an
# exception instance fails that sample alone)
PostEncodeFn = Callable[[Sequence[Any], np.ndarray], Sequence[Any]]


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
    size, and the post-encode stage's result for it (None without that stage)."""

    vector: np.ndarray
    queue_ms: float
    encode_ms: float
    batch_size: int
    result: Any = None


class BatchDeadlineError(Exception):
    """The sample's deadline passed while it waited in the queue (it was not encoded)."""


class BatcherClosedError(Exception):
    """The batcher is closed; no more samples are accepted."""


_HAND_ON_LOCK = threading.Lock()


@dataclass
class _Pending:
    text: str | None
    image: Any | None
    future: asyncio.Future  # touched on the event loop only
    enqueued_s: float
    deadline_s: float | None  # time.monotonic() deadline, or None
    payload: Any = None
    finished: concurrent.futures.Future | None = None  # done when the batcher is done with it
    abandoned: bool = False  # set on the loop when the caller stopped waiting (cancelled)
    handed_on: bool = False  # an outcome was sent to the loop, or the post-encode stage took it

    def hand_on(self) -> bool:
        """Claim the sample's one hand-off; False when it was already handed on. Any thread."""
        with _HAND_ON_LOCK:
            if self.handed_on:
                return False
            self.handed_on = True
            return True

    def release(self) -> None:
        """The batcher is done with the sample (called once, by whoever handed it on)."""
        if self.finished is not None:
            self.finished.set_result(None)

    def on_future_done(self, future: asyncio.Future) -> None:  # loop thread
        if future.cancelled():
            self.abandoned = True


class MicroBatcher:
    """Collects concurrent ``encode`` calls into batched calls of ``encode_fn`` on one thread.

    ``encode_fn(texts, images)`` gets equal-length lists (elements may be None) and returns
    ``float32 (B, d)``; it always runs on the batcher's own thread, one call at a time.
    ``on_batch(size, seconds)`` is called on that thread after each call. ``post_encode_fn(payloads,
    vectors)``, when given, runs once per encoded batch in ``post_encode_executor`` and returns one
    result per sample (see the module docstring). Create, ``start()`` and ``close()`` inside
    one running event loop.
    """

    def __init__(self, encode_fn: EncodeFn, config: BatchConfig = BatchConfig(),
                 on_batch: Callable[[int, float], None] | None = None, thread_name: str = "tower",
                 post_encode_fn: PostEncodeFn | None = None,
                 post_encode_executor: concurrent.futures.Executor | None = None):
        if (post_encode_fn is None) != (post_encode_executor is None):
            raise ValueError("give both post_encode_fn and post_encode_executor, or neither")
        self._encode_fn = encode_fn
        self.config = config
        self._on_batch = on_batch
        self._thread_name = thread_name
        self._post_encode_fn = post_encode_fn
        self._post_encode_executor = post_encode_executor
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
            if item.hand_on():
                item.release()
                _settle(item.future, error=BatcherClosedError("server is shutting down"))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    async def encode(self, text: str | None, image: Any | None, deadline_s: float | None = None, *,
                     payload: Any = None,
                     track: Callable[[concurrent.futures.Future], None] | None = None) -> EncodedQuery:
        """Encode one sample in the next batch (and run the post-encode stage on it).

        Args:
            text: query text or None.
            image: image as accepted by the encoder (e.g. a preprocessed tensor) or None.
            deadline_s: ``time.monotonic()`` time after which the sample is dropped unencoded.
            payload: what ``post_encode_fn`` gets for this sample.
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
        future.add_done_callback(item.on_future_done)
        if track is not None:
            item.finished = concurrent.futures.Future()
            item.finished.set_running_or_notify_cancel()
            track(item.finished)
        with self._cond:
            if self._closed:
                item.hand_on()
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
            if item.abandoned:  # caller cancelled (deadline, client gone)
                self._drop(item)
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
            if item.abandoned:
                self._drop(item)
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

    @staticmethod
    def _drop(item: _Pending) -> None:
        """An abandoned sample: nobody waits for an outcome; end its tracked work."""
        if item.hand_on():
            item.release()

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
        if self._post_encode_fn is None:
            self._deliver([(item, (row.copy(), None), None) for item, row in zip(items, vectors)],
                          batch_size=len(items), encode_ms=encode_ms, started=started)
            return
        taken = [n for n, item in enumerate(items) if item.hand_on()]  # the stage answers these now
        items, vectors = [items[n] for n in taken], vectors[taken]
        if not items:
            return
        try:
            self._post_encode_executor.submit(self._post_encode, items, vectors, encode_ms, started)
        except RuntimeError as exc:  # the executor is shut down
            self._deliver([(item, None, BatcherClosedError(f"server is shutting down ({exc})")) for item in items],
                          batch_size=len(items), encode_ms=encode_ms, started=started, taken=True)

    def _post_encode(self, items: list[_Pending], vectors: np.ndarray, encode_ms: float, started: float) -> None:
        """The post-encode stage of one batch (in ``post_encode_executor``): one result or
        error per sample; it owns the samples (already handed on to it)."""
        try:
            results = list(self._post_encode_fn([item.payload for item in items], vectors))
            if len(results) != len(items):
                raise RuntimeError(f"post-encode stage returned {len(results)} results for {len(items)} samples")
        except Exception as exc:
            log.exception("post-encode stage failed for a batch of %d", len(items))
            results = [exc] * len(items)
        outcomes = [(item, None, result) if isinstance(result, BaseException) else (item, (row.copy(), result), None)
                    for item, row, result in zip(items, vectors, results)]
        self._deliver(outcomes, batch_size=len(items), encode_ms=encode_ms, started=started, taken=True)

    def _deliver(self, outcomes: list[tuple[_Pending, tuple[np.ndarray, Any] | None, BaseException | None]], *,
                 batch_size: int, encode_ms: float, started: float | None = None, taken: bool = False) -> None:
        """Hand a batch's outcomes (item, (vector, post-encode result) or None, error or None)
        to the event loop in one callback. Samples already handed on are skipped, unless
        ``taken`` (the caller handed them on to itself: the post-encode stage)."""
        settled = []
        for item, value, error in outcomes:
            if not taken and not item.hand_on():
                continue
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
