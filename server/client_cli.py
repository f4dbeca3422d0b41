"""``ecsearch query``: send one query (or a product lookup) to a server and print a table.

    ecsearch query --target 127.0.0.1:50051 --text "black heels" --top-k 5 \\
        --filter gender=Women --filter articleType=Heels --filter articleType=Flats

Repeating ``--filter`` on one field makes an any-of filter; filters on different fields
are ANDed. Exit status: 0 on success, 1 when the server answers with an error status (its
code and detail are printed), 2 on bad options.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_COLUMNS = ("productDisplayName", "articleType", "gender", "baseColour")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="127.0.0.1:50051", help="server HOST:PORT")
    parser.add_argument("--text", default=None, help="query text")
    parser.add_argument("--image", type=Path, default=None, help="query image file")
    parser.add_argument("--top-k", type=int, default=None, help="hits wanted, 1..1000 (server default 10)")
    parser.add_argument("--filter", action="append", default=[], metavar="FIELD=VALUE",
                        help="metadata filter; repeat a field for any-of")
    parser.add_argument("--nprobe", type=int, default=None, help="IVF lists probed per shard")
    parser.add_argument("--retrieval", choices=["dense", "lexical", "hybrid"], default=None,
                        help="dense (server default), lexical (BM25, needs --text) or hybrid (RRF of both)")
    parser.add_argument("--product-id", action="append", default=[], metavar="ID",
                        help="look products up by id (GetProducts) instead of searching; repeatable")
    parser.add_argument("--columns", default=",".join(DEFAULT_COLUMNS),
                        help="metadata fields shown as columns, comma-separated")
    parser.add_argument("--json", action="store_true", help="print the response as JSON")
    parser.add_argument("--tls-ca", type=Path, default=None, help="CA certificate (PEM): connect with TLS")
    parser.add_argument("--tls-server-name", default=None, help="expected server certificate name")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="deadline in seconds")


def parse_filter_args(items: list[str]) -> dict[str, list[str]]:
    """``["gender=Women", "articleType=Heels", "articleType=Flats"]`` → field → values.

    Raises:
        ValueError: an item without ``=`` or with an empty field name.
    """
    filters: dict[str, list[str]] = {}
    for item in items:
        field, sep, value = item.partition("=")
        if not sep or not field.strip():
            raise ValueError(f"bad --filter {item!r}: expected FIELD=VALUE")
        filters.setdefault(field.strip(), []).append(value)
    return filters


def format_table(rows: list[list[str]], header: list[str], max_width: int = 48) -> str:
    """Left-aligned text table; cells longer than ``max_width`` are cut with an ellipsis."""
    cut = [[c if len(c) <= max_width else c[: max_width - 1] + "…" for c in row] for row in [header] + rows]
    widths = [max(len(row[i]) for row in cut) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in cut]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _columns(spec: str) -> list[str]:
    return [c.strip() for c in spec.split(",") if c.strip()]


def _cell(metadata, column: str) -> str:
    if column in metadata:
        return metadata[column]
    if column == "productDisplayName":  # other catalogues call it title
        return metadata.get("title", "")
    return ""


def run(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf import json_format

    from server.client import SearchClient

    try:
        filters = parse_filter_args(args.filter)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.product_id and args.text is None and args.image is None:
        print("error: give --text and/or --image (or --product-id)", file=sys.stderr)
        return 2
    if args.image is not None and not args.image.is_file():
        print(f"error: image file not found: {args.image}", file=sys.stderr)
        return 2
    columns = _columns(args.columns)
    with SearchClient(args.target, tls_ca=args.tls_ca, tls_server_name=args.tls_server_name,
                      timeout_s=args.timeout_s) as client:
        try:
            if args.product_id:
                response = client.get_products(args.product_id)
            else:
                response = client.search(text=args.text, image=args.image, top_k=args.top_k,
                                         filters=filters, nprobe=args.nprobe, retrieval=args.retrieval)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    if args.json:
        print(json_format.MessageToJson(response, preserving_proto_field_name=True))
        return 0
    if args.product_id:
        rows = [[p.product_id] + [_cell(p.metadata, c) for c in columns] for p in response.products]
        print(format_table(rows, ["product_id"] + columns))
        if response.missing_product_ids:
            print(f"not found: {', '.join(response.missing_product_ids)}")
        print(f"index version {response.index_version}")
        return 0
    rows = [[str(h.rank), f"{h.score:.4f}", h.product_id] + [_cell(h.metadata, c) for c in columns]
            for h in response.hits]
    print(format_table(rows, ["rank", "score", "product_id"] + columns))
    t = response.timings
    print(f"{len(response.hits)} hits from index version {response.index_version} in {t.total_ms:.1f} ms "
          f"(decode {t.decode_ms:.1f}, queue {t.queue_ms:.1f}, encode {t.encode_ms:.1f} "
          f"[batch of {response.encode_batch_size}], search {t.search_ms:.1f}, metadata {t.metadata_ms:.1f})")
    return 0
