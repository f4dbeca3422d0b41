"""Index build time, recall@10 vs nprobe (with / without refine) and single-query latency.

Usage:
    python bench/bench_index.py synthetic [--n 1000000] [--dim 256] [--shards 1] [--factory auto]
    python bench/bench_index.py fashion --index ROOT_OR_VERSION      # vectors of a built version
    python bench/bench_index.py fashion --model MODEL_DIR            # encode the catalogue first
    python bench/bench_index.py scale [--n 1000000] [--work DIR]    # streamed 1M / 10M, per refine storage
    python bench/bench_index.py incremental synthetic|fashion ...    # bench/bench_incremental.py

Both build an index version with the indexer's own code (``indexer.version.write_version``:
IVF-PQ training, shards, exact fp16 vectors, LMDB metadata, manifest + checksums), open it with
``indexer.search.open_index`` and measure, for nprobe in 1, 4, 16, 64:

- recall@10 against exact (brute-force inner product) search, with and without refine;
- single-query latency (one query per call, the server's path), mean / p50 / p95 in ms.

Synthetic data: clustered unit vectors (``--clusters`` Gaussian centres, noise ``--sigma``),
queries drawn from the same distribution but not in the index. Fashion: the item vectors
of the catalogue; queries are a sample of item vectors (item-to-item), so the item itself
counts among the exact top 10. Targets (issue 4): 1M build <= 10 min, recall@10 >= 0.95
with refine at <= 2 ms per single query.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import indexer  # noqa: E402,F401  (sets OMP_WAIT_POLICY before faiss loads)
from bench.machine import describe_machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "fashion-products"


def synthetic_vectors(n: int, dim: int, clusters: int, sigma: float, n_queries: int,
                      seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(database float32 (n, d), queries float32 (q, d))``, clustered, rows L2-normalised."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)

    def draw(count: int) -> np.ndarray:
        out = np.empty((count, dim), dtype=np.float32)
        for start in range(0, count, 100_000):
            m = min(100_000, count - start)
            block = centres[rng.integers(0, clusters, m)] + sigma * rng.standard_normal((m, dim), dtype=np.float32)
            out[start:start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
        return out

    return draw(n), draw(n_queries)


def fashion_vectors(args) -> tuple[np.ndarray, list[dict], dict]:
    """Item vectors + records of the fashion catalogue, from a built version or by encoding."""
    from indexer.search import open_index

    if args.index:
        source = args.index
        info = {"source": f"index version at {args.index}"}
    else:
        from indexer.encode import EncodeOptions
        from indexer.pipeline import IndexJobConfig, run_index_job

        root = Path(tempfile.mkdtemp(prefix="bench-index-"))
        t0 = time.perf_counter()
        result = run_index_job(IndexJobConfig(catalog=Path(args.data), model_dir=Path(args.model), index_root=root,
                                              encode=EncodeOptions(workers=args.workers)))
        info = {"source": f"encoded with {args.model}", "pipeline_s": round(time.perf_counter() - t0, 1),
                "pipeline_timings_s": result.manifest["timings_s"], "counts": result.manifest["counts"]}
        source = root
    with open_index(source) as index:
        ids = np.arange(index.n_items)
        vectors = index.vectors(ids)
        names = index._metadata.product_ids(ids[None, :])[0]
    records = [{"product_id": pid} for pid in names]
    return vectors, records, info


def measure(version_dir: Path, queries: np.ndarray, truth: np.ndarray, nprobes: list[int], k: int,
            k_factors: list[int], latency_queries: int) -> list[dict]:
    """One row per (nprobe, refine off / on with each k_factor): recall@k over all queries,
    latency of single queries (one call per query)."""
    from indexer.recall import recall_at_k
    from indexer.search import open_index

    rows = []
    with open_index(version_dir, verify=False) as index:
        for nprobe in nprobes:
            for refine, k_factor in [(False, 1)] + [(True, f) for f in k_factors]:
                _, found = index.search_ids(queries, k, nprobe=nprobe, refine=refine, k_factor=k_factor)
                recall = recall_at_k(found, truth, k)
                for q in queries[:20]:  # warm-up
                    index.search(q[None, :], k, nprobe=nprobe, refine=refine, k_factor=k_factor)
                lat = []
                for q in queries[:latency_queries]:
                    t0 = time.perf_counter()
                    index.search(q[None, :], k, nprobe=nprobe, refine=refine, k_factor=k_factor)
                    lat.append((time.perf_counter() - t0) * 1000)
                lat_ms = np.asarray(lat)
                rows.append({"nprobe": nprobe, "nprobe_used": min(nprobe, index.nlist), "refine": refine,
                             "k_factor": k_factor if refine else None, f"recall_at_{k}": round(recall, 4),
                             "latency_ms_mean": round(float(lat_ms.mean()), 3),
                             "latency_ms_p50": round(float(np.percentile(lat_ms, 50)), 3),
                             "latency_ms_p95": round(float(np.percentile(lat_ms, 95)), 3)})
                label = f"refine k*{k_factor}" if refine else "no refine"
                print(f"  nprobe {nprobe:>3} {label:>12}: recall@{k} {recall:.4f}  "
                      f"latency mean {lat_ms.mean():.3f} ms  p50 {np.percentile(lat_ms, 50):.3f}  "
                      f"p95 {np.percentile(lat_ms, 95):.3f}", flush=True)
    return rows


def self_retrieval(version_dir: Path, batch: int = 2048) -> dict:
    """Share of items whose own vector finds them at rank 1 (default nprobe and refine);
    ``or_tie`` also counts a rank-1 item with the same score (duplicate vectors)."""
    from indexer.search import open_index

    hits = ties = 0
    with open_index(version_dir, verify=False) as index:
        n = index.n_items
        for start in range(0, n, batch):
            ids = np.arange(start, min(start + batch, n))
            q = index.vectors(ids)
            scores, found = index.search_ids(q, 1)
            own = np.einsum("nd,nd->n", q, q)
            hits += int((found[:, 0] == ids).sum())
            ties += int(((found[:, 0] == ids) | (scores[:, 0] >= own - 1e-4)).sum())
        result = {"items": n, "nprobe": index.nprobe_default, "self_at_rank_1": round(hits / n, 4),
                  "self_at_rank_1_or_tie": round(ties / n, 4)}
    print(f"self-retrieval over all {n} items (nprobe {result['nprobe']}, refine): rank 1 {hits / n:.4f}, "
          f"rank 1 or tied {ties / n:.4f}", flush=True)
    return result


def main() -> int:
    if sys.argv[1:2] == ["scale"]:  # bench/bench_scale.py (its own options)
        from bench.bench_scale import main as scale_main

        return scale_main(sys.argv[2:])
    if sys.argv[1:2] == ["incremental"]:  # incremental version vs full build (bench/bench_incremental.py)
        from bench.bench_incremental import main as incremental
        return incremental(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=("synthetic", "fashion"))
    parser.add_argument("--n", type=int, default=1_000_000, help="synthetic: number of vectors")
    parser.add_argument("--dim", type=int, default=256, help="synthetic: dimension")
    parser.add_argument("--clusters", type=int, default=1000, help="synthetic: number of Gaussian centres")
    parser.add_argument("--sigma", type=float, default=1.0, help="synthetic: noise std (centres have std 1)")
    parser.add_argument("--index", help="fashion: index ROOT or version folder to take item vectors from")
    parser.add_argument("--model", help="fashion: model folder to encode the catalogue with")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="fashion catalogue folder")
    parser.add_argument("--workers", type=int, default=2, help="fashion --model: DataLoader workers")
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--factory", default="auto")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--k-factor", type=int, nargs="+", default=[50],
                        help="refine re-scores top k*K candidates; several values = several rows (first: manifest)")
    parser.add_argument("--queries", type=int, default=1000, help="queries for recall")
    parser.add_argument("--latency-queries", type=int, default=300, help="single queries timed per setting")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--plot", help="write the recall@k vs latency curve over nprobe as a PNG here")
    args = parser.parse_args()
    if args.dataset == "fashion" and not (args.index or args.model):
        parser.error("fashion needs --index ROOT_OR_VERSION or --model MODEL_DIR")

    import faiss

    from indexer.recall import exact_search
    from indexer.version import VersionOptions, write_version

    machine = describe_machine()
    print(machine, f"omp_threads={faiss.omp_get_max_threads()}", flush=True)
    info: dict = {}
    t0 = time.perf_counter()
    if args.dataset == "synthetic":
        vectors, queries = synthetic_vectors(args.n, args.dim, args.clusters, args.sigma, args.queries, args.seed)
        records = [{"product_id": str(i)} for i in range(args.n)]
        info = {"source": f"synthetic: {args.n} x {args.dim}, {args.clusters} clusters, sigma {args.sigma}",
                "queries": "held out, same distribution"}
    else:
        vectors, records, info = fashion_vectors(args)
        rng = np.random.default_rng(args.seed)
        queries = vectors[np.sort(rng.choice(len(vectors), size=min(args.queries, len(vectors)), replace=False))]
        info["queries"] = "sample of item vectors (item-to-item)"
    print(f"data: {info['source']} ({time.perf_counter() - t0:.1f} s)", flush=True)

    t0 = time.perf_counter()
    _, truth = exact_search(vectors, queries, args.k)
    exact_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        out = Path(tmp) / "version"
        t0 = time.perf_counter()
        result = write_version(out, "bench", vectors, records,
                               VersionOptions(n_shards=args.shards, factory=args.factory, k_factor=args.k_factor[0],
                                              recall_queries=min(1000, len(vectors)), seed=args.seed))
        build_s = time.perf_counter() - t0
        m = result.manifest
        print(f"build: {build_s:.1f} s for {len(vectors)} vectors ({m['index']['factory']}, {args.shards} shard(s)); "
              f"stages {m['timings_s']}", flush=True)
        print(f"exact search for the ground truth: {exact_s:.1f} s for {len(queries)} queries", flush=True)
        rows = measure(out, queries, truth, args.nprobe, args.k, args.k_factor, args.latency_queries)
        if args.dataset == "fashion":
            info["self_retrieval"] = self_retrieval(out)
        size_bytes = sum(f["size_bytes"] for f in m["files"].values())

    print()
    print(f"| nprobe | refine (k_factor) | recall@{args.k} | latency_ms mean | p50 | p95 |")
    print("|---:|:---:|---:|---:|---:|---:|")
    for r in rows:
        used = "" if r["nprobe_used"] == r["nprobe"] else f" (= nlist {r['nprobe_used']})"
        refine = f"yes ({r['k_factor']})" if r["refine"] else "no"
        print(f"| {r['nprobe']}{used} | {refine} | {r[f'recall_at_{args.k}']:.4f} | "
              f"{r['latency_ms_mean']:.3f} | {r['latency_ms_p50']:.3f} | {r['latency_ms_p95']:.3f} |")
    print(f"\nbuild_s {build_s:.1f} (target <= 600 for 1M), index version size {size_bytes / 2**20:.1f} MiB, "
          f"factory {m['index']['factory']}, nlist {m['index']['nlist']}, k_factor {args.k_factor}")
    best = [r for r in rows if r["refine"] and r[f"recall_at_{args.k}"] >= 0.95]
    if best:
        r = min(best, key=lambda r: r["latency_ms_mean"])
        print(f"fastest setting with recall@{args.k} >= 0.95: nprobe {r['nprobe_used']} with refine "
              f"(k_factor {r['k_factor']}), "
              f"{r['latency_ms_mean']:.3f} ms mean single-query latency")
    else:
        print(f"no measured setting reached recall@{args.k} >= 0.95")
    print(f"machine: {machine}")
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine, "data": info, "build_s": round(build_s, 2),
                                              "build_stages_s": m["timings_s"], "index": m["index"],
                                              "size_bytes": size_bytes, "rows": rows}, indent=2))
    if args.plot:
        from engine.charts import recall_latency_chart
        recall_latency_chart(rows, args.k, args.plot, f"{info['source']}: recall@{args.k} vs latency over nprobe",
                             note=machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
