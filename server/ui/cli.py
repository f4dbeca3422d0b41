"""``ecsearch ui``: the search page in the browser, over a running gRPC server.

    ecsearch ui --target 127.0.0.1:50051 --catalog ../shared/data/fashion-products --port 8080

Listens on loopback unless ``--host`` says otherwise. Photos are served only from the
catalogue's image folder (``--catalog``; without it the grid shows no photos). Exit status:
0 after a clean stop (SIGINT / SIGTERM), 2 on bad options (catalogue missing, port taken).
"""
from __future__ import annotations

import argparse
import signal
import socket
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``ui`` options."""
    parser.add_argument("--target", default="127.0.0.1:50051", help="gRPC server HOST:PORT")
    parser.add_argument("--host", default="127.0.0.1", help="address the page listens on (default loopback)")
    parser.add_argument("--port", type=int, default=8080, help="HTTP port of the page (0: any free port)")
    parser.add_argument("--catalog", default=None,
                        help="catalogue folder or file; photos are served from its image folder only")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="deadline of each gRPC call in seconds")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one).

    Raises:
        OSError: the address is taken or not local.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def ui_server(app, sock: socket.socket):
    """A ``uvicorn.Server`` for ``app``; run it with ``server.run(sockets=[sock])``."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def run(args: argparse.Namespace) -> int:
    """Serve the page until SIGINT / SIGTERM; returns 0, or 2 on bad options."""
    from server.ui.app import create_app
    from server.ui.images import image_folder

    if not 0 <= args.port <= 65535 or args.timeout_s <= 0:
        print(f"ecsearch ui: error: --port must be 0..65535 and --timeout-s > 0 "
              f"(got {args.port}, {args.timeout_s})", file=sys.stderr)
        return 2
    try:
        images = image_folder(args.catalog)
        sock = bind_socket(args.host, args.port)
    except (FileNotFoundError, OSError) as exc:
        print(f"ecsearch ui: error: {exc}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    print(f"ecsearch ui: http://{url_host}:{port}/ (gRPC server {args.target}, photos from "
          f"{images if images is not None else 'nowhere: no --catalog'})", file=sys.stderr, flush=True)
    # uvicorn shuts down gracefully on SIGINT / SIGTERM, then raises the signal again under the
    # handlers found at start: no-op handlers make that a clean exit 0.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: None)
    ui_server(create_app(args.target, images, args.timeout_s), sock).run(sockets=[sock])
    return 0
