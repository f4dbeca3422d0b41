"""The gRPC transport floor: what a Search round trip costs on this machine with no search behind it.

Usage:
    python bench/grpc_floor.py [--concurrency 1 8] [--requests 4000] [--hits 10]

Starts, as a separate process, a bare ``grpc.aio`` server with ecsearch's ``SearchService`` stub
whose ``Search`` answers every request with one prebuilt ``SearchResponse``: ``--hits`` hits
carrying the metadata maps a served hit carries for real catalogue products, so the
response is as large as a served one. It then loads that server with ``bench/bench_grpc.py``'s
client (``run_level``: the same real text requests, the same ``grpc.aio`` channel, C requests
outstanding) and prints the machine, p50 / p95 / p99 latency, QPS and the CPU per request of the
client and the server, with the Little's-law floor those CPU figures set on this many cores.

Read it beside ``bench/bench_grpc.py``'s text rows: what the served figure adds over this one is
the query tower, faiss, and the service code between them (docs/serving.md, "what the text@8
floor is made of"). Our choice; no target of its own.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import select
import socket
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_grpc import DEFAULT_DATA, make_queries, report_cpu, run_level  # noqa: E402
from bench.machine import describe_machine  # noqa: E402


def prebuilt_response(data: Path, hits: int):
    """A ``SearchResponse`` of ``hits`` hits: the first catalogue products, each with the metadata
    map a served hit carries (the indexer's ``product_record``, flattened by the server's
    ``flatten_record``), and every stage timing set. Raises ValueError when the catalogue has
    fewer products than ``hits``."""
    from engine.catalog import read_catalog
    from indexer.pipeline import product_record
    from server.filters import flatten_record
    from server.gen.ecsearch.v1 import search_pb2

    products = read_catalog(data, limit=hits).products
    if len(products) < hits:
        raise ValueError(f"{data} has {len(products)} products, fewer than --hits {hits}")
    response = search_pb2.SearchResponse(index_version="floor", encode_batch_size=1,
                                         retrieval=search_pb2.RETRIEVAL_DENSE)
    for rank, product in enumerate(products, start=1):
        hit = response.hits.add(product_id=product.product_id, score=1.0 / rank, rank=rank)
        hit.metadata.update(flatten_record(product_record(product, [], {})))
    response.timings.CopyFrom(search_pb2.StageTimings(encode_ms=1.0, search_ms=1.0, metadata_ms=0.1, total_ms=2.1))
    return response


async def serve(port: int, data: Path, hits: int) -> None:
    """Run the bare server on 127.0.0.1:``port`` until killed; prints ``listening`` once up."""
    import grpc

    from server.gen.ecsearch.v1 import search_pb2_grpc

    response = prebuilt_response(data, hits)

    class Bare(search_pb2_grpc.SearchServiceServicer):
        async def Search(self, request, context):  # noqa: N802 (gRPC method name)
            return response

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    search_pb2_grpc.add_SearchServiceServicer_to_server(Bare(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def start_bare_server(data: Path, hits: int, timeout_s: float = 60.0) -> tuple[subprocess.Popen, str]:
    """This script in ``--serve`` mode on a free loopback port; returns (process, target) once
    it listens. Raises SystemExit when it exits or stays silent for ``timeout_s`` first."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--data", str(data), "--hits", str(hits)],
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("listening"):
        proc.kill()
        raise SystemExit(f"the bare server did not start within {timeout_s:.0f} s (exit {proc.wait()}): {line!r}")
    return proc, f"127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests", type=int, default=4000, help="completed requests per concurrency")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--hits", type=int, default=10, help="hits in the prebuilt response (top_k of a served one)")
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)  # internal: the server process
    args = parser.parse_args()
    if args.hits < 1 or args.requests < 1 or min(args.concurrency) < 1:
        parser.error("--hits, --requests and --concurrency must be >= 1")
    if args.serve is not None:
        asyncio.run(serve(args.serve, args.data, args.hits))
        return

    queries = make_queries(args.data, 64)["text"]
    proc, target = start_bare_server(args.data, args.hits)
    results = []
    try:
        print(f"machine: {describe_machine()}")
        print(f"server:  bare grpc.aio SearchService at {target}, one prebuilt response of {args.hits} hits")
        print("| kind | conc | QPS | p50 ms | p95 ms | p99 ms | errors |")
        print("|---|---|---|---|---|---|---|")
        for concurrency in args.concurrency:
            stats = asyncio.run(run_level(target, queries, concurrency, args.requests, args.warmup, proc.pid))
            results.append({"kind": "floor", "concurrency": concurrency, **stats})
            print(f"| floor | {concurrency} | {stats['qps']:.1f} | {stats['p50_ms']:.1f} | {stats['p95_ms']:.1f} "
                  f"| {stats['p99_ms']:.1f} | {stats['errors'] or 0} |", flush=True)
    finally:
        proc.kill()
        proc.wait(60)
    report_cpu(results)


if __name__ == "__main__":
    main()
