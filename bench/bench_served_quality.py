"""The robustness evaluation's photo, text and composed queries, sent over gRPC to a served index.

``ecsearch eval --robust N`` ranks cached tokens against exact item vectors in process; this
bench sends the same queries as a shopper's client would, to ``ecsearch serve`` over a real
index version (IVF-PQ, shards, refine, nprobe as served), and prints the same metrics, so the two
can be compared (issue 12: "a served index reproduces the photo and composed figures"):

- augmented photo → product (default and mild views of ``engine.evaluation.robustness``, seed
  ``EVAL_AUGMENT_SEED``), sent as lossless PNG: Recall@1 / @10 of the query product;
- composed (clean photo + modifier text, ``composed_query_set``), brand + type (all, and those
  with at least 10 relevant products) and attribute phrases (``text_query_set``): Precision@10 /
  nDCG@10, dense retrieval (the server's default).

Usage:
    python bench/bench_served_quality.py var/index-r4 --model var/model_r4 \\
        --catalog ../shared/data/fashion-products --queries 2000
(``--target HOST:PORT`` queries a running server instead of starting one.)
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_grpc import describe_index, start_server  # noqa: E402
from bench.machine import describe_machine  # noqa: E402


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def photo_task(client, queries: list, index: dict, config, top_k: int, nprobe: int | None = None) -> dict:
    """Recall@1 / @10 and MRR@top_k of each query product's augmented photo over gRPC."""
    from engine.evaluation.robustness import EVAL_AUGMENT_SEED
    from engine.model.images import load_image
    from engine.model.augment import augment_photo, view_seed

    ranks = []
    for p in queries:
        view = augment_photo(load_image(p.image), view_seed(EVAL_AUGMENT_SEED, p.image, 0), config)
        hits = [h.product_id for h in client.search(image=_png(view), top_k=top_k, nprobe=nprobe).hits]
        ranks.append(hits.index(p.product_id) if p.product_id in hits else top_k)
    ranks = np.asarray(ranks)
    return {"queries": len(ranks), "recall@1": float((ranks < 1).mean()), "recall@10": float((ranks < 10).mean()),
            f"mrr@{top_k}": float(np.where(ranks < top_k, 1.0 / (ranks + 1), 0.0).mean())}


def served_relevance(client, qs, candidates: list, top_k: int = 10, nprobe: int | None = None) -> np.ndarray:
    """``bool (a, top_k)``: hit j of query i over gRPC is relevant, for a ``QuerySet``
    (``engine.evaluation.robustness``): its text, with the candidate's clean photo where
    ``qs.photos`` names one (composed queries)."""
    position = {p.product_id: i for i, p in enumerate(candidates)}
    rel = np.zeros((len(qs.texts), top_k), dtype=bool)
    for a, (text, photo, key) in enumerate(zip(qs.texts, qs.photos, qs.keys)):
        image = Path(candidates[photo].image).read_bytes() if photo >= 0 else None
        hits = client.search(text=text, image=image, top_k=top_k, nprobe=nprobe).hits
        for j, h in enumerate(hits):
            i = position.get(h.product_id)
            rel[a, j] = i is not None and bool(qs.relevant[key, i])
    return rel


def set_metrics(rel: np.ndarray, qs) -> dict:
    """Precision@k / nDCG@k of ``served_relevance``'s ``rel`` for ``qs`` (k = its width)."""
    from engine.evaluation.ranking_metrics import ndcg_at_k, precision_at_k

    counts = qs.relevant.sum(axis=1)[qs.keys]
    top_k = rel.shape[1]
    return {"queries": len(qs.texts), f"precision@{top_k}": float(precision_at_k(rel, top_k).mean()),
            f"ndcg@{top_k}": float(ndcg_at_k(rel, counts, top_k).mean())}


def set_tasks(client, sets: dict, candidates: list, nprobe: int | None) -> list:
    """``(name, task)`` for each shopper query set; a ``_min10`` subset reads its rows of its
    task's served hits (each query is sent once; ``shopper_query_sets`` lists a task before its subset)."""
    from engine.evaluation.robustness import P10_MIN_RELEVANT, min_relevant_mask

    rels: dict = {}

    def task(name: str, qs) -> dict:
        parent = name.removesuffix("_min10")
        if parent == name:
            rels[name] = served_relevance(client, qs, candidates, 10, nprobe)
            return set_metrics(rels[name], qs)
        return set_metrics(rels[parent][min_relevant_mask(sets[parent], P10_MIN_RELEVANT)], qs)
    return [(name, lambda name=name, qs=qs: task(name, qs)) for name, qs in sets.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("index_root", type=Path)
    parser.add_argument("--model", default=None, help="model folder the server loads (default: the index's)")
    parser.add_argument("--catalog", default="../shared/data/fashion-products")
    parser.add_argument("--queries", type=int, default=2000, help="first N test-split products (as eval --robust N)")
    parser.add_argument("--target", default=None, help="a running server instead of starting one")
    parser.add_argument("--server-args", default="", help="extra `ecsearch serve` arguments")
    parser.add_argument("--nprobe", type=int, default=None, help="per-request nprobe (default: the index's)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args()

    from engine.evaluation.robustness import MILD_AUGMENT, shopper_query_sets
    from engine.model.augment import AugmentConfig
    from engine.training.job import load_products
    from server.client import SearchClient

    everything, _ = load_products(args.catalog, None)
    test, _ = load_products(args.catalog, "test")
    candidates = [p for p in everything if p.title and p.image and Path(p.image).is_file()]
    index = {p.product_id: i for i, p in enumerate(candidates)}
    queries = [p for p in test if p.product_id in index][:args.queries]
    print(describe_machine())
    print(describe_index(args.index_root))
    proc, target = (None, args.target) if args.target else start_server(args.index_root, args.model,
                                                                         args.server_args.split())
    results = {"queries": len(queries), "candidates": len(candidates), "nprobe": args.nprobe or "index default"}
    print(f"nprobe: {args.nprobe or 'the index default'}")
    try:
        with SearchClient(target, timeout_s=60) as client:
            nprobe = args.nprobe
            tasks = [("augmented_photo", lambda: photo_task(client, queries, index, AugmentConfig(), 10, nprobe)),
                     ("augmented_photo_mild", lambda: photo_task(client, queries, index, MILD_AUGMENT, 10, nprobe))]
            tasks += set_tasks(client, shopper_query_sets(queries, SimpleNamespace(products=candidates)), candidates,
                               nprobe)
            for name, task in tasks:
                start = time.perf_counter()
                results[name] = task()
                figures = ", ".join(f"{k} {100 * v:.2f}" if k != "queries" else f"{v} queries"
                                    for k, v in results[name].items())
                print(f"{name} over gRPC: {figures} ({time.perf_counter() - start:.0f} s)", flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
