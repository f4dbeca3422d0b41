"""ONNX Runtime for the products an fp32 index build runs through the backbones.

With a warm token cache (``indexer.token_reuse``) only the products training did not see
run the backbones; ``Tower.encode`` in eager PyTorch is slow for the image backbone on CPUs
(8-9 photos/s on 2 loaded AVX2 cores, against 29-32 in ONNX Runtime, bench/bench_image_tokens.py).
So, once a chunk has such products, the item tower's image and text+image batches go
through the fp32 ONNX Runtime paths of ``engine.model.tower_onnx`` (exported once, kept in
``TOKEN_CACHE/onnx`` beside the tokens, each checked against the Python path: cosine ≥
0.999); a kind that cannot be built stays in PyTorch with a log line. Not for bf16 builds
(bf16 autocast is the fast path there) and not with ``ECSEARCH_TOKEN_RUNTIME=torch``.
Source: our choice (issue 11).
"""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Callable

# the kinds of item tower batches each view sends through the backbones
_KINDS = {"fused": ("text+image", "image"), "image": ("image",), "text": ()}


def use_onnx_graphs(model, view: str, precision: str, token_cache: str | None,
                    log: Callable[[str], None]) -> list[str]:
    """Build the item tower's ONNX Runtime graphs for ``view``'s image batches; returns the
    kinds that run in ONNX Runtime (empty: all stay in PyTorch: bf16, no onnxruntime,
    ``ECSEARCH_TOKEN_RUNTIME=torch``, or every kind refused, each reason logged)."""
    from engine.tokens.image_runtime import runtime_choice

    kinds = _KINDS.get(view, ())
    if precision != "fp32" or not kinds or runtime_choice() == "torch" \
            or importlib.util.find_spec("onnxruntime") is None:
        return []
    from engine.model.onnx_cache import OnnxCache
    from engine.model.tower_onnx import OPSET

    cache = None
    if token_cache is not None and getattr(model, "fingerprint", None):
        cache = OnnxCache(Path(token_cache) / "onnx", model.fingerprint, OPSET)
    start = time.perf_counter()
    refused = model.item_tower.use_graphs("fp32", kinds=kinds, backend="onnxruntime", onnx_cache=cache)
    built = [kind for kind in kinds if kind not in refused]
    for kind, reason in refused.items():
        log(f"item tower {kind} batches stay in PyTorch: {reason}")
    if built:
        log(f"item tower {', '.join(built)} batches run in ONNX Runtime fp32 "
            f"(ready in {time.perf_counter() - start:.1f} s)")
    return built
