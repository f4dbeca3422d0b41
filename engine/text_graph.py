"""TorchScript graph of a tower's text-only path, for serving.

A text query runs ~400 small PyTorch ops (backbone + fusion). Called from Python, each op
pays dispatch overhead and re-takes the GIL, so in a server whose event loop and search
threads also want the GIL, the tower thread stalls between ops. Traced and frozen into one
TorchScript graph, the whole text-only path (tokens → unit vector) runs in C++ with the GIL
released. Measured on this CPU (AVX512-BF16, one thread, trained MiniLM model, bf16):
8 short queries 9.6 → 7.0 ms, 1 query 5.1 → 3.1 ms; with another Python thread busy, 8 queries
took 985 ms through the Python path and 23.6 ms through the graph.

The graph covers only batches where every sample is text-only (the fusion encoder's
branches for images are data-dependent and stay in Python). Tracing fixes those branches
for text-only input, and generalises over batch size and token count; ``trace_text_path``
checks that on probe batches of other shapes against the Python path and refuses a graph
that disagrees. Its linear layers, in bf16, use weights reordered once for oneDNN
(``PackedLinear``): 8 queries 8.5 → 7.1 ms, 1 query 4.0 → 2.7 ms on top of the above.

Source: our choice (``torch.jit.trace`` + ``torch.jit.freeze``). TorchScript is deprecated in
favour of ``torch.compile`` / ``torch.export``, and warns so in torch 2.13; we silence that
warning here. We measured ``torch.compile`` (inductor, freezing, C++ wrapper) on the same
model: no faster than the Python path for 8 queries, and its calls hold the GIL. Revisit
when TorchScript goes away; ``--no-text-graph`` serves without it.
"""
from __future__ import annotations

import copy
import logging
import warnings
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# Probe texts for the trace and its check: different counts and lengths than each other.
_TRACE_TEXTS = ("black leather wallet for men", "red heels", "blue denim jacket", "white sneakers for women",
                "a long product title: Puma Men Black and Grey Running Shoes with mesh upper and rubber sole")
_CHECK_BATCHES = ((0,), (1, 4, 2))
MIN_COSINE = 0.999  # a graph whose vectors differ more from the Python path's is refused


class TextGraphError(RuntimeError):
    """The traced graph disagrees with the Python path (or cannot be traced)."""


def _packed_linear_py(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      activation: str) -> torch.Tensor:
    no_scalars = torch.jit.annotate(List[Optional[number]], [])  # noqa: F821 (TorchScript type)
    # activation "none", or "gelu" with algorithm "none": the exact (erf) GELU, fused by oneDNN
    return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), weight, bias, activation, no_scalars, "none")


with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # see the module docstring
    # Scripted: the tracer cannot record the op's empty ``Scalar?[]`` argument by itself.
    _packed_linear = torch.jit.script(_packed_linear_py)


class PackedLinear(nn.Module):
    """A bf16 ``nn.Linear`` whose weight is reordered once into oneDNN's blocked layout.

    ``F.linear`` reorders the weight on every call; for a query's few tokens that costs as
    much as the product itself. Measured on this CPU (one thread, 20 distinct 384x1536
    weights, 8 rows): 103 → 60 us per linear; same results. Input any float dtype
    ``(..., in_features)``, output bfloat16 ``(..., out_features)``. ``activation="gelu"``
    applies the exact GELU inside the same oneDNN call. Source: our choice (the weight
    prepacking and fusion of PyTorch's inductor ``freezing`` for CPU).
    """

    def __init__(self, linear: nn.Linear, rows_hint: int = 64, activation: str = "none"):
        super().__init__()
        if activation not in ("none", "gelu"):
            raise ValueError(f"unsupported activation {activation!r}")
        self.activation = activation
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().to(torch.bfloat16)
        self.weight = nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(weight, rows_hint), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(
            linear.bias.detach().to(torch.bfloat16), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _packed_linear(x, self.weight, self.bias, self.activation)


def _is_exact_gelu(module: nn.Module) -> bool:
    if isinstance(module, nn.GELU):
        return module.approximate == "none"
    return type(module).__name__ == "GELUActivation" and getattr(module, "act", None) is F.gelu


def _pack_linears(module: nn.Module) -> int:
    """Replace every plain ``nn.Linear`` below ``module`` by a ``PackedLinear``, folding an
    exact GELU that directly follows it (Hugging Face BERT's ``dense`` → ``intermediate_act_fn``,
    an ``nn.Sequential`` ``Linear, GELU``) into the same call; returns how many were packed."""
    count = 0
    children = list(module.named_children())
    for position, (name, child) in enumerate(children):
        if type(child) is nn.Linear:
            follower = None
            if isinstance(module, nn.Sequential) and position + 1 < len(children):
                follower = children[position + 1][0]
            elif name == "dense" and hasattr(module, "intermediate_act_fn"):
                follower = "intermediate_act_fn"
            fuse = follower is not None and _is_exact_gelu(getattr(module, follower))
            setattr(module, name, PackedLinear(child, activation="gelu" if fuse else "none"))
            if fuse:
                setattr(module, follower, nn.Identity())
            count += 1
        else:
            count += _pack_linears(child)
    return count


class _TextPath(nn.Module):
    """Token ids + attention mask → ``float32 (B, d)`` unit vectors, text-only samples."""

    def __init__(self, text_model: nn.Module, fusion: nn.Module, image_hidden: int):
        super().__init__()
        self.text_model = text_model
        self.fusion = fusion
        self.image_hidden = image_hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
        b = input_ids.shape[0]
        has_text = torch.ones(b, dtype=torch.bool, device=input_ids.device)
        has_image = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        image_tokens = torch.zeros(b, 1, self.image_hidden, device=input_ids.device)
        image_mask = torch.zeros(b, 1, dtype=torch.bool, device=input_ids.device)
        vectors = self.fusion(tokens, attention_mask.bool(), image_tokens, image_mask, has_text, has_image)
        return F.normalize(vectors.float(), dim=-1)


class TextGraph:
    """A traced text-only path of one tower at one precision.

    Call with a list of B non-blank strings; returns ``float32 (B, d)`` unit vectors in
    input order. Thread-safe (TorchScript modules may be called concurrently).
    """

    def __init__(self, graph: torch.jit.ScriptModule, backbone, precision: str):
        self._graph = graph
        self._backbone = backbone
        self.precision = precision
        self.calls = 0  # batches encoded through the graph

    @torch.inference_mode()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        batch = self._backbone.tokenize(list(texts))
        self._backbone.calls += 1  # the text backbone runs (inside the graph)
        self.calls += 1
        return self._graph(batch["input_ids"], batch["attention_mask"])


def trace_text_path(tower, precision: str) -> TextGraph:
    """Trace ``tower``'s text-only path at ``precision`` ("fp32" or "bf16") into a TextGraph.

    The tower's weights must already be stored as ``precision`` needs
    (``TwoTowerModel.cast_for_inference``). CPU only.

    Raises:
        TextGraphError: the text backbone has no tokenizer-based path, tracing fails, or the
            graph's vectors differ from ``tower.encode``'s (cosine < 0.999) on probe batches
            of other sizes and lengths than the trace's.
    """
    backbone = tower.backbones.text
    if not hasattr(backbone, "tokenize") or not hasattr(backbone, "model"):
        raise TextGraphError(f"text backbone {type(backbone).__name__} has no tokenizer + model to trace")
    device = tower.fusion.merge.weight.device
    if device.type != "cpu":
        raise TextGraphError(f"text graphs are traced for the CPU only, not {device}")
    example = backbone.tokenize(list(_TRACE_TEXTS[:3]))
    previous = torch._C._jit_set_autocast_mode(False)  # record autocast's casts in the graph
    try:
        # The graph gets its own copies: packed weights, and no unused pooler head.
        text_model, fusion = copy.deepcopy(backbone.model), copy.deepcopy(tower.fusion)
        if getattr(text_model, "pooler", None) is not None:
            text_model.pooler = None  # BertModel: its pooled output is not used (METHOD.md §1.1 takes tokens)
        if precision == "bf16" and torch.backends.mkldnn.is_available():
            _pack_linears(text_model)
            _pack_linears(fusion)
        path = _TextPath(text_model, fusion, tower.backbones.image.hidden_size).eval()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings on branches fixed for text-only input
            traced = torch.jit.trace(path, (example["input_ids"], example["attention_mask"]), check_trace=False)
            graph = torch.jit.freeze(traced.eval())
    except Exception as exc:  # tracing is best-effort: the caller falls back to Python
        raise TextGraphError(f"cannot trace the text path: {exc}") from exc
    finally:
        torch._C._jit_set_autocast_mode(previous)
    text_graph = TextGraph(graph, backbone, precision)
    for rows in _CHECK_BATCHES:
        texts = [_TRACE_TEXTS[i] for i in rows]
        expected = tower.encode(texts, precision=precision, use_text_graph=False)
        got = text_graph(texts).numpy()
        cosine = float(np.min(np.sum(expected * got, axis=1)))
        if not cosine >= MIN_COSINE:
            raise TextGraphError(f"traced text path disagrees with the Python path (cosine {cosine:.5f} "
                                 f"< {MIN_COSINE} on {len(texts)} probe texts)")
    return text_graph
