"""An int8 text query path that keeps cosine ≥ 0.995 to fp32 on real queries, or none.

Plain dynamic int8 of the text path (ORT ``quantize_dynamic``: int8 weights, activations
quantized per tensor per call) loses too much on MiniLM: min cosine 0.965–0.989 over 550
real catalogue queries (docs/serving.md), because a few activation channels are far larger
than the rest and one per-tensor scale then leaves the others a handful of levels. So:

1. **Smoothing** (SmoothQuant, Xiao et al. 2023, §4): every linear of the text backbone
   gets per-input-channel scales ``s_j = max|X_j|^α / max|W_j|^(1-α)`` (``α = ALPHA``) from
   the activations of calibration queries; it computes ``(X / s) (s W)^T``, the same
   product in exact arithmetic. BERT is post-LayerNorm (the LayerNorm output is also the
   residual), so ``1 / s`` is an explicit multiply before the linear, not folded.
2. **Dynamic int8** of those linears (per-channel weights), except the fusion layers and
   each block's FFN output linear (its GELU input has the longest tails), which stay fp32:
   on AVX2 min cosine 0.9945 with every backbone linear in int8, 0.9988 with the FFN
   output ones in fp32 (600 real queries, trained limit-300 model). Weights are uint8
   (U8U8 kernels) below AVX-512-VNNI: AVX2's U8S8 kernel sums pairs of products in
   saturating int16, measured min cosine 0.974 (0.984 with 7-bit weights). With VNNI the
   FFN output linears and the fusion encoder are tried in int8 too first (``recipes``): the
   gate (3) keeps whichever recipe passes first.
3. **Gate**: the int8 path's vectors are compared with the Python fp32 path's on real
   queries (titles, brand + type, attribute phrases) drawn from the served index's
   products: 4 in 5 of ``QUERIES`` (720; fewer for a small index, at least
   ``MIN_GATE_QUERIES``), other strings than the calibration ones. It is kept only when the
   minimum cosine is ≥ ``MIN_COSINE_INT8``. The queries and the result go into the ONNX
   cache record (``engine.model.onnx_cache``).

Source: SmoothQuant (Xiao et al., ICML 2023) for 1; ORT dynamic quantization for 2; our choice
for 3 and the constants.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import random
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.model.tower_graphs import GraphError

ALPHA = 0.75           # migration strength; 0.75 measured best on AVX2 (0.85 on VNNI is within 0.001)
QUERIES = 900          # real queries drawn: every 5th calibrates the smoothing, the others gate
MIN_GATE_QUERIES = 200  # fewer (a tiny index) and int8 is refused: too few to trust the minimum
MIN_COSINE_INT8 = 0.995


def split_queries(queries: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(calibration, gate)``: every 5th query calibrates, the rest (other strings) gate."""
    return ([q for n, q in enumerate(queries) if n % 5 == 4], [q for n, q in enumerate(queries) if n % 5 != 4])


def product_queries(products: Sequence[dict], count: int, seed: int) -> list[str]:
    """Up to ``count`` real query strings from catalogue product records (``{"title": str,
    "attributes": {str: str}}``, e.g. ``indexer.search.IndexVersion.records``): each
    product's title, its brand (first word of the title) + article type, and an attribute
    phrase (its facet values, e.g. "Women Footwear Heels Black"), distinct, shuffled with ``seed``.

    Raises:
        GraphError: no product has a title.
    """
    queries = []
    for product in products:
        title, attrs = (product or {}).get("title"), (product or {}).get("attributes") or {}
        if not title or not title.strip():
            continue
        queries += [title, " ".join(filter(None, (title.split()[0], attrs.get("articleType")))),
                    " ".join(list(attrs.values())[:5]) or title]
    queries = list(dict.fromkeys(queries))  # distinct strings: many products share a brand + type
    if not queries:
        raise GraphError("no titled products to draw int8 gate queries from")
    random.Random(seed).shuffle(queries)
    return queries[:count]


class _SmoothedLinear(nn.Module):
    """``F.linear(x * inv_scale, weight * scale)``: the same product, flatter activations."""

    def __init__(self, linear: nn.Linear, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("inv_scale", (1.0 / scale).float())
        self.weight = nn.Parameter(linear.weight.detach() * scale[None, :], requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x * self.inv_scale, self.weight, self.bias)


def smoothed_text_model(text_backbone, calibration: Sequence[str], alpha: float = ALPHA,
                        model: nn.Module | None = None) -> nn.Module:
    """A copy of ``model`` (default ``text_backbone.model``; e.g. the query tower's
    ``text_model("text")``) with every ``nn.Linear`` smoothed (module docstring, 1) from the
    per-channel ``max |x|`` of its inputs over ``calibration`` texts, tokenized by
    ``text_backbone``. fp32 outputs equal the original's up to rounding."""
    model, peaks = copy.deepcopy(text_backbone.model if model is None else model), {}

    def record(name):
        def hook(_module, inputs, _output):
            x = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(0)
            peaks[name] = torch.maximum(peaks[name], x) if name in peaks else x
        return hook

    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    handles = [m.register_forward_hook(record(name)) for name, m in linears.items()]
    with torch.no_grad():
        for start in range(0, len(calibration), 16):
            batch = text_backbone.tokenize(list(calibration[start:start + 16]))
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for handle in handles:
        handle.remove()
    for name, linear in linears.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        weight_peak = linear.weight.detach().abs().amax(0).clamp(min=1e-5)
        scale = (peaks[name].clamp(min=1e-5) ** alpha / weight_peak ** (1 - alpha)).clamp(1e-2, 1e3)
        setattr(parent, attr, _SmoothedLinear(linear, scale))
    return model


def uint8_weights(isa: str) -> bool:
    """True where the int8 weights should be uint8 (no VNNI: AVX2's U8S8 kernel saturates)."""
    return isa in ("default", "avx2", "avx512")


FUSION_NODES = ("/fusion/",)
PRIVATE_NODES = ("/fusion/private/", "/fusion/text_private/", "/fusion/cross_modal/")  # the fitted projections
FFN_OUTPUT_NODES = ("/output/dense/", "/mlp/fc2/")  # the FFN output linears (BERT, CLIP)
# recipe -> the nodes it keeps fp32 (an attention output linear is never among them)
RECIPES = {"every-linear": PRIVATE_NODES, "ffn-fp32": FUSION_NODES + FFN_OUTPUT_NODES}


def recipes(isa: str) -> tuple[str, ...]:
    """The int8 recipes to gate, in order, on ``isa``: where the weights are uint8 (no VNNI; module
    docstring, 2) only "ffn-fp32" (every backbone linear int8 but the FFN outputs, the fusion
    encoder fp32: min cosine 0.9945 with the FFN outputs int8 on AVX2); with VNNI (U8S8 kernels,
    no saturation) "every-linear" first (every linear int8 but the private blocks' projections:
    min cosine 0.99783 over 720 real queries with the recipe's two-layer distilled text encoder on
    AVX-512-BF16, 0.99787 with the fusion encoder fp32, 0.99959 for "ffn-fp32"; 40 % less CPU than
    "ffn-fp32", docs/serving.md), then "ffn-fp32" if its gate refuses it. Our choice."""
    return ("ffn-fp32",) if uint8_weights(isa) else ("every-linear", "ffn-fp32")


def quantize_text_graph(source: Path, target: Path, isa: str, recipe: str = "ffn-fp32") -> None:
    """Dynamic int8 of ``source``'s MatMul / Gemm nodes with constant weights (per-channel) into
    ``target``, but those ``RECIPES[recipe]`` keeps fp32: "every-linear" the private blocks'
    projections, "ffn-fp32" the fusion encoder and the FFN output linears. Raises GraphError for an
    unknown recipe or when ORT cannot quantize the graph."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if recipe not in RECIPES:
        raise GraphError(f"unknown int8 recipe {recipe!r}; expected one of {tuple(RECIPES)}")
    fp32 = [n.name for n in onnx.load(str(source)).graph.node
            if any(part in n.name for part in RECIPES[recipe]) and "/attention/output/" not in n.name]
    logging.disable(logging.WARNING)  # the quantizer logs one root INFO/WARNING line per tensor
    try:
        quantize_dynamic(str(source), str(target), per_channel=True, op_types_to_quantize=["MatMul", "Gemm"],
                         weight_type=QuantType.QUInt8 if uint8_weights(isa) else QuantType.QInt8,
                         nodes_to_exclude=fp32)
    except Exception as exc:
        raise GraphError(f"cannot quantize the text path: {exc}") from exc
    finally:
        logging.disable(logging.NOTSET)


def gate(tower, path, queries: Sequence[str]) -> dict:
    """Min cosine of ``path``'s vectors to the Python fp32 path's over ``queries`` (batches
    of 8); ``{"min_cosine", "p01_cosine", "queries", "queries_sha256", "passed"}``."""
    expected = tower.encode(list(queries), precision="fp32", use_graphs=False)
    got = np.concatenate([path(list(queries[i:i + 8]), None).numpy() for i in range(0, len(queries), 8)])
    cosine = np.sum(expected * got, axis=1)
    return {"min_cosine": float(cosine.min()), "p01_cosine": float(np.percentile(cosine, 1)),
            "queries": len(queries), "passed": bool(cosine.min() >= MIN_COSINE_INT8),
            "queries_sha256": hashlib.sha256("\n".join(queries).encode()).hexdigest()}
