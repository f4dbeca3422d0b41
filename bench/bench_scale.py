"""``bench/bench_index.py scale``: 1M / 10M vectors through the build and the search, per refine storage.

Usage:
    python bench/bench_index.py scale --n 1000000 [--dim 256] [--work /tmp/scale] [--out results.json]
        [--factory IVF4096,PQ64] [--nprobe 8 16] [--k-factor 50 100] [--storages fp16_pread fp16_mmap ...]

Streams the data so that a 10M x 256 build fits a 24 GB machine: synthetic clustered unit
vectors (``--clusters`` Gaussian centres, noise ``--sigma``) are generated chunk by chunk
(generate -> add to the shards -> write fp16 rows -> fold into the exact top-10 of the held-out
queries -> discard). IVF-PQ is trained once on a sample (``indexer.build.plan_index`` /
``train_index``), the refine files come from ``indexer.refine.write_refine`` and the metadata
from ``indexer.metadata.write_metadata``; one version folder per refine storage (hard links to
the shared files + its own manifest) is then opened in a fresh process
(``indexer.search.open_index``, as the server does) which reports: RSS after open and after the
searches (anonymous and file-backed), recall@10 vs exact per nprobe, single-query latency
(p50 / p95 ms) and batch latency (``--batch`` queries per call). Source: our choice.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def draw_chunk(centres: np.ndarray, sigma: float, count: int, seed: int) -> np.ndarray:
    """float32 (count, d) clustered unit vectors: a random centre + ``sigma`` Gaussian noise, normalised."""
    rng = np.random.default_rng(seed)
    block = centres[rng.integers(0, centres.shape[0], count)] + \
        sigma * rng.standard_normal((count, centres.shape[1]), dtype=np.float32)
    return block / np.linalg.norm(block, axis=1, keepdims=True)


def rss_bytes() -> dict[str, int]:
    """VmRSS / RssAnon / RssFile of this process in bytes (/proc/self/status)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def page_cache_bytes(path: Path) -> int | None:
    """Bytes of ``path`` in the page cache (util-linux ``fincore``), None when it cannot tell."""
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                             capture_output=True, text=True, check=True).stdout
        return int(out.split()[0])
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return None


def _merge_top(best: tuple[np.ndarray, np.ndarray], found: tuple[np.ndarray, np.ndarray], k: int):
    all_s, all_i = np.concatenate([best[0], found[0]], axis=1), np.concatenate([best[1], found[1]], axis=1)
    top = np.argsort(-all_s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(all_s, top, axis=1), np.take_along_axis(all_i, top, axis=1)


def stream_build(args, work: Path, log) -> dict:
    """Generate, train, add and write the shared files into ``work/shared``; returns build info."""
    import faiss

    from indexer.build import ShardBuild, plan_index, train_index
    from indexer.recall import exact_search
    from indexer.shards import assign_shards

    shared = work / "shared"
    shared.mkdir(parents=True, exist_ok=True)
    centres = np.random.default_rng(args.seed).standard_normal((args.clusters, args.dim)).astype(np.float32)
    queries = draw_chunk(centres, args.sigma, args.queries, args.seed + 1)
    plan = plan_index(args.factory, args.n, args.dim)
    timings = {}
    t0 = time.perf_counter()
    trained = train_index(draw_chunk(centres, args.sigma, plan.train_size, args.seed + 2), plan, seed=args.seed)
    timings["train"] = time.perf_counter() - t0
    log(f"train: {plan.factory} on {plan.train_size} vectors in {timings['train']:.1f} s; rss {rss_bytes()}")
    shards = [faiss.clone_index(trained) for _ in range(args.shards)]
    vectors = np.lib.format.open_memmap(shared / "vectors.f16.npy", mode="w+", dtype=np.float16,
                                        shape=(args.n, args.dim))
    truth = (np.full((args.queries, 10), -np.inf, np.float32), np.full((args.queries, 10), -1, np.int64))
    timings.update(add=0.0, truth=0.0, generate=0.0)
    for start in range(0, args.n, args.chunk):
        t0 = time.perf_counter()
        block = draw_chunk(centres, args.sigma, min(args.chunk, args.n - start), args.seed + 10 + start)
        ids = np.arange(start, start + block.shape[0], dtype=np.int64)
        shard_of = assign_shards([str(i) for i in ids], args.shards)
        timings["generate"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        for s, index in enumerate(shards):
            index.add_with_ids(block[shard_of == s], ids[shard_of == s])
        vectors[start:start + block.shape[0]] = block.astype(np.float16)
        timings["add"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        truth = _merge_top(truth, exact_search(vectors[start:start + block.shape[0]], queries, 10, ids=ids), 10)
        timings["truth"] += time.perf_counter() - t0
        log(f"  {start + block.shape[0]} / {args.n} added ({timings['add']:.0f} s add); "
            f"rss {rss_bytes()['VmRSS'] >> 20} MiB")
    vectors.flush()
    del vectors
    builds = []
    for s, index in enumerate(shards):
        name = f"shard_{s:03d}.faiss"
        faiss.write_index(index, str(shared / name))
        builds.append(ShardBuild(name, int(index.ntotal), 0.0))
    del shards
    np.save(work / "queries.npy", queries)
    np.save(work / "truth.npy", truth[1])
    return {"plan": plan, "builds": builds, "timings": timings}


def write_side_files(args, work: Path, log) -> dict[str, float]:
    """Metadata LMDB (product id only) and the refine files of every storage; returns seconds per part."""
    from indexer.metadata import write_metadata
    from indexer.refine import REFINE_FILES, write_refine

    shared = work / "shared"
    timings = {}
    t0 = time.perf_counter()
    timings["map_size"] = write_metadata(shared / "metadata.lmdb", [{"product_id": str(i)} for i in range(args.n)])
    timings["metadata"] = time.perf_counter() - t0
    for name in ("rejects.jsonl", "flags.jsonl"):
        (shared / name).write_text("")
    vectors = np.load(shared / "vectors.f16.npy", mmap_mode="r")
    for storage in [s for s in REFINE_FILES if s in args.storages]:
        t0 = time.perf_counter()
        write_refine(vectors, shared, storage, seed=args.seed)
        timings[f"refine_{storage}"] = time.perf_counter() - t0
        log(f"refine file {storage}: {timings[f'refine_{storage}']:.1f} s; rss {rss_bytes()['VmRSS'] >> 20} MiB")
    return timings


def storage_folders(args, work: Path, built: dict, side: dict) -> dict[str, Path]:
    """One version folder per refine storage: hard links to the shared files + its manifest."""
    from indexer.manifest import describe_file, write_manifest
    from indexer.refine import REFINE_FILES, REFINE_STORAGES, manifest_entry
    from indexer.version import VersionOptions, _manifest

    shared = work / "shared"
    folders = {}
    for storage in [s for s in REFINE_STORAGES if s in args.storages]:
        folder = work / storage
        folder.mkdir(exist_ok=True)
        names = [b.file for b in built["builds"]] + ["vectors.f16.npy", "metadata.lmdb", "rejects.jsonl",
                                                     "flags.jsonl"]
        names += [REFINE_FILES[storage]] if storage in REFINE_FILES else []
        for name in names:
            if not (folder / name).exists():
                os.link(shared / name, folder / name)
        options = VersionOptions(n_shards=args.shards, factory=args.factory, nprobe=args.nprobe[0],
                                 k_factor=args.k_factor[0], refine_storage=storage)
        counts = {"read": args.n, "indexed": args.n, "rejected": 0}
        manifest = _manifest(folder, f"scale-{storage}", (args.n, args.dim), built["plan"], options, built["builds"],
                             side["map_size"], counts, {"bench": "bench_index.py scale"})
        manifest["refine"].update(manifest_entry(storage, REFINE_FILES.get(storage), args.dim))
        for name in names:
            manifest["files"].setdefault(name, describe_file(folder / name))
        write_manifest(folder, manifest)
        folders[storage] = folder
    return folders


def measure_storage(folder: Path, work: Path, nprobes: list[int], batch: int, latency_queries: int,
                    k_factors: list[int] | None = None) -> dict:
    """In this (fresh) process: open the version and measure RSS, recall@10 and latency per
    (nprobe, k_factor) (refine re-scores ``k_factor`` x 10 candidates; None = the manifest's default)."""
    from indexer.recall import recall_at_k
    from indexer.search import open_index

    queries, truth = np.load(work / "queries.npy"), np.load(work / "truth.npy")
    before = rss_bytes()
    t0 = time.perf_counter()
    index = open_index(folder, verify=False)
    out = {"open_s": round(time.perf_counter() - t0, 2), "rss_before": before, "rss_open": rss_bytes(), "rows": []}
    for nprobe, k_factor in [(p, f) for f in (k_factors or [None]) for p in nprobes]:
        _, found = index.search_ids(queries, 10, nprobe=nprobe, k_factor=k_factor)
        for q in queries[:20]:
            index.search_ids(q[None, :], 10, nprobe=nprobe, k_factor=k_factor)
        lat = []
        for q in queries[:latency_queries]:
            t1 = time.perf_counter()
            index.search(q[None, :], 10, nprobe=nprobe, k_factor=k_factor)
            lat.append((time.perf_counter() - t1) * 1000)
        t1 = time.perf_counter()
        n_batches = 0
        for start in range(0, queries.shape[0], batch):
            index.search(queries[start:start + batch], 10, nprobe=nprobe, k_factor=k_factor)
            n_batches += 1
        batch_ms = (time.perf_counter() - t1) * 1000 / n_batches
        out["rows"].append({"nprobe": nprobe, "k_factor": k_factor or index.k_factor_default,
                            "recall_at_10": round(recall_at_k(found, truth, 10), 4),
                            "single_ms_p50": round(float(np.percentile(lat, 50)), 3),
                            "single_ms_p95": round(float(np.percentile(lat, 95)), 3),
                            "batch_size": batch, "batch_ms": round(batch_ms, 2)})
    out["rss_after"] = rss_bytes()
    index.close()
    return out


def _parse(argv: list[str]):
    import argparse

    parser = argparse.ArgumentParser(prog="bench_index.py scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--factory", default="auto")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--k-factor", type=int, nargs="+", default=[50],
                        help="refine candidates per result, measured in turn (the first is the manifest's default)")
    parser.add_argument("--storages", nargs="+", default=None, help="refine storages to build and measure "
                        "(default: all of indexer.refine.REFINE_STORAGES)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--latency-queries", type=int, default=300)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--chunk", type=int, default=250_000, help="vectors generated and added at a time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ecsearch-scale"), help="folder for the versions")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--build-only", action="store_true", help="build into --work and stop (no measuring)")
    parser.add_argument("--measure-only", action="store_true",
                        help="measure the versions an earlier --build-only run left in --work (same --storages)")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # internal: measure one folder
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    """The ``scale`` subcommand. Prints progress and a table; returns the exit status."""
    sys.path.insert(0, str(REPO))
    import indexer  # noqa: F401  (sets OMP_WAIT_POLICY before faiss loads)
    from bench.machine import describe_machine

    args = _parse(argv)
    from indexer.refine import REFINE_STORAGES

    args.storages = args.storages or list(REFINE_STORAGES)
    unknown = sorted(set(args.storages) - set(REFINE_STORAGES))
    if unknown:
        raise SystemExit(f"unknown refine storage(s) {unknown}; expected some of {', '.join(REFINE_STORAGES)}")
    if args.measure:
        print(json.dumps(measure_storage(args.measure, args.work, args.nprobe, args.batch, args.latency_queries,
                                         args.k_factor)))
        return 0

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    machine = describe_machine()
    log(machine)
    if args.measure_only:  # a build of an earlier --build-only run, measured now (e.g. under a bench lock)
        results = json.loads((args.work / "build.json").read_text())
        folders = {storage: args.work / storage for storage in args.storages}
    else:
        results, folders = _build(args, machine, log)
        (args.work / "build.json").write_text(json.dumps(results, indent=2))
    if args.build_only:
        log(f"built into {args.work} ({results['build_s']} s); measure with --measure-only")
        return 0
    results["machine"] = machine
    for storage, folder in folders.items():
        cached_before = page_cache_bytes(folder / "vectors.f16.npy")
        proc = subprocess.run([sys.executable, __file__, "--measure", str(folder), "--work", str(args.work),
                               "--nprobe", *map(str, args.nprobe), "--batch", str(args.batch),
                               "--latency-queries", str(args.latency_queries), "--k-factor", *map(str, args.k_factor)],
                              capture_output=True, text=True, check=True)
        measured = json.loads(proc.stdout.strip().splitlines()[-1])
        measured["disk_bytes"] = sum((folder / f).stat().st_size for f in os.listdir(folder) if f != "manifest.json")
        measured["vectors_page_cache_bytes"] = [cached_before, page_cache_bytes(folder / "vectors.f16.npy")]
        results["storages"][storage] = measured
        log(f"{storage}: {json.dumps(measured)}")
    print_table(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


def _build(args, machine: str, log) -> tuple[dict, dict[str, Path]]:
    """Generate, build and write one version folder per storage; returns (results so far, folders)."""
    t_all = time.perf_counter()
    built = stream_build(args, args.work, log)
    side = write_side_files(args, args.work, log)
    folders = storage_folders(args, args.work, built, side)
    build_s = time.perf_counter() - t_all
    results = {"machine_build": machine, "n": args.n, "dim": args.dim, "factory": built["plan"].factory,
               "build_s": round(build_s, 1), "build_stages_s": {k: round(v, 1) for k, v in
                                                             {**built["timings"], **side}.items() if k != "map_size"},
               "storages": {}}
    return results, folders


def print_table(results: dict) -> None:
    """The README table: one row per (storage, nprobe)."""
    n = results["n"]
    print(f"\n{n:,} x {results['dim']}, {results['factory']}, build {results['build_s']} s "
          f"(stages {results['build_stages_s']})")
    print("| refine storage | nprobe | k_factor | recall@10 | single query p50 / p95 ms | batch ms (per query) | "
          "disk B/product | RSS anon B/product | RSS file B/product | process RSS GiB (anon + file) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    notes = []
    for storage, m in results["storages"].items():
        anon = (m["rss_after"]["RssAnon"] - m["rss_before"]["RssAnon"]) / n
        file = (m["rss_after"]["RssFile"] - m["rss_before"]["RssFile"]) / n
        whole = f"{m['rss_after']['RssAnon'] / 2**30:.2f} + {m['rss_after']['RssFile'] / 2**30:.2f}"
        cached = m.get("vectors_page_cache_bytes", [None, None])
        if None not in cached:
            notes.append(f"{storage}: vectors.f16.npy in the page cache {cached[0] / 2**30:.2f} GiB before, "
                         f"{cached[1] / 2**30:.2f} GiB after (of {n * results['dim'] * 2 / 2**30:.2f})")
        for r in m["rows"]:
            print(f"| {storage} | {r['nprobe']} | {r['k_factor']} | {r['recall_at_10']:.4f} | "
                  f"{r['single_ms_p50']:.3f} / {r['single_ms_p95']:.3f} | {r['batch_ms']:.1f} "
                  f"({r['batch_ms'] / r['batch_size']:.3f}) | {m['disk_bytes'] / n:.0f} | {anon:.0f} | {file:.0f} | "
                  f"{whole} |")
    for note in notes:
        print(note)
    print(f"machine: {results['machine']}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
