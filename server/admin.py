"""``ecsearch.v1.AdminService``: live deletes on the served index version, on its own port.

Off by default (``ecsearch serve --admin-port PORT``). Safety rules (our choice):

- the admin server binds ``--admin-host`` (default 127.0.0.1) on its own port, never the
  query port, so the query API can be public while the admin one is not;
- a non-loopback admin host is refused unless TLS (``--tls-cert`` / ``--tls-key``, the
  query server's) and a token (``--admin-token-file``) are both configured;
- with a token, every call must carry the metadata ``authorization: Bearer <token>``
  (compared in constant time), else UNAUTHENTICATED.

Deletes go to ``server.tombstones.TombstoneStore`` (persisted, applied to each version as it
is loaded). Source: our choice, after the grpc Python aio examples.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
from pathlib import Path
from typing import Awaitable, Callable

import grpc

from server.gen.ecsearch.v1 import admin_pb2, admin_pb2_grpc
from server.index_holder import IndexHolder, NoIndexError
from server.tombstones import TombstoneError, TombstoneStore

log = logging.getLogger(__name__)

MAX_ADMIN_IDS = 10_000
SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or "localhost") only accepts connections from this machine."""
    if host.strip("[]") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def admin_problem(host: str, port: int | None, tls: bool, token_file: Path | None) -> str | None:
    """Why these admin options are refused, or None (also None when the admin API is off)."""
    if port is None:
        return None if token_file is None else "--admin-token-file needs --admin-port"
    if not 0 <= port <= 65535:
        return f"admin port must be in [0, 65535], got {port}"
    if not is_loopback(host) and not (tls and token_file is not None):
        return (f"admin host {host!r} is not loopback: give --tls-cert / --tls-key and --admin-token-file "
                "to serve the admin API beyond this machine")
    return None


def read_token(token_file: Path | None) -> str | None:
    """The admin token (file content, stripped). Raises ValueError when unreadable or empty."""
    if token_file is None:
        return None
    try:
        token = Path(token_file).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the admin token file {token_file}: {exc}") from exc
    if not token:
        raise ValueError(f"admin token file {token_file} is empty")
    return token


class AdminService(admin_pb2_grpc.AdminServiceServicer):
    """The admin servicer over the server's ``IndexHolder`` and ``TombstoneStore``."""

    def __init__(self, holder: IndexHolder, store: TombstoneStore, token: str | None):
        self._holder = holder
        self._store = store
        self._token = token

    async def _call(self, context: grpc.aio.ServicerContext, work: Callable[..., Awaitable]):
        """Check the token, lease the served version, run ``work(served)``; errors -> status."""
        if self._token is not None:
            sent = dict(context.invocation_metadata()).get("authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {self._token}".encode()):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong admin token")
        try:
            with self._holder.lease() as served:
                return await work(served)
        except NoIndexError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"no index version loaded: {exc}")
        except TombstoneError as exc:
            log.error("live deletes: %s", exc)
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))

    @staticmethod
    async def _ids(request, context: grpc.aio.ServicerContext) -> list[str]:
        ids = list(request.product_ids)
        if not ids or len(ids) > MAX_ADMIN_IDS or any(not pid for pid in ids):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"give 1 to {MAX_ADMIN_IDS} non-empty product_ids, got {len(ids)}"
                                f"{' with an empty one' if any(not pid for pid in ids) else ''}")
        return ids

    async def DeleteProducts(self, request, context):
        ids = await self._ids(request, context)

        async def work(served):
            deleted, unknown = await asyncio.to_thread(self._store.delete, served.index, ids)
            log.info("live delete on %s: %d hidden, %d unknown", served.version, len(deleted), len(unknown))
            return admin_pb2.DeleteProductsResponse(index_version=served.version, deleted_product_ids=deleted,
                                                    unknown_product_ids=unknown,
                                                    deleted_count=len(self._store.ids()))
        return await self._call(context, work)

    async def RestoreProducts(self, request, context):
        ids = await self._ids(request, context)

        async def work(served):
            restored = await asyncio.to_thread(self._store.restore, served.index, ids)
            return admin_pb2.RestoreProductsResponse(index_version=served.version, restored_product_ids=restored,
                                                     deleted_count=len(self._store.ids()))
        return await self._call(context, work)

    async def ListDeletedProducts(self, request, context):
        async def work(served):
            return admin_pb2.ListDeletedProductsResponse(index_version=served.version,
                                                         product_ids=sorted(self._store.ids()))
        return await self._call(context, work)


async def start_admin_server(holder: IndexHolder, store: TombstoneStore, host: str, port: int,
                             token: str | None, credentials: grpc.ServerCredentials | None
                             ) -> tuple[grpc.aio.Server, int]:
    """Start the admin gRPC server; returns it and its bound port. Raises RuntimeError when
    the address cannot be bound."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminService(holder, store, token), server)
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if not bound:
        raise RuntimeError(f"cannot bind the admin address {address}")
    await server.start()
    log.info("admin API on %s (%s%s)", address.rsplit(":", 1)[0] + f":{bound}", "TLS" if credentials else "plaintext",
             ", token required" if token else "")
    return server, bound
