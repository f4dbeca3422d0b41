"""Exact top_k, pagination and dense / lexical / hybrid retrieval through the real gRPC server
on loopback, over a real index version of the first 2,000 fashion products (built by the real
indexer job over the text view with a tiny random model, so queries and items share a space
but rankings carry no meaning: the tests check counts, filters, order and paging, not quality)."""
from __future__ import annotations

import time
from collections import Counter
from itertools import combinations

import grpc
import pytest

from engine.retrieval.lexical import product_text, tokenize
from server.client import RETRIEVAL_MODES, SearchClient, build_search_request
from server.gen.ecsearch.v1 import search_pb2
from tests.test_server_support import (build_version, copy_root, index_root, server_model,  # noqa: F401
                                       start_server, subset)

pytestmark = pytest.mark.isa  # the query tower runs: CI reruns it as on an AVX2-only CPU

N_PRODUCTS = 2000
MODES = RETRIEVAL_MODES


@pytest.fixture(scope="module")
def catalogue(fashion_dir):
    from engine.catalog import read_catalog

    products = read_catalog(fashion_dir, limit=N_PRODUCTS).products
    assert len(products) == N_PRODUCTS
    return products


@pytest.fixture(scope="module")
def big_server(tmp_path_factory, server_model, fashion_dir):
    from indexer.encode import EncodeOptions
    from indexer.pipeline import IndexJobConfig, run_index_job
    from indexer.version import VersionOptions

    root = tmp_path_factory.mktemp("index-2000")
    config = IndexJobConfig(catalog=fashion_dir, model_dir=server_model[1], index_root=root, limit=N_PRODUCTS,
                            keep_versions=2, device="cpu", encode=EncodeOptions(view="text", batch_size=256, workers=0),
                            version=VersionOptions(factory="auto", recall_queries=100, self_queries=200))
    assert run_index_job(config, log=lambda _line: None).manifest["counts"]["indexed"] == N_PRODUCTS
    server = start_server(root, max_wait_ms=2.0)
    server.wait_serving()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(big_server):
    with SearchClient(big_server.target, timeout_s=60) as c:
        yield c


def _request(text="shirt", mode="dense", **fields) -> search_pb2.SearchRequest:
    filters = fields.pop("filters", None)
    request = build_search_request(text=text, image=fields.pop("image", None), top_k=fields.pop("top_k", None),
                                   filters=filters)
    request.retrieval = MODES[mode]
    for name, value in fields.items():
        setattr(request, name, value)
    return request


def _ids(response) -> list[str]:
    return [h.product_id for h in response.hits]


def _filter_matching(products, count: int) -> tuple[dict, list[str]]:
    """A filter (one or two attributes) that exactly ``count`` products match, else the one
    matching the most products below 50: ``(filters, product ids)``."""
    fields = ("gender", "articleType", "baseColour", "season", "usage")
    values = Counter((f, p.attributes.get(f)) for p in products for f in fields if p.attributes.get(f))
    candidates = [[kv] for kv in values] + [list(pair) for pair in combinations(list(values)[:60], 2)
                                            if pair[0][0] != pair[1][0]]
    best = None
    for spec in candidates:
        ids = [p.product_id for p in products if all(p.attributes.get(f) == v for f, v in spec)]
        if len(ids) == count:
            return dict(spec), ids
        if len(ids) < 50 and (best is None or len(ids) > len(best[1])):
            best = (dict(spec), ids)
    return best


def test_top_k_1000_over_2000_products_returns_1000_hits_and_says_how(client):
    default = client.stub.Search(_request(top_k=10), timeout=60)
    assert len(default.hits) == 10 and default.dense_serving.nprobe >= 1
    response = client.stub.Search(_request(top_k=1000, nprobe=1), timeout=60)
    assert len(response.hits) == 1000 and len(set(_ids(response))) == 1000
    assert [h.rank for h in response.hits] == list(range(1, 1001))
    scores = [h.score for h in response.hits]
    assert all(a >= b for a, b in zip(scores, scores[1:]))
    assert response.dense_serving.widened  # one list of ~32 cannot hold 1,000 items
    assert response.retrieval == search_pb2.RETRIEVAL_DENSE
    # old clients (no retrieval field) get dense, as before
    assert _ids(client.stub.Search(build_search_request(text="shirt", top_k=1000), timeout=60))[:50] == \
        _ids(client.stub.Search(_request(top_k=1000), timeout=60))[:50]


@pytest.mark.parametrize("mode", ["dense", "hybrid"])
def test_a_filter_matching_37_products_with_top_k_50_returns_those_37(client, catalogue, mode):
    filters, ids = _filter_matching(catalogue, 37)
    assert 0 < len(ids) < 50
    response = client.stub.Search(_request(text="casual", mode=mode, top_k=50, filters=filters, nprobe=1),
                                  timeout=60)
    assert sorted(_ids(response)) == sorted(ids)


@pytest.mark.parametrize("mode", ["dense", "lexical", "hybrid"])
def test_pages_concatenate_to_one_big_request(client, mode):
    page_size, pages = 20, 4
    text = "men blue shirt"
    big = client.stub.Search(_request(text=text, mode=mode, top_k=page_size * pages), timeout=60)
    assert len(big.hits) == page_size * pages
    got, token, ranks = [], "", []
    for n in range(pages):
        page = client.stub.Search(_request(text=text, mode=mode, top_k=page_size * pages, page_size=page_size,
                                           page_token=token), timeout=60)
        assert len(page.hits) == page_size
        got += [(h.product_id, h.score) for h in page.hits]
        ranks += [h.rank for h in page.hits]
        token = page.next_page_token
        assert bool(token) == (n < pages - 1)
    assert got == [(h.product_id, h.score) for h in big.hits]
    assert ranks == list(range(1, page_size * pages + 1))


def test_paging_without_top_k_walks_the_whole_list_up_to_the_limit(client):
    first = client.stub.Search(_request(text="watch", mode="lexical", page_size=7), timeout=60)
    matching = client.stub.Search(_request(text="watch", mode="lexical", top_k=1000), timeout=60)
    assert _ids(first) == _ids(matching)[:7] and first.next_page_token


@pytest.mark.parametrize("mode", ["dense", "lexical", "hybrid"])
def test_every_retrieval_mode_honours_filters_and_exact_k(client, catalogue, mode):
    filters = {"gender": "Women", "articleType": ["Handbags", "Heels"]}
    allowed = [p for p in catalogue if p.attributes.get("gender") == "Women"
               and p.attributes.get("articleType") in ("Handbags", "Heels")]
    text = "black leather"
    words = set(tokenize([text])[0])
    lexical_matches = [p for p in allowed if words & set(tokenize([product_text(p.title, p.attributes)])[0])]
    response = client.stub.Search(_request(text=text, mode=mode, top_k=40, filters=filters), timeout=60)
    for hit in response.hits:
        assert hit.metadata["gender"] == "Women" and hit.metadata["articleType"] in ("Handbags", "Heels")
    expected = min(40, len(lexical_matches) if mode == "lexical" else len(allowed))
    assert len(response.hits) == expected and len(set(_ids(response))) == expected
    assert response.retrieval == MODES[mode]
    timings = response.timings
    assert (timings.lexical_ms > 0) == (mode != "dense") and (timings.fusion_ms > 0) == (mode == "hybrid")
    assert response.HasField("dense_serving") == (mode != "lexical")


def test_lexical_finds_a_brand_in_titles_and_hybrid_keeps_it(client, catalogue):
    brand = Counter(p.title.split()[0] for p in catalogue if p.title).most_common(1)[0][0]
    lexical = client.stub.Search(_request(text=brand.lower(), mode="lexical", top_k=20), timeout=60)
    assert len(lexical.hits) > 0
    assert all(brand.lower() in h.metadata["title"].lower() for h in lexical.hits)
    weighted = _request(text=brand.lower(), mode="hybrid", top_k=20)
    weighted.hybrid.fusion = search_pb2.FUSION_WEIGHTED
    weighted.hybrid.dense_weight = 0.0
    hybrid = client.stub.Search(weighted, timeout=60)
    # dense weight 0: the lexical order, for the hits scoring above the lexical list's tail
    # (min-max scaling maps the lowest lexical candidate to 0, a tie with every dense-only one)
    above = sum(h.score > lexical.hits[-1].score for h in lexical.hits)
    assert above > 0 and _ids(hybrid)[:above] == _ids(lexical)[:above]


def test_a_text_and_image_hybrid_query_sends_the_text_to_both_sides(client, catalogue):
    product = catalogue[3]
    request = _request(text="sweat proof t-shirt", mode="hybrid", image=product.image, top_k=25)
    response = client.stub.Search(request, timeout=60)
    assert len(response.hits) == 25 and response.timings.encode_ms > 0 and response.timings.decode_ms > 0
    assert response.timings.lexical_ms > 0 and response.timings.fusion_ms > 0
    lexical = client.stub.Search(_request(text="sweat proof t-shirt", mode="lexical", top_k=25), timeout=60)
    assert set(_ids(lexical)[:3]) & set(_ids(response))  # the text's best lexical hits survive the fusion


BAD = [
    ("lexical needs text", dict(text=None, mode="lexical"), "lexical retrieval needs text"),
    ("hybrid needs text", dict(text=None, mode="hybrid"), "hybrid retrieval needs text"),
    ("lexical with an image", dict(mode="lexical", image=True), "lexical retrieval uses text only"),
    ("negative page size", dict(page_size=-1), "page_size"),
    ("token without page size", dict(page_token="abc"), "page_token needs page_size"),
    ("malformed token", dict(page_size=5, page_token="not-a-token!"), "page_token is malformed"),
]


@pytest.mark.parametrize("name,fields,detail", BAD, ids=[b[0] for b in BAD])
def test_bad_retrieval_and_paging_requests_get_invalid_argument(client, catalogue, name, fields, detail):
    if fields.get("text", "x") is None or fields.get("image"):
        fields = {**fields, "image": catalogue[0].image}
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Search(_request(**{"text": "shirt", **fields}), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and detail in err.value.details()


def test_bad_hybrid_weights_and_a_token_for_another_query_are_refused(client):
    request = _request(mode="hybrid")
    request.hybrid.dense_weight = -1.0
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Search(request, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "weights" in err.value.details()
    token = client.stub.Search(_request(text="shirt", top_k=30, page_size=10), timeout=60).next_page_token
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Search(_request(text="jeans", top_k=30, page_size=10, page_token=token), timeout=60)
    assert "another query" in err.value.details()


def test_a_page_token_from_another_index_version_is_invalid_argument(tmp_path, index_root, server_model, subset):
    root = copy_root(index_root, tmp_path / "root")
    server = start_server(root, poll_interval_s=0.05, max_wait_ms=2.0)
    try:
        server.wait_serving()
        v1 = server.server.holder.current.version
        with SearchClient(server.target) as client:
            request = _request(text="shoes", top_k=30, page_size=10)
            token = client.stub.Search(request, timeout=60).next_page_token
            v2 = build_version(root, server_model, subset, limit=100)
            deadline = time.monotonic() + 60
            while server.server.holder.current.version != v2:
                assert time.monotonic() < deadline, "the new version was not swapped in"
                time.sleep(0.01)
            request.page_token = token
            with pytest.raises(grpc.RpcError) as err:
                client.stub.Search(request, timeout=60)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"issued by index version {v1}" in err.value.details() and v2 in err.value.details()
            request.page_token = ""
            assert client.stub.Search(request, timeout=60).index_version == v2  # a fresh first page works
    finally:
        server.stop()
