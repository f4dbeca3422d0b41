"""The main job end to end on a 300-product subset with the real default backbones:
``ecsearch train`` (short) → ``ecsearch index`` → ``ecsearch serve`` → queries over gRPC.

Every step runs the real CLI in a subprocess, exactly as ``make demo`` does.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

pytestmark = pytest.mark.isa  # depends on the CPU's ISA: CI reruns it as on an AVX2-only CPU

REPO = Path(__file__).resolve().parents[1]
LIMIT = 300


def _ecsearch(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"ecsearch {args[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, fashion_dir):
    """Train (short), index and serve the first 300 products; yields (target, rows)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    work = tmp_path_factory.mktemp("e2e")
    model, cache, root = work / "model", work / "cache", work / "index"
    _ecsearch("train", "--catalog", str(fashion_dir), "--out", str(model), "--cache-dir", str(cache),
              "--limit", str(LIMIT), "--steps", "120", "--stage1-steps", "30", "--batch-size", "64", "--quiet",
              # every training photo gets a view, enough to fit a 128-wide image-private block (the
              # recipe's 256 needs 255 augmented photos; a 300-product subset has about 250)
              "--augment-fraction", "1", "--image-private-dim", "128")
    # the recipe's image-private block whitens the GeM of the photo tokens, at gain 6 on photo-only
    # queries; the mirror average is opt-in (train --flip-average: photo queries cost twice the backbone);
    # the two towers share one trained fusion encoder, each keeping its own block gains, and CMAL
    # weighs the text-to-photo pairs (Tq, Vi) and (Vq, Ti) at 6
    recipe = json.loads((model / "config.json").read_text())["model"]
    assert not recipe["image_backbone"].get("flip_average") and recipe["image_private_gem_p"] == 2.0
    assert recipe["image_private_query_gains"] == [0.0, 6.0, 0.0] and recipe["image_private_item_gain"] == 1.0
    assert recipe["share_fusion"] is True
    # the cross-modal block (canonical variates for items that lack a modality) is fitted after training
    assert recipe["cross_dim"] == 256 and recipe["cross_query_gains"] == [0.6, 0.3, 0.42]
    assert json.loads((model / "training.json").read_text())["cross_block"]["fitted"] == "after training"
    loss = json.loads((model / "training.json").read_text())["train"]["loss"]
    assert loss["cmal_pair_weights"] == [6.0, 6.0, 2.0, 3.0, 2.0]  # the unimodal cross pairs weigh 6
    # the item tower's image-private part reads three augmented views of each catalogue photo; training
    # makes them for its photos, reusing view 0 of its own augmented cache
    assert recipe["item_photo_views"] == 3
    views = json.loads((model / "training.json").read_text())["item_photo_views_cache"]
    assert views["views"] == 3 and views["reused"] > 0
    indexed = _ecsearch("index", "--catalog", str(fashion_dir), "--model", str(model), "--index-root", str(root),
                        "--limit", str(LIMIT), "--shards", "2", "--token-cache", str(cache))
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--index-root", str(root),
                               "--model", str(model), "--port", str(port)],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    target = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 300  # a first start on AVX2 also builds and gates int8 text
            while True:
                assert server.poll() is None, f"server exited: {server.stderr.read()[-2000:]}"
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, "server never reported SERVING"
                time.sleep(0.3)
        rows = list(csv.DictReader(open(fashion_dir / "styles.csv")))[:LIMIT]
        yield target, rows, json.loads(indexed.stdout)
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0


def test_own_photo_finds_its_product_at_rank_1(served, fashion_dir):
    """Products the model was trained on (train split of the subset); how often a held-out
    product's photo ranks it first is a model-quality figure, measured by ``ecsearch eval``
    (i2m Recall@1 in docs/results.md)."""
    from server.client import SearchClient

    target, rows, _summary = served
    split = {r["id"]: r["split"] for r in csv.DictReader(open(fashion_dir / "split.csv"))}
    picks = [r for r in rows if split[r["id"]] == "train"][::25]  # 10 products spread over the subset
    with SearchClient(target, timeout_s=60) as client:
        ranks_1 = 0
        for row in picks:
            response = client.search(image=fashion_dir / "images" / f"{row['id']}.jpg", top_k=5)
            ranks_1 += response.hits[0].product_id == row["id"]
    assert ranks_1 == len(picks), f"only {ranks_1}/{len(picks)} photos found their product at rank 1"


@pytest.mark.parametrize("split_name", ["train", "test"])
def test_augmented_photo_finds_its_product_at_rank_1(served, fashion_dir, tmp_path, split_name):
    """A product photo taken a little differently (the robustness evaluation's seeded view:
    crop, flip, rotation, jitter, down-scaling, JPEG; engine/evaluation/robustness.py) sent as a JPEG file
    over gRPC comes back at rank 1 from the served index (issue 12): for products the model trained
    on, and for held-out (test split) products it never saw. The requests probe every IVF list:
    the build's own nprobe for photo queries on this 300-product, 4-list index is 1 (recall@10 0.95,
    its target), which lets about one photo in 20 fall outside the probed list whatever the model;
    the default nprobe per kind is checked by the test below and measured on the full index by
    bench/bench_served_quality.py."""
    from engine.model.augment import augment_photo, view_seed
    from engine.model.images import load_image
    from engine.evaluation.robustness import EVAL_AUGMENT_SEED
    from server.client import SearchClient

    target, rows, summary = served
    nlist = json.loads((Path(summary["path"]) / "manifest.json").read_text())["index"]["nlist"]
    split = {r["id"]: r["split"] for r in csv.DictReader(open(fashion_dir / "split.csv"))}
    candidates = [r for r in rows if split[r["id"]] == split_name]
    picks = candidates[3::max(1, len(candidates) // 10)][:10]  # 10 products spread over the subset
    assert len(picks) == 10
    with SearchClient(target, timeout_s=60) as client:
        found = []
        for row in picks:
            photo = fashion_dir / "images" / f"{row['id']}.jpg"
            view = augment_photo(load_image(photo), view_seed(EVAL_AUGMENT_SEED, str(photo), 0))
            path = tmp_path / f"{row['id']}-aug.jpg"
            view.save(path, quality=90)
            assert view.tobytes() != load_image(photo).convert("RGB").tobytes()
            response = client.search(image=path, top_k=5, nprobe=nlist)
            assert response.dense_serving.nprobe == nlist
            found.append(response.hits[0].product_id == row["id"])
    assert all(found), f"only {sum(found)}/{len(found)} augmented {split_name} photos found their product at rank 1"


def test_photo_queries_come_back_in_two_stages(served, fashion_dir):
    """A photo-only query (engine/retrieval/instance_first.py): hit 1 is the whole query vector's best
    product, the hits after it the ranking of the vector without its image-private block, over the
    served index version; checked against the same two searches made in process with the model's
    own fp32 query vector (the server may encode in bf16 or int8: the lists may swap near ties)."""
    from engine.model.images import load_image
    from engine.model.model_folder import load_model
    from engine.retrieval.instance_first import instance_columns, without_instance
    from indexer.search import open_index
    from server.client import SearchClient
    from server.version_loader import manifest_model

    target, rows, summary = served
    index = open_index(Path(summary["path"]))
    model = load_model(manifest_model(index.manifest)[1])
    columns = instance_columns(model)
    assert columns == (256, 384)  # [F (256) | image-private (128) | ...]
    nlist, differs = index.manifest["index"]["nlist"], 0
    try:
        with SearchClient(target, timeout_s=60) as client:
            for row in rows[5:200:40]:
                photo = fashion_dir / "images" / f"{row['id']}.jpg"
                response = client.search(image=photo, top_k=10, nprobe=nlist)
                hits = [h.product_id for h in response.hits]
                q = model.query_tower.encode(None, [load_image(photo)], use_graphs=False)
                whole = index.search_served(q, 10, nprobe=nlist).product_ids[0]
                rest = index.search_served(without_instance(q, columns), 11, nprobe=nlist).product_ids[0]
                assert len(hits) == 10 == len(set(hits)) and hits[0] == whole[0] == row["id"]
                similar = [pid for pid in rest if pid != whole[0]][:9]
                assert len(set(hits[1:]) & set(similar)) >= 6, (hits, similar)
                differs += hits[1:] != list(whole[1:])
    finally:
        index.close()
    assert differs > 0  # the second stage changed some list: two stages ran


def test_text_query_top_hits_share_its_article_type(served):
    from server.client import SearchClient

    target, rows, _summary = served
    counts = Counter(r["articleType"] for r in rows)
    queries = {"Tshirts": "men blue t-shirt", "Flip Flops": "flip flops", "Sports Shoes": "sports shoes for men"}
    with SearchClient(target, timeout_s=60) as client:
        for article_type, text in queries.items():
            assert counts[article_type] >= 5, f"subset has too few {article_type}"
            response = client.search(text=text, top_k=5)
            assert len(response.hits) == 5 and response.index_version
            types = [hit.metadata["articleType"] for hit in response.hits]
            assert types.count(article_type) >= 3, f"{text!r} → {types}"  # a majority of the top 5


def test_each_kind_of_query_probes_the_lists_the_build_chose_for_it(served, fashion_dir):
    """The build measures recall@10 per kind of query (indexer/query_sample.py) and writes the
    nprobe each kind of Search request needs; a request naming no nprobe probes that many lists,
    one naming it keeps its own (the response's dense_serving says which)."""
    from server.client import SearchClient

    target, rows, summary = served
    manifest = json.loads((Path(summary["path"]) / "manifest.json").read_text())
    by_kind = manifest["index"]["nprobe_by_query_kind"]
    assert set(by_kind) == {"text", "image", "text+image"}
    views = manifest["build"]["item_photo_views"]
    assert views["views"] == 3 and views["photos"] == manifest["counts"]["indexed"] - manifest["counts"]["text_only"]
    assert all(1 <= n <= manifest["index"]["nprobe_default"] for n in by_kind.values())
    photo = fashion_dir / "images" / f"{rows[0]['id']}.jpg"
    queries = {"text": dict(text="black shoes"), "image": dict(image=photo),
               "text+image": dict(text="in red", image=photo)}
    with SearchClient(target, timeout_s=60) as client:
        for kind, query in queries.items():
            assert client.search(top_k=5, **query).dense_serving.nprobe == by_kind[kind], kind
        assert client.search(text="black shoes", top_k=5, nprobe=1).dense_serving.nprobe == 1


def test_filtered_and_multimodal_queries(served, fashion_dir):
    from server.client import SearchClient

    target, rows, _summary = served
    shoe = next(r for r in rows if r["articleType"] == "Casual Shoes")
    with SearchClient(target, timeout_s=60) as client:
        response = client.search(text="shoes", top_k=5, filters={"gender": "Women"})
        assert response.hits and all(hit.metadata["gender"] == "Women" for hit in response.hits)
        response = client.search(text="in red", image=fashion_dir / "images" / f"{shoe['id']}.jpg", top_k=5)
        assert len(response.hits) == 5
        assert sum(hit.metadata["masterCategory"] == "Footwear" for hit in response.hits) >= 3


def test_index_reused_the_training_token_cache(served, fashion_dir):
    """Titles and photos of the train-split products come from the cache training wrote; the
    held-out products run the backbones (``--token-cache``, as ``make demo`` passes it)."""
    _target, rows, summary = served
    split = {r["id"]: r["split"] for r in csv.DictReader(open(fashion_dir / "split.csv"))}
    trained = sum(split.get(r["id"]) == "train" for r in rows)
    assert summary["counts"]["indexed"] == len(rows)
    assert summary["sources"]["images_from_cache"] == trained
    assert summary["sources"]["texts_from_cache"] == trained
    assert summary["sources"]["images_from_backbones"] == len(rows) - trained
