"""The gRPC server end to end: a real server on a loopback port over a real index version
built from a subset of the fashion catalogue (see tests/test_server_support.py)."""
from __future__ import annotations

import io
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image

from server.client import SearchClient
from server.gen.ecsearch.v1 import search_pb2
from tests.test_server_support import (copy_root, index_root, server_model, start_server,  # noqa: F401
                                       subset)

pytestmark = pytest.mark.isa  # depends on the CPU's ISA: CI reruns it as on an AVX2-only CPU

MAX_IMAGE_PIXELS = 2_000_000  # small limit so the "image over limits" case stays a small request


@pytest.fixture(scope="module")
def running(index_root):
    server = start_server(index_root, max_image_pixels=MAX_IMAGE_PIXELS, max_wait_ms=20.0)
    server.wait_serving()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(running):
    with SearchClient(running.target, timeout_s=30) as c:
        yield c


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 200)).save(buf, format="PNG")
    return buf.getvalue()


def _health(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_reflection_lists_the_service(running):
    with grpc.insecure_channel(running.target) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert "ecsearch.v1.SearchService" in services
        assert "grpc.health.v1.Health" in services
        pool_file = ProtoReflectionDescriptorDatabase(channel).FindFileContainingSymbol("ecsearch.v1.SearchService")
        assert [s.name for s in pool_file.service] == ["SearchService"]
        assert {m.name for m in pool_file.service[0].method} == {"Search", "GetProducts"}


def test_queries_run_through_the_traced_graphs(client, running, subset):
    graphs = running.server.model.query_tower.graphs
    assert set(graphs) == {"text", "image", "text+image"}
    assert all(running.server.precision in g.serves for g in graphs.values())
    photo = Path(subset.products[0].image).read_bytes()
    for kind, kwargs in (("text", {"text": "black leather wallet"}), ("image", {"image": photo}),
                         ("text+image", {"text": "in red", "image": photo})):
        before = graphs[kind].calls
        assert len(client.search(top_k=3, **kwargs).hits) == 3
        assert graphs[kind].calls == before + 1, kind


def test_text_image_and_text_image_queries_return_top_k_hits_with_metadata(client, subset, running):
    photo = Path(subset.products[0].image).read_bytes()
    version = running.server.holder.current.version
    for kwargs in ({"text": "navy blue shirt for men"}, {"image": photo},
                   {"text": "sports shoes", "image": photo}):
        response = client.search(top_k=7, **kwargs)
        assert len(response.hits) == 7, kwargs
        assert [h.rank for h in response.hits] == list(range(1, 8))
        scores = [h.score for h in response.hits]
        assert scores == sorted(scores, reverse=True)
        assert len({h.product_id for h in response.hits}) == 7
        for hit in response.hits:
            product = subset.by_id(hit.product_id)
            assert hit.metadata["product_id"] == hit.product_id
            assert hit.metadata["title"] == product.title
            assert hit.metadata["gender"] == product.attributes["gender"]
        assert response.index_version == version
        t = response.timings
        assert t.total_ms > 0 and t.encode_ms > 0 and t.search_ms > 0
        assert (t.decode_ms > 0) == ("image" in kwargs)
        assert response.encode_batch_size >= 1
    assert len(client.search(text="watch").hits) == 10  # top_k absent -> 10


def test_catalogue_photo_as_image_query_returns_its_product_at_rank_1(client, subset):
    for product in subset.products[::16]:  # 10 products across the subset
        response = client.search(image=product.image, top_k=3, nprobe=64)
        assert response.hits[0].product_id == product.product_id
        assert response.hits[0].score == pytest.approx(1.0, abs=2e-3)


def test_filters_are_honoured(client, subset):
    genders = Counter(p.attributes.get("gender") for p in subset.products)
    response = client.search(text="shoes", top_k=20, filters={"gender": "Women"})
    assert len(response.hits) == min(20, genders["Women"])
    assert {h.metadata["gender"] for h in response.hits} == {"Women"}

    types = Counter(p.attributes.get("articleType") for p in subset.products)
    wanted = ["Sandals", "Flip Flops"]
    response = client.search(text="summer", top_k=50, filters={"articleType": wanted})
    assert len(response.hits) == sum(types[t] for t in wanted)  # fewer than top_k match: all of them
    assert {h.metadata["articleType"] for h in response.hits} == set(wanted)

    both = [p for p in subset.products if p.attributes.get("gender") == "Men"
            and p.attributes.get("articleType") in ("Tshirts", "Casual Shoes")]
    response = client.search(image=subset.products[5].image, top_k=1000,
                             filters={"gender": "Men", "articleType": ["Tshirts", "Casual Shoes"]})
    assert sorted(h.product_id for h in response.hits) == sorted(p.product_id for p in both)

    response = client.search(text="anything", filters={"gender": "NoSuchGender"})
    assert len(response.hits) == 0  # a valid field with no matching value is not an error


def test_get_products(client, subset):
    ids = [subset.products[3].product_id, "no-such-id", subset.products[9].product_id]
    response = client.get_products(ids)
    assert [p.product_id for p in response.products] == [ids[0], ids[2]]
    assert list(response.missing_product_ids) == ["no-such-id"]
    assert response.products[0].metadata["title"] == subset.products[3].title


BAD_SEARCHES = [
    ("no text and no image", search_pb2.SearchRequest(top_k=5), "empty query"),
    ("blank text", search_pb2.SearchRequest(text="   \t "), "blank text"),
    ("text too long", search_pb2.SearchRequest(text="shirt " * 500), "over the limit of 2048"),
    ("undecodable image", search_pb2.SearchRequest(image=b"GIF89a not really"), "undecodable image"),
    ("truncated jpeg", None, "undecodable image"),
    ("image over limits", None, "image over limits"),
    ("image of absurd aspect ratio", None, "aspect ratio"),
    ("top_k zero", search_pb2.SearchRequest(text="shirt", top_k=0), "top_k"),
    ("top_k negative", search_pb2.SearchRequest(text="shirt", top_k=-3), "top_k"),
    ("top_k too large", search_pb2.SearchRequest(text="shirt", top_k=1001), "top_k"),
    ("nprobe zero", search_pb2.SearchRequest(text="shirt", nprobe=0), "nprobe"),
    ("unknown filter field", search_pb2.SearchRequest(
        text="shirt", filters=[search_pb2.MetadataFilter(field="colour", values=["Red"])]), "unknown filter field"),
    ("filter without values", search_pb2.SearchRequest(
        text="shirt", filters=[search_pb2.MetadataFilter(field="gender")]), "no value"),
]


@pytest.mark.parametrize("name,request_,detail", BAD_SEARCHES, ids=[b[0] for b in BAD_SEARCHES])
def test_bad_input_gets_invalid_argument_and_the_server_keeps_serving(client, subset, name, request_, detail):
    if name == "truncated jpeg":
        request_ = search_pb2.SearchRequest(image=Path(subset.products[1].image).read_bytes()[:300])
    elif name == "image over limits":
        request_ = search_pb2.SearchRequest(text="shirt", image=_png(2000, 1001))  # 2,002,000 px
    elif name == "image of absurd aspect ratio":
        request_ = search_pb2.SearchRequest(image=_png(3000, 1))
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Search(request_, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert detail in err.value.details()
    assert len(client.search(text="blue t-shirt", top_k=3).hits) == 3


def test_other_failures_have_precise_codes(client, running):
    with pytest.raises(grpc.RpcError) as err:
        client.stub.GetProducts(search_pb2.GetProductsRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:  # over the 8 MiB default receive limit
        client.search(image=b"\xff" * (9 * 1024 * 1024))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as err:
        client.search(text="shirt", timeout_s=1e-4)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _health(running.target) == health_pb2.HealthCheckResponse.SERVING
    assert len(client.search(text="after the errors", top_k=4).hits) == 4


def test_over_max_concurrent_rpcs_gets_resource_exhausted_and_serving_goes_on(tmp_path, index_root):
    # a 300 ms batching window keeps the first two RPCs in flight while the others arrive
    server = start_server(copy_root(index_root, tmp_path / "root"), max_concurrent_rpcs=2, max_wait_ms=300.0)
    try:
        server.wait_serving()
        with SearchClient(server.target, timeout_s=30) as c:
            futures = [c.stub.Search.future(search_pb2.SearchRequest(text=f"q{n}"), timeout=30) for n in range(8)]
            codes = Counter(f.code() for f in futures)
            assert codes[grpc.StatusCode.RESOURCE_EXHAUSTED] >= 1 and codes[grpc.StatusCode.OK] >= 2
            assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert len(c.search(text="afterwards", top_k=2).hits) == 2
    finally:
        server.stop()


def test_concurrent_queries_are_micro_batched(running, subset):
    photos = [Path(p.image).read_bytes() for p in subset.products[:24]]
    with SearchClient(running.target, timeout_s=60) as c:
        futures = [c.stub.Search.future(search_pb2.SearchRequest(
            text="" if n % 3 == 1 else f"query {n}", image=b"" if n % 3 == 0 else photos[n], top_k=5))
            for n in range(24)]
        responses = [f.result() for f in futures]
    assert all(len(r.hits) == 5 for r in responses)
    assert max(r.encode_batch_size for r in responses) > 1


def test_search_threads_run_faiss_with_the_configured_openmp_threads(running):
    # OpenMP's thread count is per thread: the search pool's threads must set it themselves
    import faiss

    pool = running.server._search_pool
    counts = {pool.submit(faiss.omp_get_max_threads).result(30) for _ in range(8)}
    assert counts == {running.config.faiss_threads} == {1}


def test_metrics_count_requests_by_status_and_stage_latency(running, client):
    client.search(text="metrics probe", top_k=2)
    with pytest.raises(grpc.RpcError):
        client.search(text="metrics probe", top_k=0)
    registry = running.server.metrics.registry
    ok = registry.get_sample_value("ecsearch_requests_total", {"method": "Search", "code": "OK"})
    bad = registry.get_sample_value("ecsearch_requests_total", {"method": "Search", "code": "INVALID_ARGUMENT"})
    assert ok >= 1 and bad >= 1
    for stage in ("encode", "search", "metadata", "total"):
        assert registry.get_sample_value("ecsearch_stage_latency_seconds_count", {"stage": stage}) >= 1


def test_health_not_serving_until_an_index_is_published_then_serving(tmp_path, index_root, server_model):
    root = tmp_path / "empty-root"
    root.mkdir()
    server = start_server(root, poll_interval_s=0.1, metrics_port=_free_port())
    try:
        assert _health(server.target) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert _health(server.target, "ecsearch.v1.SearchService") == health_pb2.HealthCheckResponse.NOT_SERVING
        with SearchClient(server.target) as c:
            with pytest.raises(grpc.RpcError) as err:
                c.search(text="shirt")
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            # publish: the version folder, then CURRENT (as the indexer does)
            name = (index_root / "CURRENT").read_text().strip()
            (root / "versions").mkdir()
            import shutil
            shutil.copytree(index_root / "versions" / name, root / "versions" / name)
            (root / "CURRENT").write_text(name + "\n")
            server.wait_serving(60)
            assert _health(server.target) == health_pb2.HealthCheckResponse.SERVING
            assert _health(server.target, "ecsearch.v1.SearchService") == health_pb2.HealthCheckResponse.SERVING
            assert c.search(text="shirt").index_version == name
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.config.metrics_port}/metrics", timeout=10).read()
        assert b'ecsearch_requests_total{code="UNAVAILABLE",method="Search"}' in body
        assert b"ecsearch_stage_latency_seconds_bucket" in body
    finally:
        server.stop()


def test_refuses_to_start_on_model_fingerprint_mismatch(index_root, tiny_model_dir, tmp_path):
    from server.version_loader import ModelMismatchError

    # a copy: LMDB refuses a second handle on a file this process already has open
    server = start_server(copy_root(index_root, tmp_path / "root"), model_dir=tiny_model_dir)
    try:
        with pytest.raises(ModelMismatchError, match="differs"):
            server.wait_serving(60)
        assert server.server.holder.current is None
    finally:
        server.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
