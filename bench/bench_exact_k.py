"""What exact k costs: a dense search widened until it returns min(k, matching) hits
(``indexer.widening``) against the first IVF round alone (what Search did before issue 14).

Usage:
    python bench/bench_exact_k.py [INDEX_ROOT] [--items 11882] [--dim 256] [--queries 200] [--repeat 3]

Without INDEX_ROOT a version is built in a temporary folder from synthetic clustered unit
vectors with the fashion index's shape (11,882 items, d = 256, factory "auto" = IVF256,PQ32,
2 shards, nprobe 4, refine k_factor 50) and the first 11,882 catalogue records (for the
filter), so the lists hold what the real ones hold on average. Queries are
item vectors plus noise. For each k (10, 100, 1000) and filter (none; one colour = a few
hundred items, searched with the IVF id selector instead of the exact shortcut): mean hits
returned and ms per query, first round alone vs widened, A/B interleaved ``--repeat`` times.
Prints the machine line (``bench.machine``). Source: our choice.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import describe_machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("ECSEARCH_DATA", REPO.parent / "shared" / "data" / "fashion-products"))


def build(root: Path, items: int, dim: int, data: Path) -> Path:
    from engine.catalog import read_catalog
    from indexer.publish import new_version_id, publish_version, tmp_dir
    from indexer.version import VersionOptions, write_version

    products = read_catalog(data, limit=items).products
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((200, dim))
    x = centres[rng.integers(0, 200, len(products))] + 0.7 * rng.standard_normal((len(products), dim))
    vectors = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    records = [{"product_id": p.product_id, "title": p.title, "attributes": p.attributes} for p in products]
    version = new_version_id()
    staged = tmp_dir(root) / f"stage-{version}"
    write_version(staged, version, vectors, records, VersionOptions(n_shards=2, nprobe=4, recall_queries=100,
                                                                  self_queries=500), log=lambda _m: None)
    return publish_version(root, staged, version)


def first_round(index, q: np.ndarray, k: int, allowed) -> np.ndarray:
    """The search as it was before widening: one IVF round at the default nprobe."""
    ids = None if allowed is None else np.asarray(allowed, dtype=np.int64)
    return index._search_once(q, k, index.nprobe_default, ids, index.refine_default, index.k_factor_default)[1]


def timed(fn, queries: np.ndarray) -> tuple[float, float]:
    """(mean hits, ms per query) of ``fn(one query (1, d)) -> ids (1, k)`` over ``queries``."""
    hits = 0
    t0 = time.perf_counter()
    for row in range(queries.shape[0]):
        hits += int((fn(queries[row:row + 1]) >= 0).sum())
    return hits / queries.shape[0], (time.perf_counter() - t0) * 1e3 / queries.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("index_root", type=Path, nargs="?")
    parser.add_argument("--items", type=int, default=11_882)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    import faiss

    from indexer.search import open_index

    faiss.omp_set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.index_root or build(Path(tmp), args.items, args.dim, args.data)
        with open_index(root) as index:
            print(f"machine: {describe_machine()}")
            print(f"index:   {index!r} nlist={index.nlist} nprobe={index.nprobe_default} "
                  f"factory={index.manifest['index']['factory']} refine={index.refine_default} "
                  f"k_factor={index.k_factor_default} (faiss 1 thread)")
            rng = np.random.default_rng(1)
            rows = rng.choice(index.n_items, size=min(args.queries, index.n_items), replace=False)
            q = index.vectors(rows) + 0.3 * rng.standard_normal((rows.size, index.dim)).astype(np.float32)
            q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
            colour = index.ids_with({"baseColour": "Purple"})
            print("| k | filter | matching | first round: hits | ms/query | widened: hits | ms/query | widened share |")
            print("|---:|---|---:|---:|---:|---:|---:|---:|")
            for filt, allowed in (("none", None), (f"baseColour=Purple, IVF selector", colour)):
                index.exact_filter_max = 0 if allowed is not None else index.exact_filter_max
                for k in (10, 100, 1000):
                    a, b = [], []
                    for _ in range(args.repeat):  # A/B interleaved
                        a.append(timed(lambda one: first_round(index, one, k, allowed), q))
                        b.append(timed(lambda one: index.search_ids(one, k, allowed=allowed)[1], q))
                    share = float(index.search_served(q, k, allowed=allowed).widened.mean())
                    matching = index.n_items if allowed is None else allowed.size
                    print(f"| {k} | {filt} | {matching} | {a[0][0]:.1f} | {min(t for _, t in a):.3f} "
                          f"| {b[0][0]:.1f} | {min(t for _, t in b):.3f} | {100 * share:.0f} % |", flush=True)
    print("ms/query: best of --repeat interleaved runs, one query per call, faiss on one thread")


if __name__ == "__main__":
    main()
