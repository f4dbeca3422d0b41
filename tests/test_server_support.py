"""Shared pieces of the server tests (no tests here): a real index over a fashion subset,
and a real gRPC server on a loopback port running in a background event-loop thread.

The index is built over the **image view** with a tiny random model whose query and item
towers share the fusion encoder (``share_fusion=True``): a catalogue photo sent as an image
query then goes through exactly the computation that produced its item vector, so "its
product at rank 1" is a property of the serving path (decode → preprocess → query tower →
search), not of model quality. With separate random fusion heads it would not hold.
"""
from __future__ import annotations

import asyncio
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

SUBSET_SIZE = 160


@dataclass
class Subset:
    """The first ``SUBSET_SIZE`` products of the fashion catalogue (``engine.catalog.Product``)."""

    fashion_dir: Path
    products: list

    def by_id(self, pid: str):
        return next(p for p in self.products if p.product_id == pid)


@pytest.fixture(scope="session")
def server_model(tiny_backbone_dir, tmp_path_factory):
    """``(model, model_dir)``: tiny random TwoTowerModel with shared fusion, saved as a folder."""
    from engine.model.model_folder import save_model
    from tests.tiny_models import make_tiny_model

    model = make_tiny_model(tiny_backbone_dir, seed=3, share_fusion=True)
    folder = tmp_path_factory.mktemp("server-model")
    save_model(model, folder)
    return model, folder


@pytest.fixture(scope="session")
def subset(fashion_dir) -> Subset:
    from engine.catalog import read_catalog

    products = read_catalog(fashion_dir, limit=SUBSET_SIZE).products
    assert len(products) == SUBSET_SIZE and all(p.image for p in products)
    return Subset(fashion_dir, products)


def build_version(root: Path, server_model, subset: Subset, limit: int = SUBSET_SIZE) -> str:
    """Build and publish an index version of the first ``limit`` products with the real
    indexer job (``ecsearch index``: IVF-Flat over the image view); returns its name."""
    from indexer.encode import EncodeOptions
    from indexer.pipeline import IndexJobConfig, run_index_job
    from indexer.version import VersionOptions

    _, model_dir = server_model
    config = IndexJobConfig(catalog=subset.fashion_dir, model_dir=model_dir, index_root=root, limit=limit,
                            keep_versions=5, device="cpu",
                            encode=EncodeOptions(view="image", batch_size=64, workers=0),
                            version=VersionOptions(factory="IVF,Flat", recall_queries=50))
    result = run_index_job(config, log=lambda _line: None)
    assert result.manifest["counts"]["indexed"] == limit
    return result.version


@pytest.fixture(scope="session")
def index_root(tmp_path_factory, server_model, subset) -> Path:
    """An index root with one published version over the whole subset (read-only for tests)."""
    root = tmp_path_factory.mktemp("index-root")
    build_version(root, server_model, subset)
    return root


def copy_root(source: Path, target: Path) -> Path:
    """A copy of an index root (versions + CURRENT), for tests that publish into it."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("tmp", ".build.lock"))
    return target


class ServerThread:
    """A ``SearchServer`` running in its own event loop on a background thread."""

    def __init__(self, config):
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)
        self.server = None
        self.port: int | None = None

    def call(self, coro, timeout_s: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def start(self) -> "ServerThread":
        from server.app import SearchServer

        self.thread.start()

        async def make():
            self.server = SearchServer(self.config)
            return await self.server.start()
        self.port = self.call(make())
        return self

    def wait_serving(self, timeout_s: float = 60.0) -> None:
        self.call(self.server.wait_serving(timeout_s), timeout_s + 5)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, grace_s: float = 5.0) -> None:
        try:
            self.call(self.server.stop(grace_s), grace_s + 30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def start_server(index_root: Path, **options) -> ServerThread:
    """Start a server on a free loopback port (``port=0``) over ``index_root``."""
    from server.app import ServerConfig

    config = ServerConfig(index_root=index_root, port=0, **options)
    return ServerThread(config).start()
