"""A small synchronous Python client of ``ecsearch.v1.SearchService``.

    with SearchClient("127.0.0.1:50051") as client:
        response = client.search(text="black heels", top_k=5, filters={"gender": ["Women"]})
        for hit in response.hits:
            print(hit.rank, hit.product_id, hit.score, hit.metadata["productDisplayName"])

Errors arrive as ``grpc.RpcError`` with ``.code()`` and ``.details()`` (see the proto for
which code means what). Source: our choice.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import grpc

from server.gen.ecsearch.v1 import search_pb2, search_pb2_grpc

FilterSpec = Mapping[str, str | Sequence[str]]
RETRIEVAL_MODES = {"dense": search_pb2.RETRIEVAL_DENSE, "lexical": search_pb2.RETRIEVAL_LEXICAL,
                   "hybrid": search_pb2.RETRIEVAL_HYBRID}


def build_search_request(text: str | None = None, image: bytes | str | Path | None = None,
                         top_k: int | None = None, filters: FilterSpec | None = None,
                         nprobe: int | None = None, retrieval: str | None = None) -> search_pb2.SearchRequest:
    """A ``SearchRequest``; ``image`` is encoded bytes or a file path; a filter value is one
    value (equality) or a sequence of values (any-of); ``retrieval`` "dense", "lexical" or
    "hybrid" (None: the server default, dense). Raises ValueError for another retrieval."""
    if isinstance(image, (str, Path)):
        image = Path(image).read_bytes()
    request = search_pb2.SearchRequest(text=text or "", image=image or b"")
    if top_k is not None:
        request.top_k = top_k
    if nprobe is not None:
        request.nprobe = nprobe
    if retrieval is not None:
        if retrieval not in RETRIEVAL_MODES:
            raise ValueError(f"retrieval must be one of {', '.join(RETRIEVAL_MODES)}, got {retrieval!r}")
        request.retrieval = RETRIEVAL_MODES[retrieval]
    for field, values in (filters or {}).items():
        values = [values] if isinstance(values, str) else list(values)
        request.filters.add(field=field, values=values)
    return request


class SearchClient:
    """Blocking client over one channel.

    Args:
        target: ``HOST:PORT``.
        tls_ca: PEM file of the CA that signed the server certificate (enables TLS), or None.
        tls_server_name: name to check the certificate against (default: the target host).
        timeout_s: deadline of each call in seconds.
        max_send_bytes: largest request sent (keep ≤ the server's max receive size).
    """

    def __init__(self, target: str, *, tls_ca: str | Path | None = None, tls_server_name: str | None = None,
                 timeout_s: float = 10.0, max_send_bytes: int = 64 * 1024 * 1024):
        options = [("grpc.max_send_message_length", max_send_bytes),
                   ("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        if tls_ca is not None:
            if tls_server_name:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            creds = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = search_pb2_grpc.SearchServiceStub(self.channel)
        self.timeout_s = timeout_s

    def search(self, text: str | None = None, image: bytes | str | Path | None = None,
               top_k: int | None = None, filters: FilterSpec | None = None,
               nprobe: int | None = None, timeout_s: float | None = None, retrieval: str | None = None
               ) -> search_pb2.SearchResponse:
        """Run one query; returns the ``SearchResponse`` (hits, index_version, timings).

        Raises:
            grpc.RpcError: INVALID_ARGUMENT, DEADLINE_EXCEEDED, UNAVAILABLE, ...
        """
        request = build_search_request(text, image, top_k, filters, nprobe, retrieval)
        return self.stub.Search(request, timeout=timeout_s or self.timeout_s)

    def get_products(self, product_ids: Sequence[str], timeout_s: float | None = None
                     ) -> search_pb2.GetProductsResponse:
        """Metadata records of ``product_ids`` (unknown ids in ``missing_product_ids``)."""
        request = search_pb2.GetProductsRequest(product_ids=list(product_ids))
        return self.stub.GetProducts(request, timeout=timeout_s or self.timeout_s)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "SearchClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
