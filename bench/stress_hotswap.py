"""Stress run of the serving path: mixed queries at concurrency 32 while the index version
is republished (hot swapped) every 2 s. Loopback only, bounded in time.

Usage:
    python bench/stress_hotswap.py [--index ROOT] [--duration-s 60] [--swap-every-s 2]
        [--concurrency 32] [--products 300] [--data FASHION_DIR]

Without ``--index`` it builds a small real index first (a tiny random model from
``tests/tiny_models.py`` over the first ``--products`` products of the fashion catalogue,
image view, the real indexer job) in a temporary folder. With ``--index`` it works on a
copy of ROOT (ROOT itself is never written). It starts ``ecsearch serve`` on a free
loopback port as a separate process, keeps ``--concurrency`` Search requests outstanding
(text, image, text+image and filtered queries in turn, from the catalogue), and every
``--swap-every-s`` publishes a new version (a copy of the current one under a new name,
through ``indexer.publish.publish_version``, keeping the last 3). Prints the requests
served, the failed ones (must be 0), the swaps the server made, the server process's open
file descriptors (and those on ``metadata.lmdb`` files) at the start and at the end, and
the machine line (``engine.cpu_features.describe_cpu()``). Exit status 1 when a request
failed or the descriptors grew.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_grpc import DEFAULT_DATA, make_queries  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KINDS = ("text", "image", "text+image", "filtered")


def build_small_index(work: Path, data: Path, products: int) -> Path:
    """A tiny random model (shared fusion) and a published index version over the first
    ``products`` products (image view, IVF-Flat); returns the index root."""
    from engine.model.model_folder import save_model
    from indexer.encode import EncodeOptions
    from indexer.pipeline import IndexJobConfig, run_index_job
    from indexer.version import VersionOptions
    from tests.tiny_models import make_tiny_model

    model_dir = work / "model"
    save_model(make_tiny_model(work / "backbones", seed=3, share_fusion=True), model_dir)
    root = work / "index"
    config = IndexJobConfig(catalog=data, model_dir=model_dir, index_root=root, limit=products, keep_versions=3,
                            device="cpu", encode=EncodeOptions(view="image", batch_size=64, workers=0),
                            version=VersionOptions(factory="IVF,Flat", recall_queries=50))
    run_index_job(config, log=lambda _line: None)
    return root


def republish(root: Path) -> str:
    """Publish a copy of the current version under a new name; keep the last 3."""
    from indexer.publish import new_version_id, prune_versions, publish_version, read_current, tmp_dir

    current = root / "versions" / read_current(root)
    version = new_version_id()
    staged = tmp_dir(root) / f"stage-{version}"
    shutil.copytree(current, staged)
    manifest = json.loads((staged / "manifest.json").read_text(encoding="utf-8"))
    manifest["version"] = version
    (staged / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    publish_version(root, staged, version)
    prune_versions(root, keep_last=3)
    return version


def open_fds(pid: int) -> tuple[int, int]:
    """(all open descriptors, those on a metadata.lmdb file) of process ``pid``."""
    total = lmdb = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        total += 1
        lmdb += target.endswith("metadata.lmdb") or target.endswith("metadata.lmdb (deleted)")
    return total, lmdb


def start_server(root: Path, log_file: Path) -> tuple[subprocess.Popen, str]:
    """``ecsearch serve`` on a free loopback port (log to ``log_file``); (process, target) once SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    cmd = [sys.executable, "-m", "engine.cli", "serve", "--index-root", str(root), "--host", "127.0.0.1",
           "--port", "0", "--poll-interval-s", "0.2"]
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=open(log_file, "w"), env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + 300
    target = None
    while target is None:
        match = re.search(r"ecsearch serve: listening on [^ ]+:(\d+)", log_file.read_text())
        target = f"127.0.0.1:{match.group(1)}" if match else None
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server did not start:\n{log_file.read_text()}")
        time.sleep(0.1)
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status != health_pb2.HealthCheckResponse.SERVING:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server never became SERVING:\n{log_file.read_text()}")
            time.sleep(0.2)
    return proc, target


async def load(target: str, queries: dict[str, list], concurrency: int, duration_s: float, swap_every_s: float,
               root: Path) -> tuple[Counter, Counter, int]:
    """Requests by kind, failures by status code, versions published."""
    import grpc

    from server.gen.ecsearch.v1 import search_pb2_grpc

    served, failed = Counter(), Counter()
    end = time.monotonic() + duration_s
    counter = iter(range(10**9))
    async with grpc.aio.insecure_channel(target) as channel:
        stub = search_pb2_grpc.SearchServiceStub(channel)

        async def worker() -> None:
            while time.monotonic() < end:
                n = next(counter)
                kind = KINDS[n % len(KINDS)]
                pool = queries[kind]
                try:
                    await stub.Search(pool[n // len(KINDS) % len(pool)], timeout=30)
                    served[kind] += 1
                except grpc.aio.AioRpcError as exc:
                    failed[exc.code().name] += 1

        async def swapper() -> int:
            swaps = 0
            while time.monotonic() + swap_every_s < end:
                await asyncio.sleep(swap_every_s)
                await asyncio.to_thread(republish, root)
                swaps += 1
            return swaps

        *_, swaps = await asyncio.gather(*(worker() for _ in range(concurrency)), swapper())
    return served, failed, swaps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=Path, default=None, help="index ROOT to copy (default: build a small one)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--products", type=int, default=300, help="products in the small index built without --index")
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--swap-every-s", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    if not 1 <= args.duration_s <= 600 or args.swap_every_s <= 0 or not 1 <= args.concurrency <= 256:
        parser.error("--duration-s must be in [1, 600], --swap-every-s > 0, --concurrency in [1, 256]")

    from engine.cpu_features import describe_cpu

    with tempfile.TemporaryDirectory(prefix="stress-hotswap-") as tmp:
        work = Path(tmp)
        t0 = time.monotonic()
        if args.index is None:
            root = build_small_index(work, args.data, args.products)
        else:
            root = shutil.copytree(args.index, work / "index", ignore=shutil.ignore_patterns("tmp", ".build.lock"))
        print(f"index:    {root} (ready in {time.monotonic() - t0:.1f} s)")
        queries = make_queries(args.data, 64)
        proc, target = start_server(root, work / "server.log")
        try:
            asyncio.run(load(target, queries, args.concurrency, 3.0, 1e9, root))  # warm-up, no swap
            fds_start, lmdb_start = open_fds(proc.pid)
            served, failed, swaps = asyncio.run(load(target, queries, args.concurrency, args.duration_s,
                                                     args.swap_every_s, root))
            time.sleep(2.0)  # the last swap's old version closes when its leases are returned
            fds_end, lmdb_end = open_fds(proc.pid)
        finally:
            proc.terminate()
            status = proc.wait(30)
        swapped = len(re.findall(r"swapped index version", (work / "server.log").read_text()))
    total = sum(served.values())
    print(f"server:   {target}, exit status {status} after SIGTERM")
    print(f"load:     {args.duration_s:.0f} s at concurrency {args.concurrency}, a republish every "
          f"{args.swap_every_s:g} s: {swaps} published, {swapped} hot swaps made by the server")
    print(f"requests: {total + sum(failed.values())} ({', '.join(f'{k} {served[k]}' for k in KINDS)})")
    print(f"failed:   {sum(failed.values())}" + (f" ({dict(failed)})" if failed else ""))
    print(f"open fds of the server: start {fds_start} (metadata.lmdb {lmdb_start}), "
          f"end {fds_end} (metadata.lmdb {lmdb_end})")
    print(f"machine:  {describe_cpu()}")
    return 1 if failed or fds_end > fds_start or status != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
