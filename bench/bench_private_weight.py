"""The image-private block's weight in the fused item vector: augmented-photo Recall@1 against the
photo query's attribute-level nDCG@10 (i2m), one curve (issue 12; our probe).

A photo-only query is almost all image-private block (``engine.model.private_block``: gain 6 on
photo-only queries), which finds the query's own product under a shopper's augmentation but ranks
the *other* products by whitened instance features rather than by type, colour and gender: the
fused item vectors lose attribute-level nDCG@10 on i2m to the average of the model's own views,
whose image-private part weighs less. This bench scales the image-private slice of every fused
item vector by ``s`` (then re-normalises), the same as an item-tower gain ``s`` for items with a
title and a photo, and prints per ``s``:

- augmented photo Recall@1: the robustness task's queries (``engine.evaluation.robustness``,
  default views, seed ``EVAL_AUGMENT_SEED``; the first ``--queries`` test products) against every
  catalogue product, exact search;
- i2m Recall@1 and attribute nDCG@10 on the test pool (``engine.evaluation.evaluate``'s nine
  scenarios), with the average of views (unchanged by ``s``) as the reference line.

The served ranking leaves this trade-off: photo-only queries are ranked in two stages, the whole
vector's best product first, then the vector without its image-private block
(``engine.retrieval.instance_first``; ``ecsearch eval``'s served row).

Usage:
    python bench/bench_private_weight.py --model var/model --catalog ../shared/data/fashion-products \\
        --cache-dir var/cache --scales 1,0.8,0.6,0.5,0.45
Reads the token cache ``ecsearch eval`` fills; nothing is written but cache entries.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.machine import describe_machine  # noqa: E402


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def scale_slice(vectors: np.ndarray, columns: slice, s: float) -> np.ndarray:
    """``vectors float32 (n, d)`` with ``columns`` times ``s``, each row re-normalised (a copy)."""
    out = vectors.copy()
    out[:, columns] *= s
    return _unit(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--catalog", default="../shared/data/fashion-products")
    parser.add_argument("--cache-dir", default="var/cache")
    parser.add_argument("--queries", type=int, default=2000, help="augmented photo queries: the first N test products")
    parser.add_argument("--scales", default="1,0.9,0.8,0.7,0.6,0.5,0.45")
    args = parser.parse_args(argv)
    scales = [float(x) for x in args.scales.split(",")]

    from engine.evaluation.evaluate import build_pool, embed_pool, item_views, tower_views
    from engine.evaluation.ranking_metrics import attribute_metrics, instance_metrics, rank_of_targets
    from engine.evaluation.robustness import augmented_photo_queries
    from engine.model.augment import AugmentConfig
    from engine.model.model_folder import load_model
    from engine.training.job import load_products

    print(describe_machine())
    start = time.perf_counter()
    model = load_model(args.model)
    model.eval()
    fusion = model.item_tower.fusion
    if fusion.private is None:
        print(f"{args.model}: the model has no image-private block; nothing to scale", file=sys.stderr)
        return 2
    d = fusion.merge.out_features
    columns = slice(d, d + fusion.private.dim)  # layout: [F | image-private | text-private | cross]
    test, _ = load_products(args.catalog, "test", None)
    pool = build_pool(test, model.backbones, args.cache_dir, progress=False)
    emb = embed_pool(model, pool)
    everything, _ = load_products(args.catalog, None, None)
    catalogue = build_pool(everything, model.backbones, args.cache_dir, progress=False)
    item_f = item_views(model, catalogue, tower_views(model.item_tower, catalogue.texts, catalogue.images,
                                                      catalogue.text_rows, catalogue.image_rows, 256, views=("F",)),
                        args.cache_dir, False)["F"]
    known = {p.product_id for p in catalogue.products}
    photo_q = [p for p in pool.products[:args.queries] if p.product_id in known]
    q_v, _, targets = augmented_photo_queries(model, photo_q, catalogue, args.cache_dir, AugmentConfig())
    rep_v = emb.query["V"][pool.query_reps]

    def i2m(items: np.ndarray) -> tuple[float, float]:
        ranks = rank_of_targets(emb.query["V"], items, np.arange(len(items)), with_ties=True)
        r1 = instance_metrics(*ranks)["recall@1"]
        nd = attribute_metrics(rep_v, items, pool.query_groups, pool.groups, exclude=pool.query_reps)["ndcg@10"]
        return 100 * r1, 100 * nd

    r1, nd = i2m(_unit(emb.item["T"] + emb.item["V"]))
    print(f"{len(targets)} augmented photo queries against {len(catalogue.products)} products; "
          f"{len(pool.products)} test products, {len(pool.query_groups)} attribute queries")
    print(f"average of views (reference): i2m Recall@1 {r1:.2f}, i2m attribute nDCG@10 {nd:.2f}")
    print("| image-private weight in item F | augmented photo Recall@1 | i2m Recall@1 | i2m attribute nDCG@10 |")
    print("|---:|---:|---:|---:|")
    for s in scales:
        aug = instance_metrics(*rank_of_targets(q_v, scale_slice(item_f, columns, s), targets, with_ties=True))
        r1, nd = i2m(scale_slice(emb.item["F"], columns, s))
        print(f"| {s:g} | {100 * aug['recall@1']:.2f} | {r1:.2f} | {nd:.2f} |")
    print(f"wall {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
