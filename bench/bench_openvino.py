"""The query tower's text path: ONNX Runtime (fp32, gated int8) against OpenVINO, CPU time per batch.

Usage: python bench/bench_openvino.py [--model MODEL_DIR] [--batches 1 4 8] [--rounds 3] [--repeats 60]

Issue 11 asks for ONNX Runtime "and, if it helps, OpenVINO" to be measured for the query tower.
This exports the query tower's text-only path once (``engine.model.tower_onnx.export_path``, the
graph the server's ONNX Runtime backend runs: the distilled text encoder and the fusion encoder)
and times, on one thread, the same batches of real catalogue queries (``bench_backends``'s int8
gate queries: titles, brand + type, attribute phrases) through:

- ``onnxruntime fp32`` and ``onnxruntime int8`` (the server's paths: ``onnx_path``, int8 smoothed,
  quantized and gated as the server does it);
- ``openvino``: the same fp32 ONNX file read by OpenVINO, dynamic batch and token axes, one
  inference thread, one stream, latency hint, at its default precision for the CPU (bf16 where the
  CPU has native bf16, else fp32) and, with ``--openvino-f32``, pinned to fp32 as well.

Each cell is the median over ``--rounds`` interleaved rounds of the CPU time (``time.process_time``)
per call, tokenisation included (the same for every backend), in ms; the cosine column is each
path's minimum cosine to the Python fp32 path over the timed queries. Prints the machine line with
its ISA. OpenVINO is not a dependency of ecsearch: ``pip install openvino`` first (the bench says
so and exits with status 1 without it). For an honest AVX2 run on an AVX-512 host see bench/cpuid_avx2.c
(OpenVINO reads CPUID too, so the preloaded mask hides AVX-512 and bf16 from it).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_backends import DEFAULT_DATA, _gate_queries  # noqa: E402
from bench.machine import describe_machine  # noqa: E402


class OpenVinoTextPath:
    """OpenVINO's compiled text path, called like ``engine.model.tower_onnx.OnnxPath`` (B texts, no
    pixels → ``float32 (B, d)`` unit vectors). ``precision``: OpenVINO's inference precision hint, or None
    for its default on this CPU."""

    def __init__(self, core, onnx_file: Path, backbones, precision: str | None):
        config = {"INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
        if precision is not None:
            config["INFERENCE_PRECISION_HINT"] = precision
        compiled = core.compile_model(core.read_model(str(onnx_file)), "CPU", config)
        self.precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self._request = compiled.create_infer_request()
        self._backbones = backbones

    def __call__(self, texts, pixels=None):
        import torch

        batch = self._backbones.text.tokenize(list(texts))
        self._request.infer({"input_ids": batch["input_ids"].numpy(),
                             "attention_mask": batch["attention_mask"].numpy()})
        return torch.from_numpy(self._request.get_output_tensor(0).data.copy())


def _cpu_ms(fn, repeats: int) -> float:
    fn()
    fn()
    start = time.process_time()
    for _ in range(repeats):
        fn()
    return 1000 * (time.process_time() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: untrained default towers)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8], help="queries per call")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=60, help="timed calls per batch size and round")
    parser.add_argument("--openvino-f32", action="store_true", help="also time OpenVINO pinned to fp32")
    args = parser.parse_args()
    try:
        import openvino
    except ImportError:
        sys.exit("bench_openvino: OpenVINO is not installed (it is not an ecsearch dependency): pip install openvino")

    import numpy as np
    import torch

    from engine.model.model_folder import load_model
    from engine.model.tower_onnx import export_path, onnx_path
    from engine.model.towers import build_model

    torch.set_num_threads(1)
    model = load_model(args.model) if args.model else build_model()
    tower = model.query_tower
    queries = _gate_queries(args.data)
    paths = {"onnxruntime fp32": onnx_path(tower, "text", threads=1),
             "onnxruntime int8": onnx_path(tower, "text", threads=1, int8=True, queries=queries)}
    core, version = openvino.Core(), openvino.__version__.split("-")[0]
    with tempfile.TemporaryDirectory(prefix="ecsearch-openvino-") as folder:
        onnx_file = export_path(tower, "text", Path(folder) / "text.onnx")
        default = OpenVinoTextPath(core, onnx_file, tower.backbones, None)
        paths[f"openvino {version} ({default.precision}, its default here)"] = default
        if args.openvino_f32:
            paths[f"openvino {version} (f32)"] = OpenVinoTextPath(core, onnx_file, tower.backbones, "f32")

    timed = {b: [queries[(b * n) % 600:(b * n) % 600 + b] for n in range(args.repeats)] for b in args.batches}
    cosine = {}
    for name, path in paths.items():
        texts = [q for b in args.batches for q in timed[b][0]]
        expected = tower.encode(texts, precision="fp32", use_graphs=False)
        cosine[name] = float(np.sum(expected * path(texts, None).numpy(), axis=1).min())
    times = {(name, b): [] for name in paths for b in args.batches}
    for _ in range(args.rounds):
        for name, path in paths.items():
            for b in args.batches:
                batches = iter(timed[b] * 3)
                times[name, b].append(_cpu_ms(lambda: path(next(batches), None), args.repeats))

    print(f"machine: {describe_machine()} openvino={version}")
    print(f"model: {args.model or 'default (untrained heads)'}, text-only path, one thread, {args.rounds} interleaved "
          f"rounds of {args.repeats} calls, real catalogue queries")
    print("| path | " + " | ".join(f"text x{b} CPU ms" for b in args.batches) + " | min cosine to Python fp32 |")
    print("|---|" + "---:|" * (len(args.batches) + 1))
    for name in paths:
        cells = [f"{np.median(times[name, b]):.2f}" for b in args.batches]
        print(f"| {name} | " + " | ".join(cells) + f" | {cosine[name]:.5f} |")


if __name__ == "__main__":
    main()
