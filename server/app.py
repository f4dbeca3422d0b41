"""Server assembly: config, model + index loading, grpc.aio server, health, reflection, TLS,
metrics endpoint, hot-swap watcher and graceful shutdown.

Life cycle of ``SearchServer``:

1. ``start()`` binds the port (loopback by default) and starts serving at once with health
   ``NOT_SERVING``; Search answers UNAVAILABLE until an index version is loaded.
2. In the background it waits for ``ROOT/CURRENT``, opens that index version, loads the
   model folder (``--model``, else the one the manifest records), and refuses to go on
   (``fatal``; ``run_until_signal`` returns 2) when the model is missing or its fingerprint
   differs from the manifest's. Then health turns ``SERVING`` and the watcher polls
   ``CURRENT`` for hot swaps (a refused new version is logged; the old one keeps serving).
3. SIGTERM / SIGINT: health ``NOT_SERVING``, no new RPCs, in-flight RPCs finish (up to
   ``grace_s``), index closed; ``run_until_signal`` returns 0.

Threads are bounded so the tower, faiss/OpenMP and the pools do not oversubscribe the
cores: one tower thread with ``torch_threads`` intra-op threads, ``search_workers`` search
threads with ``faiss_threads`` OpenMP threads each, ``decode_workers`` decode threads.
Source: our choice, after the grpc Python aio examples.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.cpu_features import CpuFeatureError
from engine.model.images import DEFAULT_MAX_IMAGE_PIXELS
from engine.retrieval.instance_first import INSTANCE_FIRST
from server.admin import admin_problem, read_token, start_admin_server
from server.batching import BatchConfig, MicroBatcher
from server.gen.ecsearch.v1 import search_pb2, search_pb2_grpc
from server.index_holder import IndexHolder, IndexWatcher, ServedVersion
from server.prometheus_metrics import ServerMetrics
from server.search_stage import search_batch
from server.service import SearchService
from server.tombstones import TombstoneError, TombstoneStore
from server.tower_backend import (BackendError, TowerPlan, index_queries, onnx_cache_for, plan_tower,
                                  prepare_query_tower)
from server.version_loader import open_served_version

log = logging.getLogger(__name__)

# Query images more elongated than this are rejected: preprocessing scales the shorter side
# up to the crop size, so a 1 x 40,000 image would become 224 x 8,960,000 pixels. Our choice.
MAX_ASPECT_RATIO = 50
SERVICE_NAME = search_pb2.DESCRIPTOR.services_by_name["SearchService"].full_name


class StartupError(RuntimeError):
    """The server refuses to start (bad options, missing model, fingerprint mismatch)."""


@dataclass
class ServerConfig:
    """``ecsearch serve`` options (units in the names; defaults are our choice)."""

    index_root: Path
    model_dir: Path | None = None          # None: the model folder the manifest records
    host: str = "127.0.0.1"                # loopback unless told otherwise
    port: int = 50051                      # 0: any free port (see SearchServer.port)
    max_batch_size: int = 32
    max_wait_ms: float = 0.0               # 0: greedy batching (see server.batching)
    max_image_batch_size: int = 8          # queries with an image per tower call
    graphs: bool = True                    # False: queries in Python (--no-graphs)
    backend: str = "auto"                  # query tower graphs: auto | torchscript | onnxruntime | onnxruntime-int8
    max_receive_bytes: int = 8 * 1024 * 1024
    max_concurrent_rpcs: int = 256         # beyond: RESOURCE_EXHAUSTED (bounds queued image bytes)
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    torch_threads: int | None = None       # None: cores - 1 (at least 1), one core left for I/O
    precision: str = "auto"                # query tower: fp32 | bf16 | auto (server.tower_backend: per CPU ISA)
    onnx_cache: str = "auto"               # folder of exported ONNX graphs | auto | none (server.tower_backend)
    faiss_threads: int = 1
    search_workers: int = 2
    decode_workers: int = 2
    poll_interval_s: float = 1.0
    grace_s: float = 10.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    admin_port: int | None = None          # None: no admin API (live deletes, server.admin)
    admin_host: str = "127.0.0.1"          # non-loopback only with TLS + admin_token_file
    admin_token_file: Path | None = None   # file holding the admin bearer token
    photo_instance_first: int = INSTANCE_FIRST  # photo queries: whole-vector hits first (0: one stage)
    plan: TowerPlan = field(init=False)    # resolved precision x backend (server.tower_backend)

    def __post_init__(self) -> None:
        checks = [(0 <= self.port <= 65535, f"port must be in [0, 65535], got {self.port}"),
                  (min(self.max_batch_size, self.max_image_batch_size) >= 1, "max batch sizes must be >= 1"),
                  (self.max_wait_ms >= 0, f"max wait must be >= 0 ms, got {self.max_wait_ms}"),
                  (self.max_receive_bytes >= 1024,
                   f"max receive size must be >= 1024 bytes, got {self.max_receive_bytes}"),
                  (self.max_concurrent_rpcs >= 1, f"max concurrent RPCs must be >= 1, got {self.max_concurrent_rpcs}"),
                  (self.max_image_pixels >= 1, f"max image pixels must be >= 1, got {self.max_image_pixels}"),
                  (self.photo_instance_first >= 0,
                   f"photo instance-first hits must be >= 0, got {self.photo_instance_first}"),
                  (self.torch_threads is None or self.torch_threads >= 1, "torch threads must be >= 1"),
                  (min(self.faiss_threads, self.search_workers, self.decode_workers) >= 1,
                   "faiss threads, search workers and decode workers must be >= 1"),
                  (self.poll_interval_s > 0, f"poll interval must be > 0 s, got {self.poll_interval_s}"),
                  (self.grace_s >= 0, f"grace must be >= 0 s, got {self.grace_s}"),
                  ((self.tls_cert is None) == (self.tls_key is None), "give both --tls-cert and --tls-key, or neither")]
        admin = admin_problem(self.admin_host, self.admin_port, self.tls_cert is not None, self.admin_token_file)
        checks.append((admin is None, admin))
        for ok, message in checks:
            if not ok:
                raise StartupError(message)
        try:
            self.plan = plan_tower(self.precision, self.backend, self.graphs)
        except (BackendError, CpuFeatureError) as exc:
            raise StartupError(str(exc)) from exc


class SearchServer:
    """One gRPC query server. Use inside a running event loop: ``await start()``, ``await stop()``."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.precision = config.plan.precision
        self.metrics = ServerMetrics()
        self.holder = IndexHolder()
        try:
            self.tombstones = TombstoneStore(Path(config.index_root))  # live deletes, kept across restarts
        except TombstoneError as exc:
            raise StartupError(str(exc)) from exc
        self.admin_port: int | None = None
        self._admin: grpc.aio.Server | None = None
        self.model: Any = None
        self.port: int | None = None
        self.fatal: BaseException | None = None
        self._stopped = asyncio.Event()
        self._fatal_event = asyncio.Event()
        # OpenMP's thread count is per thread: each search thread sets its own, or faiss runs
        # cores-many OpenMP threads there whatever --faiss-threads says (docs/serving.md)
        self._search_pool = ThreadPoolExecutor(config.search_workers, thread_name_prefix="search",
                                               initializer=_faiss_threads, initargs=(config.faiss_threads,))
        self._decode_pool = ThreadPoolExecutor(config.decode_workers, thread_name_prefix="decode")
        self._io_pool = ThreadPoolExecutor(1, thread_name_prefix="index-load")
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._batcher = MicroBatcher(self._encode,
                                     BatchConfig(config.max_batch_size, config.max_wait_ms,
                                                 config.max_image_batch_size),
                                     on_batch=self.metrics.observe_batch,
                                     post_encode_fn=search_batch, post_encode_executor=self._search_pool)
        self._watcher = IndexWatcher(Path(config.index_root), self.holder, self._load_version,
                                     config.poll_interval_s, self._io_pool, on_swap=self._on_swap)
        self._loader: asyncio.Task | None = None
        self._restore_threads: Callable[[], None] | None = None

    # ------------------------------------------------------------------ start
    async def start(self) -> int:
        """Bind and start serving (health NOT_SERVING); returns the bound port."""
        self._restore_threads = _bound_threads(self.config)
        options = [("grpc.max_receive_message_length", self.config.max_receive_bytes),
                   ("grpc.max_send_message_length", 64 * 1024 * 1024),
                   ("grpc.so_reuseport", 0)]
        self._server = grpc.aio.server(options=options, maximum_concurrent_rpcs=self.config.max_concurrent_rpcs)
        service = SearchService(self.holder, self._batcher, decode_image=self._decode_image,
                                pretokenize=self._pretokenize,
                                decode_executor=self._decode_pool, search_executor=self._search_pool,
                                metrics=self.metrics, photo_instance_first=self.config.photo_instance_first)
        search_pb2_grpc.add_SearchServiceServicer_to_server(service, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self._server)
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{_host_for_address(self.config.host)}:{self.config.port}"
        creds = None
        if self.config.tls_cert is not None:
            try:
                creds = grpc.ssl_server_credentials(
                    [(Path(self.config.tls_key).read_bytes(), Path(self.config.tls_cert).read_bytes())])
            except OSError as exc:
                raise StartupError(f"cannot read TLS key / certificate: {exc}") from exc
            self.port = self._server.add_secure_port(address, creds)
        else:
            self.port = self._server.add_insecure_port(address)
        if not self.port:
            raise StartupError(f"cannot bind {address}")
        if self.config.metrics_port is not None:
            self.metrics.start_http(self.config.metrics_port, self.config.metrics_host)
        log.info("query tower plan: %s (--precision %s --backend %s%s)", self.config.plan.describe(),
                 self.config.precision, self.config.backend, "" if self.config.graphs else " --no-graphs")
        self._batcher.start()
        await self._server.start()
        await self._start_admin(creds)
        log.info("gRPC on %s:%d (%s); waiting for %s/CURRENT", _host_for_address(self.config.host), self.port,
                 "TLS" if self.config.tls_cert else "plaintext", self.config.index_root)
        self._loader = asyncio.get_running_loop().create_task(self._load_first(), name="first-load")
        return self.port

    async def _start_admin(self, creds: grpc.ServerCredentials | None) -> None:
        """The admin API (live deletes) on its own port, when configured (``server.admin``)."""
        if self.config.admin_port is None:
            return
        try:
            token = read_token(self.config.admin_token_file)
            self._admin, self.admin_port = await start_admin_server(
                self.holder, self.tombstones, self.config.admin_host, self.config.admin_port, token, creds)
        except (ValueError, RuntimeError) as exc:
            raise StartupError(str(exc)) from exc

    async def _load_first(self) -> None:
        try:
            while not await self._watcher.check_once():
                await asyncio.sleep(self.config.poll_interval_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.fatal = exc
            log.error("refusing to start: %s", exc)
            self._fatal_event.set()
            return
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._watcher.start()

    async def wait_serving(self, timeout_s: float = 60.0) -> None:
        """Wait until the first index version is served; raises ``fatal`` or TimeoutError."""
        async def _wait() -> None:
            while self.holder.current is None:
                if self.fatal is not None:
                    raise self.fatal
                await asyncio.sleep(0.02)
        await asyncio.wait_for(_wait(), timeout_s)

    # ----------------------------------------------------------------- loading
    def _load_version(self, root: Path) -> ServedVersion:
        """Open ROOT/CURRENT's version and check it against the model (runs in a thread)."""
        if self.model is None:
            # fp32 weights: ONNX Runtime graphs are exported from them, then the tower is cast
            served, model = open_served_version(root, model_dir=self.config.model_dir, precision="fp32")
            threads = self.config.torch_threads or default_torch_threads()
            cache = onnx_cache_for(model, self.config.onnx_cache)
            queries = index_queries(served.index) if "onnxruntime-int8" in self.config.plan.backends.values() else None
            log.info("query tower backend: %s", prepare_query_tower(model, self.config.plan, threads, cache, queries))
            self.model = model
        else:
            served, _ = open_served_version(root, model=self.model)
        try:
            self.tombstones.apply(served.index)  # live deletes still in force hide in this version too
        except TombstoneError:
            served.index.close()
            raise
        return served

    def _on_swap(self, served: ServedVersion) -> None:
        self.metrics.set_index_version(served.version)

    def _encode(self, texts, images):
        return self.model.query_tower.encode(texts, images, max_pixels=self.config.max_image_pixels,
                                             precision=self.precision)

    def _pretokenize(self, text: str):
        """Query text → the text backbone's ``TextTokens`` (or the text, for a backbone
        without ``pretokenize``); runs on the event loop, ~0.05 ms."""
        pretokenize = getattr(self.model.backbones.text, "pretokenize", None)
        return text if pretokenize is None else pretokenize(text)

    def _decode_image(self, data: bytes):
        """Image bytes → preprocessed tensor (decode thread). Raises ImageDecodeError /
        ImageTooLargeError (pixel count, or an aspect ratio whose resize would explode)."""
        from engine.model.errors import ImageTooLargeError
        from engine.model.images import load_image

        image = load_image(data, index=0, max_pixels=self.config.max_image_pixels)
        width, height = image.size
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise ImageTooLargeError(
                f"image is {width}x{height}, an aspect ratio over {MAX_ASPECT_RATIO}:1 "
                "(resizing its shorter side would allocate a huge image)", 0)
        return self.model.backbones.image.preprocess(image)

    # ------------------------------------------------------------------- stop
    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, refuse new RPCs, finish in-flight ones, close the index."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace_s = self.config.grace_s if grace_s is None else grace_s
        await self._health.enter_graceful_shutdown()
        if self._loader is not None:
            self._loader.cancel()
        await self._watcher.stop()
        if self._admin is not None:
            await self._admin.stop(grace_s)
        if self._server is not None:
            await self._server.stop(grace_s)
        await self._batcher.close()
        self.holder.close()
        self._search_pool.shutdown(wait=True)  # its queued jobs settle requests and leases: let them run
        for pool in (self._decode_pool, self._io_pool):
            pool.shutdown(wait=True, cancel_futures=True)
        if self._restore_threads is not None:
            self._restore_threads()
        log.info("stopped")

    async def run_until_signal(self) -> int:
        """Serve until SIGTERM / SIGINT (exit status 0) or a start-up failure (2)."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._fatal_event.wait())]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
        if stop.is_set():
            log.info("signal received: shutting down (grace %.1f s)", self.config.grace_s)
        await self.stop()
        return 2 if self.fatal is not None and not stop.is_set() else 0


def _bound_threads(config: ServerConfig) -> Callable[[], None]:
    """Set the process-wide faiss (OpenMP) and torch thread counts; returns a function that
    restores the previous ones (several servers / tests may share a process)."""
    import faiss
    import torch

    before = (faiss.omp_get_max_threads(), torch.get_num_threads())
    faiss.omp_set_num_threads(config.faiss_threads)
    torch.set_num_threads(config.torch_threads or default_torch_threads())

    def restore() -> None:
        faiss.omp_set_num_threads(before[0])
        torch.set_num_threads(before[1])
    return restore


def _faiss_threads(n: int) -> None:
    """Set the calling thread's faiss (OpenMP) thread count."""
    import faiss

    faiss.omp_set_num_threads(n)


def default_torch_threads() -> int:
    """Intra-op threads of the tower: all cores but one (at least 1), so the event loop,
    gRPC, decode and search threads keep a core. Our choice; measured with
    bench/bench_grpc.py on 2 cores (1 thread beat 2 under load)."""
    return max(1, (os.cpu_count() or 1) - 1)


def _host_for_address(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


async def serve(config: ServerConfig) -> int:
    """Run a server until a signal; returns the process exit status."""
    server = SearchServer(config)
    await server.start()
    return await server.run_until_signal()
