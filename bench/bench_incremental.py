"""Incremental index version vs full build: 1 % of the products changed.

Usage:
    python bench/bench_index.py incremental synthetic [--n 1000000] [--dim 256] [--changed 0.01]
    python bench/bench_index.py incremental fashion --index-root ROOT [--changed 0.01]

synthetic: a full build of n clustered unit vectors (``indexer.version.write_version``: k-means
training, shards, fp16 vectors, LMDB metadata, recall check) is timed, then an incremental
version on it (``indexer.incremental.write_changed_version``: half the changed share
upserted with fresh vectors, a quarter new products, a quarter deleted), both without the
encode stage (the vectors are given).

fashion: ROOT holds a full build of the catalogue (``ecsearch index``, its wall time in the
manifest's stages and in ``--full-s`` when given); the changed share of its products is
rewritten (new titles; every fifth a new photo, taken from another product), some deleted
and some added as new products, and ``ecsearch index --base-version CURRENT --changes`` runs
with the same model: the incremental build's wall time includes loading the model and
encoding the upserts. Source: our choice.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def _split(n_changed: int) -> tuple[int, int, int]:
    """(replaced, added, deleted): half, a quarter, the rest of the changed products."""
    replaced = n_changed // 2
    added = n_changed // 4
    return replaced, added, n_changed - replaced - added


def synthetic(args) -> dict:
    """Time a full build and an incremental version of 1 % changes at ``args.n`` vectors."""
    from bench.bench_index import synthetic_vectors
    from engine.catalog import Product
    from indexer.changes import ChangeSet
    from indexer.encode import EncodeResult
    from indexer.incremental import base_product_ids, write_changed_version
    from indexer.base_version import BaseVersion
    from indexer.version import VersionOptions, write_version

    n_changed = max(4, int(round(args.n * args.changed)))
    replaced, added, deleted = _split(n_changed)
    vectors, fresh = synthetic_vectors(args.n, args.dim, args.clusters, args.sigma, replaced + added, args.seed)
    records = [{"product_id": str(i)} for i in range(args.n)]
    rng = np.random.default_rng(args.seed + 1)
    picked = rng.choice(args.n, size=replaced + deleted, replace=False)
    upserts = [Product(str(i), None, None) for i in picked[:replaced]] + \
        [Product(f"new-{j}", None, None) for j in range(added)]
    changes = ChangeSet(upserts=upserts, deletes=[str(i) for i in picked[replaced:]], read_count=n_changed,
                        source="synthetic")
    encoded = EncodeResult(fresh, list(range(len(upserts))))
    with tempfile.TemporaryDirectory(prefix="bench-incremental-", dir=args.tmp) as tmp:
        full_dir = Path(args.keep_full) if args.keep_full else Path(tmp) / "full"
        if (full_dir / "bench-full.json").is_file():  # a kept full build of the same data
            full_s, full_stages = json.loads((full_dir / "bench-full.json").read_text())
            print(f"full build: {full_s:.1f} s (measured earlier, kept in {full_dir})", flush=True)
        else:
            t0 = time.perf_counter()
            full = write_version(full_dir, "full", vectors, records, VersionOptions(seed=args.seed))
            full_s, full_stages = time.perf_counter() - t0, full.manifest["timings_s"]
            (full_dir / "bench-full.json").write_text(json.dumps([full_s, full_stages]))
            print(f"full build: {full_s:.1f} s, stages {full_stages}", flush=True)
        del vectors
        t0 = time.perf_counter()
        with BaseVersion(full_dir) as base:
            options = VersionOptions(n_shards=1, factory=base.manifest["index"]["factory"], nprobe=base.nprobe_default,
                                     k_factor=base.k_factor_default)
            manifest, timings = write_changed_version(base, base_product_ids(base), changes, encoded,
                                                      Path(tmp) / "incremental", "incremental", options, {},
                                                      "changes", log=lambda m: print(m, flush=True))
        incremental_s = time.perf_counter() - t0
    print(f"incremental: {incremental_s:.1f} s, stages {timings}", flush=True)
    return {"n": args.n, "dim": args.dim, "changed": n_changed, "replaced": replaced, "added": added,
            "deleted": deleted, "full_s": round(full_s, 2), "full_stages_s": full_stages,
            "incremental_s": round(incremental_s, 2),
            "incremental_stages_s": {k: round(v, 3) for k, v in timings.items()},
            "ratio": round(incremental_s / full_s, 4), "recall": manifest["recall"]}


def _fashion_changes(root: Path, share: float, seed: int, out: Path) -> dict:
    """Write a changes file touching ``share`` of the CURRENT version's products."""
    from indexer.search import open_index

    with open_index(root) as index:
        records = index._metadata.records(range(index.n_items))
    rng = np.random.default_rng(seed)
    n_changed = max(4, int(round(len(records) * share)))
    replaced, added, deleted = _split(n_changed)
    picked = rng.choice(len(records), size=replaced + deleted + added, replace=False)
    lines = []
    for n, i in enumerate(picked[:replaced]):
        r = records[i]
        row = {"id": r["product_id"], **r["attributes"], "productDisplayName": f"{r['title']} (new season)"}
        change = {"op": "upsert", "row": row}
        if n % 5 == 0:
            change["image"] = records[picked[-1 - n]]["image"]  # a new photo: another product's
        lines.append(change)
    lines += [{"op": "delete", "product_id": records[i]["product_id"]} for i in picked[replaced:replaced + deleted]]
    for j, i in enumerate(picked[replaced + deleted:]):  # new products: a copy of an existing one, new id
        r = records[i]
        lines.append({"op": "upsert", "image": r["image"],
                      "row": {"id": f"9{j:05d}", **r["attributes"], "productDisplayName": f"{r['title']} II"}})
    out.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in lines), encoding="utf-8")
    return {"changed": n_changed, "replaced": replaced, "added": added, "deleted": deleted,
            "new_photos": (replaced + 4) // 5}


def fashion(args) -> dict:
    """Time ``ecsearch index --base-version CURRENT --changes`` on ROOT (a full build's root)."""
    from indexer.incremental import IncrementalJobConfig, run_incremental_job
    from indexer.manifest import read_manifest
    from indexer.publish import resolve_version_dir

    root = Path(args.index_root)
    base = read_manifest(resolve_version_dir(root))
    changes = root.parent / "bench-changes.jsonl"
    info = _fashion_changes(root, args.changed, args.seed, changes)
    t0 = time.perf_counter()
    result = run_incremental_job(IncrementalJobConfig(index_root=root, changes=changes, keep_versions=10))
    incremental_s = time.perf_counter() - t0
    stages = base["timings_s"]
    full_s = args.full_s or stages["read"] + stages["encode"] + stages["version_total"]
    return {**info, "products": base["counts"]["indexed"], "base_version": base["version"],
            "full_s": round(full_s, 1), "full_stages_s": stages, "incremental_s": round(incremental_s, 1),
            "incremental_stages_s": result.manifest["timings_s"], "ratio": round(incremental_s / full_s, 4),
            "counts": result.manifest["counts"], "recall": result.manifest["recall"]}


def main(argv: list[str] | None = None) -> int:
    from bench.machine import describe_machine

    parser = argparse.ArgumentParser(prog="bench_index.py incremental", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=("synthetic", "fashion"))
    parser.add_argument("--n", type=int, default=1_000_000, help="synthetic: number of vectors")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--changed", type=float, default=0.01, help="share of products changed (default 0.01)")
    parser.add_argument("--index-root", help="fashion: ROOT holding a full build (CURRENT)")
    parser.add_argument("--full-s", type=float, default=None, help="fashion: the full build's wall time, if known")
    parser.add_argument("--tmp", default=None, help="synthetic: folder for the temporary versions")
    parser.add_argument("--keep-full", default=None,
                        help="synthetic: keep the full build in this folder and reuse it when rerun (same --n/--seed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.dataset == "fashion" and not args.index_root:
        parser.error("fashion needs --index-root ROOT")
    machine = describe_machine()
    print(machine, flush=True)
    result = synthetic(args) if args.dataset == "synthetic" else fashion(args)
    result["machine"] = machine
    print(f"\nfull build {result['full_s']} s, incremental ({result['changed']} changed: {result['replaced']} "
          f"replaced, {result['added']} added, {result['deleted']} deleted) {result['incremental_s']} s: "
          f"{100 * result['ratio']:.1f} % of the full build (target <= 10 %)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0
