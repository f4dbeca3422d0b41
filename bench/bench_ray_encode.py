"""Encode-stage throughput of the Ray executor against the local one, interleaved A/B runs.

Usage: python bench/bench_ray_encode.py --model MODEL_DIR [--items 1000] [--repeats 3] [--workers 2]

Both run ``indexer.encode.encode_products`` on the same first ``--items`` catalogue products
with the same options (a fresh work folder each run, so nothing resumes): local = DataLoader
workers decoding + this process encoding; Ray = ``indexer.ray_executor.RayExecutor`` on a local
``ray.init(num_cpus=<cores>)`` (Ray Data decode tasks + encoder actor pool). The Ray time
includes the actors' start and model load (they are part of its encode stage); ``ray.init``
is timed apart. Runs alternate (local, ray, local, ray, ...) so machine load hits both alike.
Each run reports two rates: end to end (items / the whole encode stage) and steady
(the items of the chunks after the first / the time from the first chunk's arrival to the
last's: the rate of a long build, once the executor's fixed start cost is paid; chunks of
``--chunk-size`` products). Prints items/s per run, the medians and the ratios ray / local.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import indexer  # noqa: E402,F401  (sets OMP_WAIT_POLICY before faiss loads)
from bench.machine import describe_machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "fashion-products"


def _timed(encode_chunks, arrivals: list[tuple[float, int]]):
    """``encode_chunks`` that appends ``(perf_counter, products)`` to ``arrivals`` per chunk."""
    def run(*args, **kwargs):
        for start, vectors, info in encode_chunks(*args, **kwargs):
            arrivals.append((time.perf_counter(), int(info["count"])))
            yield start, vectors, info
    return run


def _steady_rate(arrivals: list[tuple[float, int]]) -> float:
    """Products of the chunks after the first / seconds from the first arrival to the last."""
    if len(arrivals) < 2:
        return float("nan")
    return sum(count for _, count in arrivals[1:]) / (arrivals[-1][0] - arrivals[0][0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--data", default=DEFAULT_DATA, type=Path)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="local DataLoader workers (the CLI default)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--actors", type=int, default=None, help="encoder actors (default: RayExecutor's)")
    parser.add_argument("--chunk-size", type=int, default=512, help="products per chunk (the steady rate's unit)")
    args = parser.parse_args()

    import ray

    from engine.catalog import read_catalog
    from engine.cpu_features import bf16_is_fast
    from engine.model.model_folder import load_model
    from indexer.encode import EncodeOptions, encode_chunks_local, encode_products
    from indexer.ray_executor import RayExecutor, start_ray

    machine = describe_machine()
    print(machine, flush=True)
    precision = ("bf16" if bf16_is_fast("cpu") else "fp32") if args.precision == "auto" else args.precision
    options = EncodeOptions(workers=args.workers, precision=precision, chunk_size=args.chunk_size)
    products = read_catalog(args.data, None, args.items).products
    model = load_model(args.model, device="cpu")
    t0 = time.perf_counter()
    start_ray(num_cpus=os.cpu_count())
    executor = RayExecutor(args.model, "cpu", actors=args.actors)
    print(f"ray.init {time.perf_counter() - t0:.1f} s; {executor.describe()}; {len(products)} products, "
          f"precision {precision}", flush=True)
    rates: dict[str, list[float]] = {"local": [], "ray": []}
    steady: dict[str, list[float]] = {"local": [], "ray": []}
    for rep in range(args.repeats):
        for name, chunks in (("local", None), ("ray", executor.encode_chunks)):
            arrivals: list[tuple[float, int]] = []
            with tempfile.TemporaryDirectory(prefix="bench-ray-encode-") as tmp:
                t0 = time.perf_counter()
                result = encode_products(model, products, Path(tmp) / "chunks", options, log=lambda _m: None,
                                         encode_chunks=_timed(chunks or encode_chunks_local, arrivals))
                seconds = time.perf_counter() - t0
            rates[name].append(len(products) / seconds)
            steady[name].append(_steady_rate(arrivals))
            print(f"run {rep + 1} {name:>5}: {seconds:6.1f} s, {rates[name][-1]:6.1f} items/s end to end, "
                  f"{steady[name][-1]:6.1f} items/s steady (first chunk after {arrivals[0][0] - t0:.1f} s; "
                  f"{len(result.indexed)} indexed, {len(result.rejects)} rejected)", flush=True)
    for label, table in (("end to end", rates), ("steady", steady)):
        local, ray_ = statistics.median(table["local"]), statistics.median(table["ray"])
        print(f"median items/s {label}: local {local:.1f}, ray {ray_:.1f}; ray / local = {ray_ / local:.3f} "
              "(target >= 0.85)")
    print(f"machine: {machine}")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
