"""Live deletes over the admin gRPC API: a deleted product disappears from results at once
(exact top_k still honoured, filtered searches too), survives a server restart, and is dropped
once a published version no longer holds it; the admin API's safety rules."""
from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest

from server.app import ServerConfig, StartupError
from server.client import SearchClient
from server.gen.ecsearch.v1 import admin_pb2, admin_pb2_grpc, search_pb2
from tests.test_server_support import (SUBSET_SIZE, build_version, copy_root, index_root, server_model,  # noqa: F401
                                       start_server, subset)

pytestmark = pytest.mark.isa


def _admin(server) -> tuple[grpc.Channel, admin_pb2_grpc.AdminServiceStub]:
    channel = grpc.insecure_channel(f"127.0.0.1:{server.server.admin_port}")
    return channel, admin_pb2_grpc.AdminServiceStub(channel)


def _hit_ids(client: SearchClient, photo: bytes, top_k: int, **kwargs) -> list[str]:
    return [h.product_id for h in client.search(image=photo, top_k=top_k, timeout_s=30, **kwargs).hits]


def _wait(predicate, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_live_delete_hides_at_once_survives_a_restart_and_ends_with_the_next_version(
        tmp_path, index_root, server_model, subset):
    root = copy_root(index_root, tmp_path / "root")
    gone, back = subset.products[120], subset.products[5]  # `gone` is outside the next version's first 100
    photo = Path(gone.image).read_bytes()
    server = start_server(root, admin_port=0)
    try:
        server.wait_serving()
        v1 = server.server.holder.current.version
        with SearchClient(server.target) as client:
            assert _hit_ids(client, photo, 5)[0] == gone.product_id  # its own photo finds it first
            before = _hit_ids(client, photo, SUBSET_SIZE)  # all it reaches at the default nprobe
            channel, admin = _admin(server)
            with channel:
                reply = admin.DeleteProducts(admin_pb2.DeleteProductsRequest(
                    product_ids=[gone.product_id, back.product_id, "no-such-id"]), timeout=30)
                assert reply.index_version == v1 and reply.deleted_count == 2
                assert list(reply.deleted_product_ids) == [gone.product_id, back.product_id]
                assert list(reply.unknown_product_ids) == ["no-such-id"]
            # at once: the next search no longer returns them, and still returns exactly top_k hits
            hits = _hit_ids(client, photo, 10)
            assert len(hits) == 10 and gone.product_id not in hits and back.product_id not in hits
            everything = _hit_ids(client, photo, SUBSET_SIZE)
            assert everything == [pid for pid in before if pid not in (gone.product_id, back.product_id)]
            gender = gone.attributes["gender"]
            filtered = _hit_ids(client, photo, 5, filters={"gender": [gender]})
            assert gone.product_id not in filtered and len(filtered) == 5
            products = client.get_products([gone.product_id, subset.products[7].product_id])
            assert list(products.missing_product_ids) == [gone.product_id]  # GetProducts hides it too
            assert [p.product_id for p in products.products] == [subset.products[7].product_id]
        stored = json.loads((root / "tombstones.json").read_text())
        assert {(e["product_id"], e["version"]) for e in stored["deleted"]} == {
            (gone.product_id, v1), (back.product_id, v1)}
    finally:
        server.stop()

    server = start_server(root, admin_port=0)  # a restart keeps the deletes
    try:
        server.wait_serving()
        with SearchClient(server.target) as client:
            assert gone.product_id not in _hit_ids(client, photo, 20)
            channel, admin = _admin(server)
            with channel:
                listed = admin.ListDeletedProducts(admin_pb2.ListDeletedProductsRequest(), timeout=30)
                assert list(listed.product_ids) == sorted([gone.product_id, back.product_id])
                restored = admin.RestoreProducts(admin_pb2.RestoreProductsRequest(
                    product_ids=[back.product_id, "never-deleted"]), timeout=30)
                assert list(restored.restored_product_ids) == [back.product_id] and restored.deleted_count == 1
            assert back.product_id in _hit_ids(client, Path(back.image).read_bytes(), 3)
            # a new version without `gone` includes the delete: it is dropped from the file
            v2 = build_version(root, server_model, subset, limit=100)
            _wait(lambda: server.server.holder.current.version == v2)
            assert json.loads((root / "tombstones.json").read_text())["deleted"] == []
            assert len(_hit_ids(client, photo, 100)) == 100
    finally:
        server.stop()


def test_admin_token_and_bad_requests(tmp_path, index_root, subset):
    root = copy_root(index_root, tmp_path / "root")
    token_file = tmp_path / "admin-token"
    token_file.write_text("s3cret-token\n")
    server = start_server(root, admin_port=0, admin_token_file=token_file)
    try:
        server.wait_serving()
        channel, admin = _admin(server)
        with channel:
            request = admin_pb2.DeleteProductsRequest(product_ids=[subset.products[0].product_id])
            for metadata in ((), (("authorization", "Bearer wrong"),)):
                with pytest.raises(grpc.RpcError) as err:
                    admin.DeleteProducts(request, metadata=metadata, timeout=30)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            good = (("authorization", "Bearer s3cret-token"),)
            assert admin.DeleteProducts(request, metadata=good, timeout=30).deleted_count == 1
            for bad in ([], [""]):
                with pytest.raises(grpc.RpcError) as err:
                    admin.DeleteProducts(admin_pb2.DeleteProductsRequest(product_ids=bad), metadata=good, timeout=30)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # the query port does not serve the admin API
        with grpc.insecure_channel(server.target) as query_channel:
            with pytest.raises(grpc.RpcError) as err:
                admin_pb2_grpc.AdminServiceStub(query_channel).ListDeletedProducts(
                    admin_pb2.ListDeletedProductsRequest(), timeout=30)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            search = search_pb2.SearchRequest(text="shirt", top_k=3)
            assert len(search_pb2_grpc_stub(query_channel).Search(search, timeout=30).hits) == 3
    finally:
        server.stop()


def search_pb2_grpc_stub(channel):
    from server.gen.ecsearch.v1 import search_pb2_grpc

    return search_pb2_grpc.SearchServiceStub(channel)


def test_admin_api_is_off_by_default_and_loopback_only_without_tls_and_token(tmp_path):
    assert ServerConfig(index_root=tmp_path).admin_port is None
    for options, message in [
        (dict(admin_port=0, admin_host="0.0.0.0"), "is not loopback"),
        (dict(admin_port=0, admin_host="::", admin_token_file=tmp_path / "t"), "is not loopback"),
        (dict(admin_token_file=tmp_path / "t"), "needs --admin-port"),
        (dict(admin_port=70000), "admin port must be in"),
    ]:
        with pytest.raises(StartupError, match=message):
            ServerConfig(index_root=tmp_path, **options)
    ServerConfig(index_root=tmp_path, admin_port=0, admin_host="::1")
    ServerConfig(index_root=tmp_path, admin_port=0, admin_host="0.0.0.0", tls_cert=tmp_path / "c",
                 tls_key=tmp_path / "k", admin_token_file=tmp_path / "t")


def test_an_unreadable_tombstone_file_refuses_to_start(tmp_path, index_root):
    root = copy_root(index_root, tmp_path / "root")
    (root / "tombstones.json").write_text("{not json")
    with pytest.raises(StartupError, match="unreadable live deletes"):
        start_server(root)
