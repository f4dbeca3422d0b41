"""``ecsearch index``: encode a catalogue and publish a sharded IVF-PQ index version.

Exit status: 0 published; 2 bad input (catalogue, model folder, options); 3 another build
holds the lock of ROOT.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from indexer.encode import EncodeOptions
from indexer.version import VersionOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``ecsearch index`` options to ``parser``."""
    parser.add_argument("--catalog", type=Path,
                        help="fashion folder (styles.csv + images/), JSONL or CSV catalogue; with --base-version: "
                             "the new catalogue, diffed against the base version")
    parser.add_argument("--model", type=Path,
                        help="model folder (engine.model.model_folder); with --base-version: default the base's")
    parser.add_argument("--base-version", default=None,
                        help="incremental build on this version (a name or CURRENT): only changed products are "
                             "encoded, the base's quantizer and codebooks are reused")
    parser.add_argument("--changes", type=Path, default=None,
                        help="with --base-version: JSONL of changes ({'op': 'upsert', 'row': {...}} / "
                             "{'op': 'delete', 'product_id': ...}; see indexer/changes.py)")
    parser.add_argument("--drift-threshold", type=float, default=0.2,
                        help="with --base-version: warn past this share of products changed since the quantizer "
                             "was trained (default 0.2)")
    parser.add_argument("--reuse-quantizer", type=Path, default=None,
                        help="full build: reuse this version's (folder or ROOT) trained quantizer and codebooks")
    parser.add_argument("--index-root", required=True, type=Path, help="ROOT holding versions/ and CURRENT")
    parser.add_argument("--shards", type=int, default=1, help="number of shards (default 1)")
    parser.add_argument("--factory", default="auto", help='faiss factory, e.g. "IVF1024,PQ32"; "IVF,PQ32" or "auto" '
                        'choose nlist (default auto)')
    parser.add_argument("--view", choices=("fused", "image", "text"), default="fused",
                        help="which item embedding to index (default fused)")
    parser.add_argument("--limit", type=int, default=None, help="read at most N catalogue rows")
    parser.add_argument("--keep-versions", type=int, default=3, help="versions to keep under ROOT/versions (K)")
    _add_search_arguments(parser)
    parser.add_argument("--executor", choices=("local", "ray"), default="local", help="local: this process "
                        "(default); ray: Ray Data encode + Ray tasks (pip install 'ecsearch[ray]')")
    parser.add_argument("--ray-address", default=None,
                        help="--executor ray: cluster address (e.g. ray://head:10001 or auto; default: a local Ray)")
    parser.add_argument("--ray-actors", type=int, default=None,
                        help="--executor ray: encoder actors, one model each (default: one per cluster CPU)")
    parser.add_argument("--ray-actor-gpus", type=float, default=0.0, help="--executor ray: GPUs per encoder actor")
    parser.add_argument("--batch-size", type=int, default=32, help="items per item-tower call")
    parser.add_argument("--chunk-size", type=int, default=1024, help="items per resumable chunk")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding images")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="item tower precision; auto: bf16 where the CPU/GPU runs it natively (default auto)")
    parser.add_argument("--token-cache", default=None, type=Path,
                        help="token cache root (e.g. var/cache, what `ecsearch train --cache-dir` wrote): reuse the "
                             "backbone tokens it holds for the same titles and unchanged photos (default: none)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--id-field", default=None, help="catalogue field holding the product id")
    parser.add_argument("--title-field", default=None, help="catalogue field holding the title")
    parser.add_argument("--image-field", default=None,
                        help='field holding the image path/URI, or a template such as "images/{id}.jpg"')
    parser.add_argument("--attribute-fields", default=None, help="comma-separated attribute (facet) fields")
    parser.add_argument("--image-root", default=None, help="folder relative image paths are resolved against")


def _add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the search the version serves by default: nprobe, refine, their recall checks."""
    parser.add_argument("--nprobe", type=int, default=None, help="one nprobe for every query (default: per kind of "
                        "query, the smallest at which its own sample reaches --target-recall; indexer/query_sample.py)")
    parser.add_argument("--target-recall", type=float, default=0.95, help="recall@10 against exact search that the "
                        "item sample and each query kind's sample must reach when nprobe is chosen (default 0.95)")
    parser.add_argument("--photo-target-recall", type=float, default=0.99, help="the same for the kinds of query that "
                        "carry a photo, when their own nprobe is chosen (default 0.99; indexer/nprobe_choice.py)")
    parser.add_argument("--k-factor", type=int, help="refine re-scores top k*K candidates (default: measured)")
    parser.add_argument("--no-refine", action="store_true", help="do not refine by default at search time")
    parser.add_argument("--refine-storage", choices=("fp16_ram", "fp16_mmap", "fp16_pread", "sq8", "none"),
                        default="fp16_ram", help="refine vectors: fp16 in RAM, fp16 memory-mapped from disk, fp16 "
                        "read from disk per candidate (pread), SQ8 in RAM, or none (indexer/refine.py; default fp16_ram)")
    parser.add_argument("--recall-queries", type=int, default=1000, help="item queries for the recall@10 check")
    parser.add_argument("--recall-query-sample", type=int, default=128, help="queries of each kind through the query "
                        "tower for choosing nprobe (indexer/query_sample.py; 0: item queries only)")


def _check(args: argparse.Namespace) -> str | None:
    """The reason the options are unusable, or None."""
    if args.shards < 1 or args.keep_versions < 1 or (args.k_factor is not None and args.k_factor < 1) or args.batch_size < 1 or args.chunk_size < 1:
        return "--shards, --keep-versions, --k-factor, --batch-size, --chunk-size must be >= 1"
    if args.token_cache is not None and not args.token_cache.is_dir():
        return f"--token-cache {args.token_cache}: not a folder"
    if args.base_version is None:
        if args.changes is not None:
            return "--changes needs --base-version"
        if args.catalog is None or args.model is None:
            return "--catalog and --model are required (or --base-version with --changes / --catalog)"
    elif (args.changes is None) == (args.catalog is None):
        return "--base-version needs exactly one of --changes or --catalog"
    elif args.reuse_quantizer is not None:
        return "--reuse-quantizer is for full builds; an incremental build always reuses its base's"
    for flag, value in (("--target-recall", args.target_recall), ("--photo-target-recall", args.photo_target_recall)):
        if not 0 < value <= 1:
            return f"{flag} must lie in (0, 1], got {value}"
    if not 0 < args.drift_threshold:
        return f"--drift-threshold must be > 0, got {args.drift_threshold}"
    if args.executor == "ray":
        if args.base_version is not None:
            return "--executor ray builds full versions; an incremental build runs locally"
        from indexer.errors import BuildError
        from indexer.ray_executor import require_ray

        try:
            require_ray()
        except BuildError as exc:
            return str(exc)
    return None


def _mapping(args: argparse.Namespace):
    from engine.catalog import FieldMapping

    if all(v is None for v in (args.id_field, args.title_field, args.image_field, args.attribute_fields,
                               args.image_root)):
        return None
    return FieldMapping(
        id=args.id_field, title=args.title_field, image=args.image_field,
        attributes=[a.strip() for a in args.attribute_fields.split(",") if a.strip()]
        if args.attribute_fields else None,
        image_root=args.image_root)


def _encode_options(args: argparse.Namespace) -> EncodeOptions:
    return EncodeOptions(view=args.view, batch_size=args.batch_size, chunk_size=args.chunk_size,
                         workers=args.workers, precision=args.precision,
                         token_cache=str(args.token_cache) if args.token_cache else None)


def _job(args: argparse.Namespace):
    """The job to run: a full build or an incremental one (``indexer.incremental``)."""
    if args.base_version is not None:
        from indexer.incremental import IncrementalJobConfig, run_incremental_job

        return lambda: run_incremental_job(IncrementalJobConfig(
            index_root=args.index_root, base_version=args.base_version, changes=args.changes, catalog=args.catalog,
            model_dir=args.model, mapping=_mapping(args), keep_versions=args.keep_versions, device=args.device,
            encode=_encode_options(args), drift_threshold=args.drift_threshold))
    from indexer.pipeline import IndexJobConfig, run_index_job

    return lambda: run_index_job(IndexJobConfig(
        catalog=args.catalog, model_dir=args.model, index_root=args.index_root, mapping=_mapping(args),
        limit=args.limit, keep_versions=args.keep_versions, device=args.device, encode=_encode_options(args),
        executor=args.executor, ray_address=args.ray_address, ray_actors=args.ray_actors,
        ray_actor_gpus=args.ray_actor_gpus,
        version=VersionOptions(n_shards=args.shards, factory=args.factory, nprobe=args.nprobe,
                               k_factor=args.k_factor, refine=not args.no_refine,
                               refine_storage=args.refine_storage, recall_queries=args.recall_queries,
                               target_recall=args.target_recall, photo_target_recall=args.photo_target_recall),
        reuse_quantizer=args.reuse_quantizer, recall_query_sample=args.recall_query_sample))


def run(args: argparse.Namespace) -> int:
    """Run the build; prints the manifest summary as JSON on stdout. Returns the exit status."""
    from engine.catalog import CatalogError
    from engine.model.errors import ModelFolderError
    from indexer.errors import BuildError, IndexVersionError

    problem = _check(args)
    if problem is not None:
        print(f"ecsearch index: {problem}", file=sys.stderr)
        return 2
    try:
        result = _job(args)()
    except BuildError as exc:
        print(f"ecsearch index: {exc}", file=sys.stderr)
        return 3 if "another index build is running" in str(exc) else 2
    except (CatalogError, ModelFolderError, IndexVersionError) as exc:
        print(f"ecsearch index: {exc}", file=sys.stderr)
        return 2
    m = result.manifest
    summary = {"version": result.version, "path": str(result.path), "previous": result.previous,
               "counts": m["counts"], "index": {k: m["index"][k] for k in ("factory", "nlist", "nprobe_default")},
               "recall": m["recall"], "timings_s": m["timings_s"], "sources": (m.get("build") or {}).get("sources")}
    if "incremental" in m:
        summary["incremental"] = m["incremental"]
    print(json.dumps(summary, indent=2))
    return 0
