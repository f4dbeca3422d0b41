"""Micro-batching of concurrent queries into one query tower call.

Requests submit one sample each (text and/or preprocessed image); a single asyncio task
collects up to ``max_batch_size`` pending samples, waiting at most ``max_wait_ms`` after the
first one, and runs one ``encode(texts, images) -> float32 (B, d)`` call in a dedicated
thread. While that call runs, new requests queue up and form the next batch, so under load
batches fill without waiting; hence the default ``max_wait_ms = 0`` ("greedy" batching: a
lone query is encoded at once, queries arriving during a tower call share the next one),
which measured best on 2 cores (bench/bench_grpc.py). Text-only samples and samples with
an image go in separate calls (the oldest pending sample decides which kind is next, so
neither starves), with their own size limits. Source: our choice (the usual dynamic
batching of inference servers).

Isolation: a bad sample never fails the others. When the encoder raises an ``InputError``
whose ``.index`` names a sample, that sample alone gets the error and the rest of the batch
is encoded again; any other exception makes the batch fall back to one call per sample, so
only the guilty sample fails.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from engine.errors import InputError

log = logging.getLogger(__name__)

EncodeFn = Callable[[Sequence[str | None], Sequence[Any | None]], np.ndarray]


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
    """One encoded sample: ``vector`` float32 (d,), time queued and encoding (ms), batch size."""

    vector: np.ndarray
    queue_ms: float
    encode_ms: float
    batch_size: int


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


class MicroBatcher:
    """Collects concurrent ``encode`` calls into batched calls of ``encode_fn``.

    ``encode_fn(texts, images)`` gets equal-length lists (elements may be None) and returns
    ``float32 (B, d)``; it runs in ``executor`` (use a single-thread executor so tower calls
    never overlap). Create, ``start()`` and ``close()`` inside one running event loop.
    """

    def __init__(self, encode_fn: EncodeFn, executor: Executor, config: BatchConfig = BatchConfig(),
                 on_batch: Callable[[int, float], None] | None = None):
        self._encode_fn = encode_fn
        self._executor = executor
        self.config = config
        self._on_batch = on_batch  # called with (batch size, encode seconds)
        self._pending: collections.deque[_Pending] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closed = False

    def start(self) -> None:
        """Start the batching task on the running loop."""
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def close(self) -> None:
        """Stop accepting samples, fail the queued ones, and stop the batching task."""
        self._closed = True
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done():
                item.future.set_exception(BatcherClosedError("server is shutting down"))
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def encode(self, text: str | None, image: Any | None,
                     deadline_s: float | None = None) -> EncodedQuery:
        """Encode one sample in the next batch.

        Args:
            text: query text or None.
            image: image as accepted by the encoder (e.g. a preprocessed tensor) or None.
            deadline_s: ``time.monotonic()`` time after which the sample is dropped unencoded.

        Raises:
            InputError: the encoder rejected this sample (``.index`` is reset to 0).
            BatchDeadlineError: the deadline passed before the sample was encoded.
            BatcherClosedError: the batcher is closed.
        """
        if self._closed or self._wakeup is None:
            raise BatcherClosedError("server is shutting down")
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(text, image, future, time.monotonic(), deadline_s))
        self._wakeup.set()
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        wait_s = self.config.max_wait_ms / 1e3
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            if wait_s > 0:
                until = loop.time() + wait_s
                while self._same_kind_pending() < self._limit_for(self._pending[0]):
                    remaining = until - loop.time()
                    if remaining <= 0:
                        break
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
                    except TimeoutError:
                        break
            batch = self._take_batch()
            try:
                await self._encode_batch(batch)
            except asyncio.CancelledError:
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(BatcherClosedError("server is shutting down"))
                raise
            except Exception as exc:  # never let the batching task die
                log.exception("micro-batch failed unexpectedly")
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)

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

    async def _encode_batch(self, batch: list[_Pending]) -> None:
        now = time.monotonic()
        live = []
        for item in batch:
            if item.future.done():  # caller cancelled (deadline, client gone)
                continue
            if item.deadline_s is not None and now >= item.deadline_s:
                item.future.set_exception(BatchDeadlineError("deadline passed while queued for the query tower"))
                continue
            live.append(item)
        loop = asyncio.get_running_loop()
        while live:
            started = time.monotonic()
            try:
                vectors = await loop.run_in_executor(
                    self._executor, self._encode_fn, [p.text for p in live], [p.image for p in live])
            except InputError as exc:
                if exc.index is None or not 0 <= exc.index < len(live):
                    await self._encode_one_by_one(live)
                    return
                bad = live.pop(exc.index)
                exc.index = 0  # the request's own view: it sent one sample
                if not bad.future.done():
                    bad.future.set_exception(exc)
                continue
            except Exception:
                if len(live) == 1:
                    raise
                log.warning("batch of %d failed; retrying sample by sample", len(live), exc_info=True)
                await self._encode_one_by_one(live)
                return
            self._deliver(live, vectors, started)
            return

    async def _encode_one_by_one(self, items: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        for item in items:
            if item.future.done():
                continue
            started = time.monotonic()
            try:
                vectors = await loop.run_in_executor(self._executor, self._encode_fn, [item.text], [item.image])
            except Exception as exc:
                if isinstance(exc, InputError):
                    exc.index = 0
                if not item.future.done():
                    item.future.set_exception(exc)
                continue
            self._deliver([item], vectors, started)

    def _deliver(self, items: list[_Pending], vectors: np.ndarray, started: float) -> None:
        finished = time.monotonic()
        encode_ms = (finished - started) * 1e3
        if self._on_batch is not None:
            self._on_batch(len(items), finished - started)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape[0] != len(items):
            raise RuntimeError(f"encoder returned {vectors.shape[0]} vectors for {len(items)} samples")
        for row, item in zip(vectors, items):
            if not item.future.done():
                item.future.set_result(EncodedQuery(
                    vector=row.copy(), queue_ms=(started - item.enqueued_s) * 1e3,
                    encode_ms=encode_ms, batch_size=len(items)))
