"""Encode throughput (items/s) of the default towers on real catalogue items.

Usage: python bench/bench_encode.py [--model MODEL_DIR] [--batch-sizes 1 16 64] [--items 128]

Prints one row per (input form, batch size): text-only, image-only (JPEG bytes → vector,
decoding included) and text+image, plus the machine it ran on. Without --model it uses a
freshly initialised default model (same compute as a trained one).
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import describe_machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "fashion-products"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: untrained default towers)")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--items", type=int, default=128, help="items encoded per measurement")
    parser.add_argument("--tower", choices=["query", "item"], default="item")
    args = parser.parse_args()

    import torch

    from engine.model.model_folder import load_model
    from engine.model.towers import build_model

    model = load_model(args.model) if args.model else build_model()
    tower = getattr(model, f"{args.tower}_tower")
    rows = list(csv.DictReader(open(Path(args.data) / "styles.csv")))[: args.items]
    titles = [r["productDisplayName"] for r in rows]
    jpegs = [(Path(args.data) / "images" / f"{r['id']}.jpg").read_bytes() for r in rows]
    n = len(rows)
    forms = {"text": (titles, [None] * n), "image": ([None] * n, jpegs), "text+image": (titles, jpegs)}

    print(f"machine: {describe_machine()}")
    print(f"tower: {args.tower}, model: {args.model or 'default (untrained heads)'}, items per run: {n}")
    print(f"{'input':<11} {'batch':>5} {'items/s':>9} {'ms/item':>8}")
    for form, (texts, images) in forms.items():
        for bs in args.batch_sizes:
            count = n if bs > 1 else min(n, 32)
            tower.encode(texts[:bs], images[:bs], batch_size=bs)  # warm-up
            start = time.perf_counter()
            for s in range(0, count, bs):
                tower.encode(texts[s:s + bs], images[s:s + bs], batch_size=bs)
            elapsed = time.perf_counter() - start
            print(f"{form:<11} {bs:>5} {count / elapsed:>9.1f} {1000 * elapsed / count:>8.2f}", flush=True)
    del torch


if __name__ == "__main__":
    main()
