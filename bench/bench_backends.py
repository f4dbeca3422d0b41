"""Query tower latency per serving backend: Python (eager), TorchScript, ONNX Runtime.

Usage: python bench/bench_backends.py [--model MODEL_DIR] [--backends python torchscript onnxruntime]
    [--precision fp32] [--threads 1] [--rounds 3] [--repeats 30]

One thread by default (the server's tower thread on 2 cores). Encodes, through
``Tower.encode``, 1 and 8 short catalogue-style text queries ("Black Heels for Women"), one
catalogue photo (preprocessed pixels, as the server's decode pool hands them over) and one
text+image pair. Backends are measured in ``--rounds`` interleaved rounds so that drift of
a shared host hits them alike; each cell is the median over rounds of the per-round median
(and the minimum over everything) in ms. Prints the machine (with ``describe_cpu()``) and
the cosine of each backend's text vectors to the Python path's. Without --model it uses a
freshly initialised default model (same compute as a trained one). For an honest AVX2 run on
an AVX-512 host see bench/cpuid_avx2.c.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import describe_machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("ECSEARCH_DATA", REPO.parent / "shared" / "data" / "fashion-products"))
CASES = ("text x1", "text x8", "image x1", "text+image x1")


def _queries(data: Path) -> tuple[list[str], Path]:
    with open(data / "styles.csv", newline="", encoding="utf-8") as fh:
        rows = [r for _, r in zip(range(400), csv.DictReader(fh))]
    texts = [" ".join(filter(None, (r["baseColour"], r["articleType"], "for", r["gender"]))) for r in rows[::50]]
    photo = next(data / "images" / f"{r['id']}.jpg" for r in rows if (data / "images" / f"{r['id']}.jpg").is_file())
    return texts[:8], photo


def _gate_queries(data: Path) -> list[str]:
    """Real queries from the catalogue that calibrate and gate the int8 text path (as the server's)."""
    from engine.catalog import read_catalog
    from engine.model.tower_int8 import product_queries

    products = read_catalog(data).products
    return product_queries([{"title": p.title, "attributes": p.attributes} for p in products[::13]], 900, seed=0)


def _time_ms(fn, repeats: int) -> list[float]:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: untrained default towers)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--backends", nargs="+", default=["python", "torchscript", "onnxruntime"],
                        choices=["python", "torchscript", "onnxruntime", "onnxruntime-int8"])
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per case and round (images: a third)")
    args = parser.parse_args()

    import numpy as np
    import torch

    from engine.model.model_folder import load_model
    from engine.model.towers import build_model

    torch.set_num_threads(args.threads)
    model = (load_model(args.model) if args.model else build_model()).cast_for_inference(args.precision)
    tower = model.query_tower
    texts, photo = _queries(args.data)
    pixels = tower._pixels([str(photo)], [0], 10**9)
    inputs = {"text x1": (texts[:1], None), "text x8": (texts, None), "image x1": (None, pixels),
              "text+image x1": (texts[:1], pixels)}
    reference = tower.encode(texts, precision=args.precision, use_graphs=False)
    graphs, notes = {"python": {}}, {}
    for backend in args.backends:
        if backend == "python":
            continue
        start = time.perf_counter()
        refused = tower.use_graphs(args.precision, backend=backend, threads=args.threads,
                                   int8_queries=_gate_queries(args.data) if backend.endswith("int8") else None)
        graphs[backend] = dict(tower.graphs)
        cosine = float(np.sum(reference * tower.encode(texts, precision=args.precision), axis=1).min())
        notes[backend] = (f"built in {time.perf_counter() - start:.1f} s, text cosine to python {cosine:.5f}"
                          + (f", refused: {refused}" if refused else ""))
    times = {(b, c): [] for b in args.backends for c in CASES}
    for _ in range(args.rounds):
        for backend in args.backends:
            tower.graphs = graphs[backend]
            for case in CASES:
                texts_in, images_in = inputs[case]
                repeats = args.repeats if images_in is None else max(3, args.repeats // 3)
                times[backend, case].append(_time_ms(lambda: tower.encode(
                    texts_in, images_in, precision=args.precision, use_graphs=backend != "python"), repeats))

    print(f"machine: {describe_machine()}")
    print(f"model: {args.model or 'default (untrained heads)'}, precision {args.precision}, threads {args.threads}, "
          f"{args.rounds} interleaved rounds")
    print("| backend | " + " | ".join(f"{c} ms" for c in CASES) + " |")
    print("|---|" + "---:|" * len(CASES))
    for backend in args.backends:
        cells = []
        for case in CASES:
            rounds = times[backend, case]
            cells.append(f"{np.median([np.median(r) for r in rounds]):.2f} (min {min(min(r) for r in rounds):.2f})")
        print(f"| {backend} | " + " | ".join(cells) + " |")
    for backend, note in notes.items():
        print(f"{backend}: {note}")


if __name__ == "__main__":
    main()
