"""TorchScript graphs of a tower's paths, for serving: text-only, image-only, text+image.

Contract: ``Tower.use_graphs(precision)`` traces and freezes one graph per kind of batch
(tokens / pixels → float32 unit vectors (B, d)); each graph runs in C++ with the GIL
released, and in bf16 its text path's linear layers use weights reordered once for oneDNN
(``PackedLinear``). A graph is used only after it matched the Python path
(cosine >= ``MIN_COSINE``) on probe batches; otherwise that kind stays in Python. Why (the
Python path's per-op dispatch and GIL re-takes stall the tower thread) and the measured
gains: docs/serving.md. Importing this module turns TorchScript's autocast pass off for the
process (see ``_jit_set_autocast_mode`` below).

A graph covers one kind of batch: every sample text-only ("text"), image-only ("image"),
or with both ("text+image"); the fusion encoder's branches on presence are data-dependent,
so tracing fixes them for that kind, and mixed batches stay in Python. Graphs generalise
over batch size and token count; ``trace_path`` checks that on probe batches of other shapes
against the Python path and refuses a graph that disagrees.

Source: our choice (``torch.jit.trace`` + ``torch.jit.freeze``). TorchScript is deprecated in
favour of ``torch.compile`` / ``torch.export``, and warns so in torch 2.13; we silence that
warning here. We measured ``torch.compile`` (inductor, freezing, C++ wrapper) on the same
model: no faster than the Python path for 8 queries, and its calls hold the GIL. Revisit
when TorchScript goes away; ``--no-graphs`` serves without them.
"""
from __future__ import annotations

import copy
import warnings
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.cpu_features import bf16_runs, cpu_isa

# TorchScript's own autocast pass off, once, for the process: tracing under torch.autocast
# then records autocast's casts in the graph itself, and our graphs run outside autocast, so
# the pass has nothing to do. Set here only (never toggled around a trace: the flag is
# process-wide, and another thread may be running a graph). Our choice.
torch._C._jit_set_autocast_mode(False)

KINDS = ("text", "image", "text+image")
# Probe texts for the trace and its check: different counts and lengths than each other.
_TRACE_TEXTS = ("black leather wallet for men", "red heels", "blue denim jacket", "white sneakers for women",
                "a long product title: Puma Men Black and Grey Running Shoes with mesh upper and rubber sole")
_CHECK_BATCHES = ((0,), (1, 4, 2))
MIN_COSINE = 0.999  # a graph whose vectors differ more from the Python path's is refused


class GraphError(RuntimeError):
    """A path cannot be traced, or its graph disagrees with the Python path."""


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


class _Path(nn.Module):
    """One kind of batch → ``float32 (B, d)`` unit vectors. Inputs: token ids + attention
    mask (kinds with text), pixels ``(B, 3, S, S)`` (kinds with an image)."""

    def __init__(self, kind: str, text_model: nn.Module | None, image_backbone: nn.Module | None,
                 fusion: nn.Module, text_hidden: int, image_hidden: int):
        super().__init__()
        self.kind = kind
        self.text_model = text_model
        self.image_backbone = image_backbone
        self.fusion = fusion
        self.text_hidden, self.image_hidden = text_hidden, image_hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        b = pixels.shape[0] if self.kind == "image" else input_ids.shape[0]
        with_text, with_image = self.kind != "image", self.kind != "text"
        if with_text:
            text_tokens = self.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
            text_mask = attention_mask.bool()
        else:
            text_tokens = torch.zeros(b, 1, self.text_hidden)
            text_mask = torch.zeros(b, 1, dtype=torch.bool)
        if with_image:
            image_tokens, image_mask = self.image_backbone.encode(pixels)
        else:
            image_tokens = torch.zeros(b, 1, self.image_hidden)
            image_mask = torch.zeros(b, 1, dtype=torch.bool)
        has_text = torch.ones(b, dtype=torch.bool) if with_text else torch.zeros(b, dtype=torch.bool)
        has_image = torch.ones(b, dtype=torch.bool) if with_image else torch.zeros(b, dtype=torch.bool)
        vectors = self.fusion(text_tokens, text_mask, image_tokens, image_mask, has_text, has_image, kind=self.kind)
        return F.normalize(vectors.float(), dim=-1)


class TracedPath:
    """The traced graph of one kind of batch of one tower at one precision.

    Call with B non-blank texts (str or ``TextTokens``; None for "image") and B preprocessed
    images ``float32 (3, S, S)`` (None for "text"); returns ``float32 (B, d)`` unit vectors in
    input order. Thread-safe (TorchScript modules may be called concurrently).
    """

    def __init__(self, graph: torch.jit.ScriptModule, kind: str, backbones, precision: str):
        self._graph = graph
        self.kind = kind
        self._backbones = backbones
        self.precision = precision
        self.backend = f"torchscript {precision}"  # for logs (engine.model.tower_onnx.OnnxPath has its own)
        self.serves = (precision,)  # the Tower.encode precisions it answers
        self.calls = 0  # batches encoded through the graph

    @torch.inference_mode()
    def __call__(self, texts: Sequence | None, pixels: Sequence[torch.Tensor] | None) -> torch.Tensor:
        empty = torch.zeros(0, dtype=torch.long)
        ids = mask = empty
        images = torch.zeros(0)
        if self.kind != "image":
            batch = self._backbones.text.tokenize(list(texts))
            ids, mask = batch["input_ids"], batch["attention_mask"]
            self._backbones.text.calls += 1  # the backbones run (inside the graph)
        if self.kind != "text":
            images = torch.stack(list(pixels))
            self._backbones.image.calls += 1
        self.calls += 1
        return self._graph(ids, mask, images)


def _probe_pixels(backbones, count: int, seed: int) -> list[torch.Tensor]:
    size = int(getattr(backbones.image.preprocess, "image_size", 224))
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, size, size, generator=generator) * 2 - 1 for _ in range(count)]


def trace_path(tower, kind: str, precision: str) -> TracedPath:
    """Trace ``tower``'s path for batches of ``kind`` at ``precision`` ("fp32" or "bf16").

    The tower's weights must already be stored as ``precision`` needs
    (``TwoTowerModel.cast_for_inference``). CPU only.

    Raises:
        GraphError: unknown kind, a text backbone without a tokenizer + model, tracing fails,
            bf16 on a CPU below AVX-512 (``engine.cpu_features.bf16_runs``),
            or the graph's vectors differ from ``tower.encode``'s (cosine < 0.999) on probe
            batches of other sizes and lengths than the trace's.
    """
    if kind not in KINDS:
        raise GraphError(f"unknown kind {kind!r}; expected one of {KINDS}")
    if precision == "bf16" and not bf16_runs("cpu"):
        raise GraphError(f"bf16 graphs need AVX-512 bf16 kernels; this CPU runs isa={cpu_isa()}")
    backbones = tower.backbones
    text = backbones.text
    with_text, with_image = kind != "image", kind != "text"
    if with_text and (not hasattr(text, "tokenize") or not hasattr(text, "model")):
        raise GraphError(f"text backbone {type(text).__name__} has no tokenizer + model to trace")
    device = tower.fusion.merge.weight.device
    if device.type != "cpu":
        raise GraphError(f"graphs are traced for the CPU only, not {device}")
    example_texts = list(_TRACE_TEXTS[:3])
    example = text.tokenize(example_texts) if with_text else None
    example_pixels = _probe_pixels(backbones, 3, seed=0) if with_image else None
    empty_ids = torch.zeros(0, dtype=torch.long)
    inputs = (example["input_ids"] if with_text else empty_ids, example["attention_mask"] if with_text else empty_ids,
              torch.stack(example_pixels) if with_image else torch.zeros(0))
    try:
        # The graph gets its own copies: packed weights, and no unused pooler head.
        text_model = copy.deepcopy(tower.text_model(kind)) if with_text else None
        image_backbone = copy.deepcopy(backbones.image) if with_image else None
        fusion = copy.deepcopy(tower.fusion)
        if text_model is not None and getattr(text_model, "pooler", None) is not None:
            text_model.pooler = None  # BertModel: its pooled output is not used (METHOD.md §1.1 takes tokens)
        if precision == "bf16" and torch.backends.mkldnn.is_available():
            if text_model is not None:
                _pack_linears(text_model)
            _pack_linears(fusion)
        path = _Path(kind, text_model, image_backbone, fusion, text.hidden_size, backbones.image.hidden_size).eval()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings on branches fixed for this kind
            traced = torch.jit.trace(path, inputs, check_trace=False)
            graph = torch.jit.freeze(traced.eval(), optimize_numerics=False)
    except Exception as exc:  # tracing is best-effort: the caller falls back to Python
        raise GraphError(f"cannot trace the {kind} path: {exc}") from exc
    traced_path = TracedPath(graph, kind, backbones, precision)
    for n, rows in enumerate(_CHECK_BATCHES):
        texts = [_TRACE_TEXTS[i] for i in rows] if with_text else None
        pixels = _probe_pixels(backbones, len(rows), seed=n + 1) if with_image else None
        expected = tower.encode(texts, pixels, precision=precision, use_graphs=False)
        try:
            got = traced_path(texts, pixels).numpy()
        except Exception as exc:  # e.g. a JIT pass this build of torch lacks
            raise GraphError(f"the traced {kind} path fails on {len(rows)} probe samples: {exc}") from exc
        cosine = float(np.min(np.sum(expected * got, axis=1)))
        if not cosine >= MIN_COSINE:
            raise GraphError(f"traced {kind} path disagrees with the Python path (cosine {cosine:.5f} "
                             f"< {MIN_COSINE} on {len(rows)} probe samples)")
    return traced_path
