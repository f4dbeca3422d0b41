"""Hot swap: a new index version published under a loaded server, during 200+ requests."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc

from server.client import SearchClient
from server.gen.ecsearch.v1 import search_pb2
from tests.test_server_support import (build_version, copy_root, index_root, server_model,  # noqa: F401
                                       start_server, subset)

IN_FLIGHT = 32           # requests kept outstanding at all times
BEFORE, AFTER = 120, 120  # requests completed before publishing / submitted after the swap


class LoadGenerator:
    """Keeps ``IN_FLIGHT`` Search requests outstanding until stopped; records every outcome
    as ``(submitted_s, done_s, index_version or None, status code)``."""

    def __init__(self, stub, requests):
        self.stub = stub
        self.requests = requests
        self.results: list[tuple[float, float, str | None, grpc.StatusCode]] = []
        self._slots = threading.Semaphore(IN_FLIGHT)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "LoadGenerator":
        self._thread.start()
        return self

    def completed(self) -> int:
        with self._lock:
            return len(self.results)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
        for _ in range(IN_FLIGHT):  # wait for the outstanding ones
            assert self._slots.acquire(timeout=60)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            if not self._slots.acquire(timeout=0.1):
                continue
            submitted = time.monotonic()
            future = self.stub.Search.future(self.requests[n % len(self.requests)], timeout=60)
            future.add_done_callback(lambda f, s=submitted: self._done(f, s))
            n += 1

    def _done(self, future, submitted: float) -> None:
        code = future.code()
        version = future.result().index_version if code == grpc.StatusCode.OK else None
        with self._lock:
            self.results.append((submitted, time.monotonic(), version, code))
        self._slots.release()


def _wait(predicate, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_hot_swap_under_load_fails_no_request(tmp_path, index_root, server_model, subset):
    root = copy_root(index_root, tmp_path / "root")
    v1 = (root / "CURRENT").read_text().strip()
    server = start_server(root, poll_interval_s=0.05, max_wait_ms=2.0)
    try:
        server.wait_serving()
        old = server.server.holder.current
        assert old.version == v1
        photos = [Path(p.image).read_bytes() for p in subset.products[:8]]
        requests = [search_pb2.SearchRequest(text=f"casual shoes {n}", top_k=5) for n in range(8)]
        requests += [search_pb2.SearchRequest(image=photo, top_k=5) for photo in photos[:4]]
        requests += [search_pb2.SearchRequest(text="t-shirt", image=photo, top_k=5) for photo in photos[4:]]
        with SearchClient(server.target) as client:
            load = LoadGenerator(client.stub, requests).start()
            _wait(lambda: load.completed() >= BEFORE)
            # v2 indexes only the first 100 products, so its hits are recognisable
            v2 = build_version(root, server_model, subset, limit=100)
            _wait(lambda: server.server.holder.current.version == v2)
            swapped_s = time.monotonic()
            done_at_swap = load.completed()
            _wait(lambda: sum(1 for r in list(load.results) if r[0] > swapped_s) >= AFTER)
            load.stop()
            later = client.search(text="after the swap", top_k=100)
        results = load.results
        assert len(results) >= BEFORE + AFTER >= 200
        failed = [r for r in results if r[3] != grpc.StatusCode.OK]
        assert not failed, failed[:5]
        versions = {r[2] for r in results}
        assert versions == {v1, v2}
        # requests submitted after the swap was visible are all served by the new version ...
        assert {r[2] for r in results if r[0] > swapped_s} == {v2}
        # ... and requests in flight at the swap finished, successfully, on the old one
        assert any(r[2] == v1 and r[1] > swapped_s for r in results), "no request was in flight at the swap"
        assert done_at_swap < len(results)
        assert later.index_version == v2
        v2_ids = {p.product_id for p in subset.products[:100]}
        assert len(later.hits) == 100 and {h.product_id for h in later.hits} == v2_ids
        _wait(lambda: old.closed, 10)  # the old version is closed once its last lease is returned
        assert old.leases == 0
        # rollback: CURRENT names v1 again -> reopened and served
        (root / "CURRENT").write_text(v1 + "\n")
        _wait(lambda: server.server.holder.current.version == v1, 30)
        with SearchClient(server.target) as client:
            assert client.search(text="after the rollback").index_version == v1
    finally:
        server.stop()


def test_a_new_version_built_by_another_model_is_refused_and_the_old_one_keeps_serving(
        tmp_path, index_root, subset, tiny_model_dir, caplog):
    from tests.test_server_support import build_version as build

    root = copy_root(index_root, tmp_path / "root")
    v1 = (root / "CURRENT").read_text().strip()
    server = start_server(root, poll_interval_s=0.05)
    try:
        server.wait_serving()
        other = build(root, (None, tiny_model_dir), subset, limit=40)  # another model's item vectors
        assert (root / "CURRENT").read_text().strip() == other
        _wait(lambda: "not swapping" in caplog.text, 30)
        assert "differs" in caplog.text
        with SearchClient(server.target) as client:
            assert client.search(text="still serving", top_k=3).index_version == v1
        assert server.server.holder.current.version == v1
    finally:
        server.stop()
