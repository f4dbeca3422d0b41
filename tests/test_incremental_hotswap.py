"""Hot swap to an incremental index version under load: no request fails."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from server.client import SearchClient
from server.gen.ecsearch.v1 import search_pb2
from tests.test_server_hotswap import AFTER, BEFORE, LoadGenerator, _wait
from tests.test_server_support import copy_root, index_root, server_model, start_server, subset  # noqa: F401

pytestmark = pytest.mark.isa
REPO = Path(__file__).resolve().parents[1]


def _changes(subset, path: Path) -> tuple[list[str], str]:
    """Delete two products, retitle one, add one (a copy of another's photo): returns
    (deleted ids, new id)."""
    deleted = [subset.products[3].product_id, subset.products[7].product_id]
    retitled, template = subset.products[10], subset.products[11]
    lines = [{"op": "delete", "product_id": pid} for pid in deleted]
    lines.append({"op": "upsert", "row": {"id": retitled.product_id, **retitled.attributes,
                                          "productDisplayName": "A new title for the swap"}})
    lines.append({"op": "upsert", "image": template.image,
                  "row": {"id": "990001", **template.attributes, "productDisplayName": "A new arrival"}})
    path.write_text("".join(json.dumps(c) + "\n" for c in lines), encoding="utf-8")
    return deleted, "990001"


def test_hot_swap_to_an_incremental_version_under_load_fails_no_request(tmp_path, index_root, subset):
    root = copy_root(index_root, tmp_path / "root")
    v1 = (root / "CURRENT").read_text().strip()
    deleted, new_id = _changes(subset, tmp_path / "changes.jsonl")
    server = start_server(root, poll_interval_s=0.05, max_wait_ms=2.0)
    try:
        server.wait_serving()
        photos = [Path(p.image).read_bytes() for p in subset.products[:8]]
        requests = [search_pb2.SearchRequest(text=f"casual shoes {n}", top_k=5) for n in range(8)]
        requests += [search_pb2.SearchRequest(image=photo, top_k=5) for photo in photos]
        with SearchClient(server.target) as client:
            load = LoadGenerator(client.stub, requests).start()
            _wait(lambda: load.completed() >= BEFORE)
            # the indexer runs in its own process, as in production (LMDB allows one open per process)
            build = subprocess.run(
                [sys.executable, "-m", "engine.cli", "index", "--index-root", str(root), "--base-version", "CURRENT",
                 "--changes", str(tmp_path / "changes.jsonl"), "--device", "cpu", "--batch-size", "8",
                 "--workers", "0"], env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                timeout=300)
            assert build.returncode == 0, build.stderr[-2000:]
            summary = json.loads(build.stdout)
            v2 = summary["version"]
            assert summary["incremental"]["base_version"] == v1
            _wait(lambda: server.server.holder.current.version == v2)
            swapped_s = time.monotonic()
            _wait(lambda: sum(1 for r in list(load.results) if r[0] > swapped_s) >= AFTER)
            load.stop()
            later = client.search(text="after the swap", top_k=200, nprobe=1024)  # every list: all products
            found = client.get_products([new_id, *deleted])
        results = load.results
        assert len(results) >= BEFORE + AFTER >= 200
        failed = [r for r in results if r[3] != grpc.StatusCode.OK]
        assert not failed, failed[:5]
        assert {r[2] for r in results} == {v1, v2}
        assert {r[2] for r in results if r[0] > swapped_s} == {v2}
        assert later.index_version == v2 and len(later.hits) == len(subset.products) - 2 + 1
        assert set(deleted).isdisjoint(h.product_id for h in later.hits)
        assert [p.product_id for p in found.products] == [new_id]
        assert sorted(found.missing_product_ids) == sorted(deleted)
    finally:
        server.stop()
