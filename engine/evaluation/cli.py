"""``ecsearch eval``: nine-scenario evaluation of a model folder on the test split, with baselines.

Example::

    ecsearch eval --model var/model --catalog ../shared/data/fashion-products \\
        --out var/eval/results.json --markdown var/eval/results.md

Writes a JSON file (every number, timings, pool size, excluded products) and prints / writes
the markdown tables. Baselines (issue 12 item 5): the raw pretrained backbone features with no
tower (``engine.evaluation.evaluate.raw_backbone_rows``), the trained CLIP-style linear two-tower stored in
the model folder (``engine.training.linear_baseline``; left out when the folder has none), the
trained towers' own average of views (the ablation row "m = average of T and V") and, for a model
with a cross-modal block, that block's closed-form CCA alone on t2i / i2t (``cross_block_rows``).
``--robust N`` adds the robustness tasks of ``engine.evaluation.robustness`` (augmented photos, brand +
type, attribute phrases, composed queries; against every catalogue product read). Paired comparisons
(``engine.evaluation.significance``): the fused row against the average of its views on every m scenario
and against the linear two-tower on every cross-modal scenario (difference, 95 % bootstrap interval,
sign test), in the JSON under ``comparisons`` and as tables after the nine scenarios'. The row "photo
queries in two stages (served)" is the fused row with photo-only queries ranked as the server ranks
them (``engine.retrieval.instance_first``); it is compared the same way on its photo-query scenarios.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from engine.catalog import CatalogError
from engine.model.errors import ModelFolderError

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``eval`` options."""
    parser.add_argument("--model", required=True, help="model folder (config.json + model.safetensors)")
    parser.add_argument("--catalog", required=True, help="catalogue (fashion folder with split.csv)")
    parser.add_argument("--split", default="test", help="pool: products of this split; 'all' for every product")
    parser.add_argument("--limit", type=int, default=None, help="read at most N catalogue rows")
    parser.add_argument("--cache-dir", default="var/cache", help="backbone token cache root")
    parser.add_argument("--out", default=None, help="JSON results file to write")
    parser.add_argument("--markdown", default=None, help="markdown tables file to write")
    parser.add_argument("--plot", default=None, help="PNG bar chart of the scenarios against the baselines")
    parser.add_argument("--plot-metric", default="recall@10", help="metric the --plot chart shows")
    parser.add_argument("--seed", type=int, default=0, help="seed of the attribute queries' representative photos")
    parser.add_argument("--no-ablation", action="store_true",
                        help="leave out the trained model's own text-only / image-only / average rows")
    parser.add_argument("--no-reference", action="store_true",
                        help="leave out the raw-backbone rows (pretrained features, no training: text-only t2t, "
                             "image-only i2i, concatenation on the m scenarios)")
    parser.add_argument("--own-photo", type=int, default=0, metavar="N",
                        help="also rank the photo of each of the first N catalogue products (any split; query "
                             "tower, image only) against those N products' fused item vectors; 0: off")
    parser.add_argument("--robust", type=int, default=0, metavar="N",
                        help="robustness evaluation (engine/evaluation/robustness.py): the first N products of the split as "
                             "augmented-photo, brand + type, attribute-phrase and composed queries, ranked against "
                             "the whole catalogue (caches every catalogue product once); 0: off")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def paired_comparisons(per_query: dict, seed: int = 0) -> dict:
    """The paired comparisons ``ecsearch eval`` reports (``engine.evaluation.significance``): the fused
    row against the average of its own views on every m scenario, and against the linear two-tower
    on every cross-modal scenario; the served row (photo queries in two stages) the same way on the
    scenarios where it differs; each on recall@1 and nDCG@10. A comparison whose rows were not
    scored (``--no-ablation``, no linear baseline in the folder) is left out.
    Returns ``{title: {scenario: {metric: PairedComparison as a dict}}}``."""
    from engine.evaluation.significance import (AVERAGE, CROSS_MODAL_SCENARIOS, FUSED, M_SCENARIOS,
                                                PHOTO_QUERY_SCENARIOS, SERVED, compare_rows)
    from engine.training.linear_baseline import LINEAR_ROW

    def photo(scenarios: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(s for s in scenarios if s in PHOTO_QUERY_SCENARIOS)

    plans = {"trained (fused) against the average of its own views": (FUSED, AVERAGE, M_SCENARIOS),
             "trained (fused) against the linear two-tower": (FUSED, LINEAR_ROW, CROSS_MODAL_SCENARIOS),
             "served (photo queries in two stages) against the average of its own views":
                 (SERVED, AVERAGE, photo(M_SCENARIOS)),
             "served (photo queries in two stages) against the linear two-tower":
                 (SERVED, LINEAR_ROW, photo(CROSS_MODAL_SCENARIOS))}
    return {title: compare_rows(per_query, a, b, scenarios, seed=seed)
            for title, (a, b, scenarios) in plans.items() if a in per_query and b in per_query}


def run(args: argparse.Namespace) -> int:
    """Run the evaluation; prints the markdown tables. Returns 0, or 2 on unusable input."""
    import torch

    from engine.evaluation.evaluate import (build_pool, cross_block_rows, evaluate_models, linear_per_query,
                                            markdown_tables, means, own_photo_ranks, raw_backbone_rows)
    from engine.training.linear_baseline import LINEAR_ROW, load_linear_baseline
    from engine.model.model_folder import load_model
    from engine.training.job import TrainingDataError, load_products

    from engine.evaluation.evaluate import ATTRIBUTE_METRICS, INSTANCE_METRICS, SERVED_FORM
    from engine.evaluation.significance import FUSED, SERVED

    if args.plot and args.plot_metric not in INSTANCE_METRICS + ATTRIBUTE_METRICS:
        print(f"ecsearch eval: error: --plot-metric {args.plot_metric!r} is not one of "
              f"{', '.join(INSTANCE_METRICS + ATTRIBUTE_METRICS)}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        model = load_model(args.model)
        products, _ = load_products(args.catalog, None if args.split == "all" else args.split, args.limit)
        pool = build_pool(products, model.backbones, args.cache_dir, seed=args.seed, progress=not args.quiet)
    except (CatalogError, TrainingDataError, ModelFolderError, FileNotFoundError, ValueError) as exc:
        print(f"ecsearch eval: error: {exc}", file=sys.stderr)
        return 2
    linear = load_linear_baseline(args.model)
    rows = {FUSED: ("trained", "fused"), SERVED: ("trained", SERVED_FORM)}
    if not args.no_ablation:
        rows.update({"trained, m = text-only view": ("trained", "text"),
                     "trained, m = image-only view": ("trained", "image"),
                     "trained, m = average of T and V": ("trained", "average")})
    result = evaluate_models({"trained": model}, pool, rows)
    if linear is not None:
        result["per_query"][LINEAR_ROW] = linear_per_query(linear, pool)
        result["rows"][LINEAR_ROW] = means(result["per_query"][LINEAR_ROW])
    comparisons = paired_comparisons(result["per_query"], seed=args.seed)
    result["rows"].update(cross_block_rows(model, pool))
    if not args.no_reference:
        result["rows"].update(raw_backbone_rows(pool))
    own_photo = None
    if args.own_photo > 0:
        try:
            first, _ = load_products(args.catalog, None, args.own_photo)
            photo_pool = build_pool(first, model.backbones, args.cache_dir, seed=args.seed, progress=not args.quiet)
        except (CatalogError, TrainingDataError, ValueError) as exc:
            print(f"ecsearch eval: error: --own-photo: {exc}", file=sys.stderr)
            return 2
        ranks = own_photo_ranks(model, photo_pool)
        own_photo = {"products": len(photo_pool.products), "excluded": photo_pool.excluded,
                     "rank1": float((ranks == 1).mean()), "recall@5": float((ranks <= 5).mean()),
                     "mean_rank": float(ranks.mean())}
    robust = None
    if args.robust > 0:
        from engine.evaluation.robustness import evaluate_robustness, robustness_markdown

        try:
            everything, _ = load_products(args.catalog, None, args.limit)
            catalogue = build_pool(everything, model.backbones, args.cache_dir, seed=args.seed,
                                   progress=not args.quiet)
            robust = evaluate_robustness(model, pool.products[:args.robust], catalogue, args.cache_dir,
                                         progress=not args.quiet, linear=linear)
        except (CatalogError, TrainingDataError, ValueError) as exc:
            print(f"ecsearch eval: error: --robust: {exc}", file=sys.stderr)
            return 2
    seconds = time.perf_counter() - start
    tables = markdown_tables(result["rows"])
    if comparisons:
        from engine.evaluation.significance import comparisons_markdown
        tables += "\n" + comparisons_markdown(comparisons)
    if robust is not None:
        tables += "\n" + robustness_markdown(robust)
    report = {
        "model": str(args.model), "fingerprint": model.fingerprint, "catalog": str(args.catalog),
        "split": args.split, "pool_size": len(pool.products), "attribute_queries": len(pool.query_phrases),
        "excluded": pool.excluded, "rows": result["rows"], "comparisons": comparisons, "own_photo": own_photo,
        "robustness": robust,
        "seconds": {"total": seconds, "cache": pool.cache_seconds, **result["seconds"]},
        "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    header = (f"pool: {len(pool.products)} products ({len(pool.excluded)} excluded), "
              f"{len(pool.query_phrases)} attribute queries; eval {seconds:.1f} s "
              f"(cache {pool.cache_seconds:.1f} s)\n")
    if own_photo is not None:
        header += (f"own photo -> product, first {own_photo['products']} catalogue products (query tower image-only "
                   f"vs item tower fused): rank 1 {100 * own_photo['rank1']:.2f} %, "
                   f"recall@5 {100 * own_photo['recall@5']:.2f} %\n")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(header + "\n" + tables)
    if args.plot:
        from engine.charts import scenario_chart
        try:
            scenario_chart(result["rows"], args.plot_metric, args.plot,
                           f"{args.plot_metric} per scenario, {len(pool.products)} {args.split} products",
                           note=f"model {args.model} (fingerprint {model.fingerprint[:12]}), catalogue {args.catalog}")
        except ValueError as exc:
            print(f"ecsearch eval: error: --plot: {exc}", file=sys.stderr)
            return 2
    print(header)
    print(tables)
    return 0
