"""Image backbone throughput of a token cache build: PyTorch eager vs ONNX Runtime (issue 11).

Usage:
    python bench/bench_image_tokens.py [--model MODEL_DIR] [--photos 64] [--batch 32] [--rounds 2]

Preprocesses ``--photos`` real catalogue photos, then times, round by round and interleaved,
the image backbone's ``encode`` in PyTorch and the ONNX Runtime session that
``engine.tokens.image_runtime`` builds (same threads: torch.get_num_threads()), in batches
of ``--batch`` as the cache writer runs them. Decoding is not timed (it runs in a helper
thread during a build). Prints the machine line and photos/s per runtime and round.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import describe_machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("ECSEARCH_DATA", REPO.parent / "shared" / "data" / "fashion-products"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: a fresh default model's backbones)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--photos", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import torch

    from engine.model.images import load_image
    from engine.tokens.image_runtime import image_token_encoder

    if args.model:
        from engine.model.model_folder import load_model
        image = load_model(args.model).backbones.image
    else:
        from engine.model.backbones.registry import build_image_backbone
        from engine.model.towers import ModelConfig
        image = build_image_backbone(ModelConfig().image_backbone)
    paths = sorted((args.data / "images").glob("*.jpg"))[:args.photos]
    pixels = torch.stack([image.preprocess(load_image(str(p))) for p in paths])
    batches = list(pixels.split(args.batch))
    runtimes = {"torch": image.encode, "onnxruntime": image_token_encoder(image, pixels[:2])}
    print(f"machine: {describe_machine()}")
    print(f"photos={len(pixels)} batch={args.batch} onnxruntime session: {runtimes['onnxruntime'].name}")
    with torch.inference_mode():
        for fn in runtimes.values():
            fn(batches[0][:2])  # warm-up
        for r in range(args.rounds):
            for name, fn in runtimes.items():
                start = time.perf_counter()
                for batch in batches:
                    fn(batch)
                seconds = time.perf_counter() - start
                print(f"round {r + 1} {name}: {len(pixels) / seconds:.1f} photos/s ({seconds * 1e3 / len(pixels):.1f} "
                      f"ms/photo)", flush=True)


if __name__ == "__main__":
    main()
