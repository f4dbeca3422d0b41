"""The index version being served, request leases on it, and the hot swap to a new one.

Every request takes a **lease** on the current version for its whole life (search and
metadata reads included, even work still running in a thread after the request was
cancelled). A swap only replaces the pointer to the current version; the old version is
closed when its last lease is returned, so in-flight requests finish on the version they
started on and responses carry that version. Source: our choice (reference counting, as in
read-copy-update).

Watching ``ROOT/CURRENT``: ``IndexWatcher`` polls the file's content; when it changes, the
new version is opened and checked (model fingerprint) off the event loop, then swapped in.
A version that fails to open or check is logged and tried again only after
``retry_interval_s`` (or at once when ``CURRENT`` changes), so a persistent refusal (e.g.
another model's vectors) does not flood the log and a transient one (e.g. a rollback to a
version still held open by in-flight requests) heals by itself.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from indexer.publish import read_current

log = logging.getLogger(__name__)


class NoIndexError(RuntimeError):
    """No index version is loaded (yet). Mapped to UNAVAILABLE."""


@dataclass(eq=False)
class ServedVersion:
    """An open index version plus what the server derives from it once.

    Attributes:
        index: the ``indexer.search.IndexVersion``.
        version: its version name (``index.version``).
        metadata_fields: field names that filters may use.
        cache: the version's ``server.filters.VersionCache`` (or None).
        instance: the query vectors' image-private columns
            (``engine.retrieval.instance_first.instance_columns``; None: photo queries in one stage).
    """

    index: Any
    version: str
    metadata_fields: frozenset[str]
    cache: Any = None
    instance: tuple[int, int] | None = None
    _leases: int = 0
    _retired: bool = False
    _closed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def acquire(self) -> None:
        with self._lock:
            if self._closed:
                raise NoIndexError(f"index version {self.version} is closed")
            self._leases += 1

    def release(self) -> None:
        """Return one lease; closes the index when retired and no lease is left.

        Raises:
            RuntimeError: no lease is held (a lease returned twice); the count is left at 0.
        """
        with self._lock:
            if self._leases <= 0:
                raise RuntimeError(f"index version {self.version}: lease released more often than acquired")
            self._leases -= 1
            close_now = self._retired and self._leases == 0 and not self._closed
            if close_now:
                self._closed = True
        if close_now:
            self._close_index()

    def retire(self) -> None:
        """Mark as no longer current; closes now if no lease is held, else at the last release."""
        with self._lock:
            self._retired = True
            close_now = self._leases == 0 and not self._closed
            if close_now:
                self._closed = True
        if close_now:
            self._close_index()

    @property
    def leases(self) -> int:
        return self._leases

    @property
    def closed(self) -> bool:
        return self._closed

    def _close_index(self) -> None:
        try:
            self.index.close()
            log.info("closed index version %s", self.version)
        except Exception:
            log.exception("closing index version %s failed", self.version)


class IndexHolder:
    """Holds the current ``ServedVersion``; thread-safe ``lease`` and ``swap``."""

    def __init__(self) -> None:
        self._current: ServedVersion | None = None
        self._lock = threading.Lock()

    @property
    def current(self) -> ServedVersion | None:
        return self._current

    def acquire(self) -> ServedVersion:
        """Take a lease on the current version; pair with ``ServedVersion.release()``.

        Raises:
            NoIndexError: no version is loaded.
        """
        with self._lock:
            served = self._current
            if served is None:
                raise NoIndexError("no index version is loaded yet")
            served.acquire()
            return served

    @contextlib.contextmanager
    def lease(self) -> Iterator[ServedVersion]:
        """``with holder.lease() as served:`` for synchronous callers."""
        served = self.acquire()
        try:
            yield served
        finally:
            served.release()

    def swap(self, new: ServedVersion) -> ServedVersion | None:
        """Make ``new`` current; retire and return the previous version (or None)."""
        with self._lock:
            old, self._current = self._current, new
        if old is not None:
            old.retire()
            log.info("swapped index version %s -> %s (%d in-flight on the old one)",
                     old.version, new.version, old.leases)
        else:
            log.info("serving index version %s", new.version)
        return old

    def close(self) -> None:
        """Retire the current version (closed once its leases are returned)."""
        with self._lock:
            old, self._current = self._current, None
        if old is not None:
            old.retire()


class IndexWatcher:
    """Polls ``ROOT/CURRENT`` and hot-swaps new versions into an ``IndexHolder``.

    ``load(root) -> ServedVersion`` opens and checks the version ``CURRENT`` names; it runs
    in ``executor`` (blocking I/O) and may raise to refuse a version.
    """

    def __init__(self, root: Path, holder: IndexHolder, load: Callable[[Path], ServedVersion],
                 poll_interval_s: float = 1.0, executor=None,
                 on_swap: Callable[[ServedVersion], None] | None = None, retry_interval_s: float = 30.0):
        self.root = Path(root)
        self.holder = holder
        self._load = load
        self.poll_interval_s = poll_interval_s
        self._executor = executor
        self._on_swap = on_swap
        self.retry_interval_s = retry_interval_s
        self._seen: str | None = None  # CURRENT content last acted on (loaded or refused)
        self._retry_at: float | None = None  # monotonic time to retry a refused version
        self._task: asyncio.Task | None = None

    async def check_once(self) -> bool:
        """Load and swap in the version ``CURRENT`` names if it changed; True when swapped.

        Raises whatever ``load`` raises (the caller decides: fatal at start-up, logged later).
        """
        loop = asyncio.get_running_loop()
        current = await loop.run_in_executor(self._executor, read_current, self.root)
        if current is None:
            return False
        if current == self._seen and (self._retry_at is None or time.monotonic() < self._retry_at):
            return False
        self._seen, self._retry_at = current, None
        now = self.holder.current
        if now is not None and now.version == current:  # CURRENT rewritten with the same name
            return False
        try:
            served = await loop.run_in_executor(self._executor, self._load, self.root)
        except Exception:
            self._retry_at = time.monotonic() + self.retry_interval_s
            raise
        if now is not None and now.version == served.version:
            served.retire()
            return False
        self.holder.swap(served)
        if self._on_swap is not None:
            self._on_swap(served)
        return True

    def start(self) -> None:
        """Start polling in the background on the running loop."""
        self._task = asyncio.get_running_loop().create_task(self._poll(), name="index-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.check_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("not swapping to the index version in %s/CURRENT (%s): %s",
                          self.root, self._seen, exc)
