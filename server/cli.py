"""``ecsearch serve``: serve the current index version of an index root over gRPC.

Exit status: 0 after a graceful SIGTERM / SIGINT shutdown, 2 when the server refuses to
start (bad options, missing model folder, model fingerprint mismatch, port in use).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from engine.model.images import DEFAULT_MAX_IMAGE_PIXELS
from engine.retrieval.instance_first import INSTANCE_FIRST
from server.tower_backend import BACKEND_CHOICES, PRECISION_CHOICES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ecsearch serve`` (defaults: see ``server.app.ServerConfig``)."""
    parser.add_argument("--index-root", type=Path, required=True,
                        help="index root holding CURRENT and versions/ (written by `ecsearch index`)")
    parser.add_argument("--model", type=Path, default=None,
                        help="model folder of the query tower (default: the folder the manifest records); "
                             "its fingerprint must match the manifest's")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=50051, help="port (0: any free port)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="most text-only queries per query tower call")
    parser.add_argument("--max-image-batch-size", type=int, default=8,
                        help="most queries with an image per tower call")
    parser.add_argument("--no-graphs", dest="graphs", action="store_false",
                        help="encode queries in Python instead of through compiled graphs (--backend)")
    parser.add_argument("--backend", choices=BACKEND_CHOICES[:-1], default="auto",
                        help="query tower graphs: torchscript, onnxruntime (fp32), onnxruntime-int8 (fp32, int8 "
                             "text linears); auto: where the CPU runs bf16 natively, text through bf16 TorchScript "
                             "and images through fp32 ONNX Runtime, elsewhere all fp32 ONNX Runtime (default auto; "
                             "see docs/serving.md)")
    parser.add_argument("--max-wait-ms", type=float, default=0.0,
                        help="longest a query waits for others to share its tower call (default 0: only "
                             "queries that arrived while the tower was busy are batched)")
    parser.add_argument("--max-receive-bytes", type=int, default=8 * 1024 * 1024,
                        help="largest request accepted, in bytes (default 8 MiB)")
    parser.add_argument("--max-concurrent-rpcs", type=int, default=256,
                        help="RPCs handled at once; more get RESOURCE_EXHAUSTED (bounds memory)")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="largest query image, width*height (decompression-bomb guard)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="intra-op threads of the tower (default: cores - 1, at least 1)")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                        help="query tower precision; auto: bf16 where the CPU runs it natively, else fp32 "
                             "(default auto; the choice is logged at start-up)")
    parser.add_argument("--onnx-cache", default="auto", metavar="DIR",
                        help="folder that keeps the exported ONNX query tower graphs across starts; auto: "
                             "MODEL/../cache/onnx; none: export at every start (default auto)")
    parser.add_argument("--faiss-threads", type=int, default=1, help="OpenMP threads per faiss search")
    parser.add_argument("--photo-instance-first", type=int, default=INSTANCE_FIRST, metavar="N",
                        help="photo-only queries: the whole vector's N best products first, then products like the "
                             "photo by the vector without its image-private block (engine.retrieval.instance_first; "
                             "0: one stage; default %(default)s)")
    parser.add_argument("--search-workers", type=int, default=2, help="threads for faiss search + metadata reads")
    parser.add_argument("--decode-workers", type=int, default=2, help="threads for image decoding")
    parser.add_argument("--poll-interval-s", type=float, default=1.0, help="how often ROOT/CURRENT is checked")
    parser.add_argument("--grace-s", type=float, default=10.0, help="time in-flight requests get at shutdown")
    parser.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain (enables TLS)")
    parser.add_argument("--tls-key", type=Path, default=None, help="PEM private key (with --tls-cert)")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus metrics on http://METRICS_HOST:PORT/metrics")
    parser.add_argument("--metrics-host", default="127.0.0.1", help="bind address of the metrics endpoint")
    parser.add_argument("--admin-port", type=int, default=None,
                        help="serve the admin API (live deletes: ecsearch.v1.AdminService) on this port "
                             "(default: off)")
    parser.add_argument("--admin-host", default="127.0.0.1",
                        help="admin bind address (default loopback; any other needs TLS and --admin-token-file)")
    parser.add_argument("--admin-token-file", type=Path, default=None,
                        help="file holding the admin token; calls must send 'authorization: Bearer TOKEN'")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def run(args: argparse.Namespace) -> int:
    """Start the server and block until a signal; returns the exit status."""
    from server.app import SearchServer, ServerConfig, StartupError

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = ServerConfig(
            index_root=args.index_root, model_dir=args.model, host=args.host, port=args.port,
            max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
            max_image_batch_size=args.max_image_batch_size,
            graphs=args.graphs, backend=args.backend,
            max_receive_bytes=args.max_receive_bytes, max_concurrent_rpcs=args.max_concurrent_rpcs,
            max_image_pixels=args.max_image_pixels,
            torch_threads=args.torch_threads, precision=args.precision, onnx_cache=args.onnx_cache,
            faiss_threads=args.faiss_threads, photo_instance_first=args.photo_instance_first,
            search_workers=args.search_workers, decode_workers=args.decode_workers,
            poll_interval_s=args.poll_interval_s, grace_s=args.grace_s,
            tls_cert=args.tls_cert, tls_key=args.tls_key,
            metrics_port=args.metrics_port, metrics_host=args.metrics_host,
            admin_port=args.admin_port, admin_host=args.admin_host, admin_token_file=args.admin_token_file)
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from PIL import Image

    Image.MAX_IMAGE_PIXELS = config.max_image_pixels  # Pillow's own bomb guard, same limit, process-wide

    async def main() -> int:
        server = SearchServer(config)
        try:
            await server.start()
        except (StartupError, RuntimeError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            await server.stop(0)
            return 2
        print(f"ecsearch serve: listening on {config.host}:{server.port}", file=sys.stderr, flush=True)
        status = await server.run_until_signal()
        if server.fatal is not None and status != 0:
            print(f"error: refusing to start: {server.fatal}", file=sys.stderr)
        return status

    try:
        return asyncio.run(main())
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
