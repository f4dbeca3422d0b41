"""ONNX Runtime graphs of a tower's paths, for fp32 serving: text-only, image-only, text+image.

The same three paths as ``engine.model.tower_graphs`` (token ids + mask and/or pixels → unit
vectors), exported with ``torch.onnx.export`` (dynamic batch and token axes) and run by ONNX
Runtime's CPU provider. Where the CPU has no native bf16 (AVX2), fp32 is the serving
precision, and ORT's fp32 kernels (MLAS) and graph fusions run a short query's few hundred
small ops with less overhead than TorchScript's interpreter: measured figures are in
docs/serving.md. ``session.run`` releases the GIL, as the TorchScript graphs do.

``int8=True`` builds the smoothed int8 text path of ``engine.model.tower_int8`` (ORT dynamic
quantization after SmoothQuant-style smoothing). It is refused unless its vectors keep
cosine ≥ 0.995 to the Python fp32 path on real catalogue queries and on the probe texts.
Exported graphs (and int8 refusals) are kept in an ``engine.model.onnx_cache.OnnxCache``.

Export needs ``nn.MultiheadAttention`` written out (its traced reshapes bake the example's
batch and length into the graph), so the exported copy of the fusion encoder uses
``_ExportAttention``: the same weights and arithmetic, shapes taken at run time. Every graph
is checked against the Python path on probe batches of other sizes and lengths than the
export's, and refused (``GraphError``) when it disagrees. Source: our choice.
"""
from __future__ import annotations

import copy
import logging
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.model.tower_graphs import _CHECK_BATCHES, _TRACE_TEXTS, KINDS, MIN_COSINE, GraphError, _Path, _probe_pixels
from engine.model.tower_int8 import MIN_COSINE_INT8

log = logging.getLogger(__name__)

OPSET = 17


class _ExportAttention(nn.Module):
    """``nn.MultiheadAttention`` (batch_first, no dropout, ``need_weights=False``) as plain
    ops whose shapes are read at run time. Returns ``(output, None)`` like the original."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha.batch_first or mha.in_proj_weight is None:
            raise GraphError("only batch-first attention with a packed input projection can be exported")
        self.heads = mha.num_heads
        self.in_proj_weight, self.in_proj_bias = mha.in_proj_weight, mha.in_proj_bias
        self.out_proj = mha.out_proj

    def _split(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = F.linear(x, weight, bias)  # (B, L, d) → (B, heads, L, d / heads)
        return y.reshape(y.shape[0], y.shape[1], self.heads, -1).transpose(1, 2)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False):
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q, k, v = self._split(query, w_q, b_q), self._split(key, w_k, b_k), self._split(value, w_v, b_v)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if key_padding_mask is not None:  # True = ignore (nn.MultiheadAttention's convention)
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2)
        return self.out_proj(out.reshape(out.shape[0], out.shape[1], -1)), None


def _exportable(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every ``nn.MultiheadAttention`` replaced by ``_ExportAttention``."""
    module = copy.deepcopy(module)
    for name, child in list(module.named_modules()):
        for attr, sub in list(child.named_children()):
            if isinstance(sub, nn.MultiheadAttention):
                setattr(child, attr, _ExportAttention(sub))
    return module


class _KindInputs(nn.Module):
    """A path taking only the inputs its kind uses (ONNX graphs drop unused inputs)."""

    def __init__(self, path: _Path):
        super().__init__()
        self.path = path

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        empty = torch.zeros(0, dtype=torch.long)
        if self.path.kind == "text":
            return self.path(inputs[0], inputs[1], torch.zeros(0))
        if self.path.kind == "image":
            return self.path(empty, empty, inputs[0])
        return self.path(inputs[0], inputs[1], inputs[2])


def _input_names(kind: str) -> list[str]:
    return {"text": ["input_ids", "attention_mask"], "image": ["pixels"],
            "text+image": ["input_ids", "attention_mask", "pixels"]}[kind]


def export_path(tower, kind: str, path: str | Path, text_model: nn.Module | None = None) -> Path:
    """Export ``tower``'s fp32 path for batches of ``kind`` to the ONNX file ``path``
    (``text_model``: in place of ``tower.text_model(kind)``, e.g. a smoothed copy).

    Inputs: ``input_ids int64 (B, L)`` and ``attention_mask int64 (B, L)`` for kinds with
    text, ``pixels float32 (B, 3, S, S)`` for kinds with an image; output ``vectors float32
    (B, d)``, unit rows. B and L are dynamic.

    Raises:
        GraphError: unknown kind, weights not float32, a text backbone without a tokenizer +
            model, or the export fails.
    """
    if kind not in KINDS:
        raise GraphError(f"unknown kind {kind!r}; expected one of {KINDS}")
    if tower.fusion.merge.weight.dtype != torch.float32:
        raise GraphError("ONNX graphs are exported from float32 weights (not after cast_for_inference('bf16'))")
    backbones, text = tower.backbones, tower.backbones.text
    with_text, with_image = kind != "image", kind != "text"
    if with_text and (not hasattr(text, "tokenize") or not hasattr(text, "model")):
        raise GraphError(f"text backbone {type(text).__name__} has no tokenizer + model to export")
    inputs = []
    if with_text:
        example = text.tokenize(list(_TRACE_TEXTS[:3]))
        inputs += [example["input_ids"], example["attention_mask"]]
    if with_image:
        inputs.append(torch.stack(_probe_pixels(backbones, 3, seed=0)))
    axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
            "pixels": {0: "batch"}, "vectors": {0: "batch"}}
    names = _input_names(kind)
    try:
        text_model = _exportable(text_model if text_model is not None else tower.text_model(kind)) if with_text else None
        if text_model is not None and getattr(text_model, "pooler", None) is not None:
            text_model.pooler = None  # unused (METHOD.md §1.1 takes tokens)
        image_backbone = _exportable(backbones.image) if with_image else None
        graph = _KindInputs(_Path(kind, text_model, image_backbone, _exportable(tower.fusion),
                                  text.hidden_size, backbones.image.hidden_size)).eval()
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings on branches fixed for this kind
            torch.onnx.export(graph, tuple(inputs), str(path), dynamo=False, opset_version=OPSET,
                              input_names=names, output_names=["vectors"],
                              dynamic_axes={n: axes[n] for n in names + ["vectors"]})
    except Exception as exc:  # export is best-effort: the caller falls back
        raise GraphError(f"cannot export the {kind} path to ONNX: {exc}") from exc
    return Path(path)


def session_options(threads: int):
    """ORT session options for a serving tower: ``threads`` intra-op threads, no spinning
    (a spinning pool thread steals the core the event loop needs), all graph fusions."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only
    return options


class OnnxPath:
    """An ONNX Runtime session for one kind of batch of one tower; called like
    ``engine.model.tower_graphs.TracedPath`` (B texts and/or B preprocessed images → ``float32
    (B, d)`` unit vectors, input order). ``precision`` is "fp32" (the Python path it
    replaces); it also ``serves`` bf16 requests (the server's plan on bf16 CPUs sends image
    batches here); ``backend`` says "onnxruntime fp32" or "onnxruntime int8". Thread-safe."""

    def __init__(self, session, kind: str, backbones, int8: bool):
        self._session = session
        self.kind = kind
        self._backbones = backbones
        self.precision = "fp32"
        self.serves = ("fp32", "bf16")  # fp32 vectors may answer a bf16 request (same or better accuracy)
        self.backend = f"onnxruntime {'int8' if int8 else 'fp32'}"
        self.calls = 0

    def __call__(self, texts: Sequence | None, pixels: Sequence[torch.Tensor] | None) -> torch.Tensor:
        feed = {}
        if self.kind != "image":
            batch = self._backbones.text.tokenize(list(texts))
            feed["input_ids"] = batch["input_ids"].numpy()
            feed["attention_mask"] = batch["attention_mask"].numpy()
            self._backbones.text.calls += 1
        if self.kind != "text":
            feed["pixels"] = torch.stack(list(pixels)).numpy()
            self._backbones.image.calls += 1
        self.calls += 1
        return torch.from_numpy(self._session.run(["vectors"], feed)[0])


def _export_int8(tower, folder: Path, queries, threads: int, recipe: str) -> tuple[Path, "OnnxPath", dict]:
    """Smooth, export, quantize with ``recipe`` (``tower_int8.RECIPES``) and gate the text path
    (``engine.model.tower_int8``). Returns the file, its path and the record (gate result + the
    gate queries); raises GraphError, with the gate's figures, when it does not pass."""
    from engine.cpu_features import cpu_isa
    from engine.model import tower_int8

    if not queries:
        raise GraphError("int8 needs real queries to gate it on, and none were given (no served index products)")
    calibration, gate_queries = tower_int8.split_queries(queries)
    if len(gate_queries) < tower_int8.MIN_GATE_QUERIES:
        raise GraphError(f"int8 needs at least {tower_int8.MIN_GATE_QUERIES} real queries to gate it on, "
                         f"the index gives {len(gate_queries)}")
    smoothed = tower_int8.smoothed_text_model(tower.backbones.text, calibration, model=tower.text_model("text"))
    model_file = export_path(tower, "text", folder / "path.onnx", text_model=smoothed)
    quantized = folder / "path-int8.onnx"
    tower_int8.quantize_text_graph(model_file, quantized, cpu_isa(), recipe)
    path = OnnxPath(_session(quantized, "text", threads), "text", tower.backbones, True)
    result = tower_int8.gate(tower, path, gate_queries)
    record = {"kind": "text", "int8": True, "gate": result, "gate_queries": gate_queries, "alpha": tower_int8.ALPHA,
              "uint8_weights": tower_int8.uint8_weights(cpu_isa()), "recipe": recipe}
    if not result["passed"]:
        raise _Int8Refused(f"int8 text path ({recipe}) refused: min cosine {result['min_cosine']:.5f} < "
                           f"{tower_int8.MIN_COSINE_INT8} "
                           f"to fp32 over {result['queries']} real queries", record)
    return quantized, path, record


class _Int8Refused(GraphError):
    """The int8 gate failed; ``record`` (its figures) is cached so later starts skip it."""

    def __init__(self, message: str, record: dict):
        super().__init__(message)
        self.record = record


def _session(model_file: Path, kind: str, threads: int):
    """An ORT session of ``model_file`` (read into memory: the file may go afterwards)."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(model_file), session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise GraphError(f"onnxruntime cannot load the {kind} path: {exc}") from exc


def _cached_path(tower, kind: str, threads: int, int8: bool, cache, key: str) -> OnnxPath | None:
    """The path of cache entry ``key``, or None (no entry; an unloadable one is discarded).
    Checked against the Python path again unless the entry was checked on this ISA level.
    Raises GraphError for a cached int8 refusal."""
    from engine.cpu_features import cpu_isa

    hit = cache.lookup(key)
    if hit is None:
        return None
    if hit[0] is None:
        raise _Int8Refused(f"{hit[1]['refused']} (measured at an earlier start, cached in {cache.folder})", hit[1])
    try:
        path = OnnxPath(_session(hit[0], kind, threads), kind, tower.backbones, int8)
        if hit[1].get("checked_isa") != cpu_isa():
            _check(tower, path, MIN_COSINE_INT8 if int8 else MIN_COSINE)
    except GraphError as exc:
        cache.discard(key, str(exc))
        return None
    log.info("ONNX cache: reusing the %s path (%s) from %s (checked on isa=%s)", kind, path.backend, hit[0],
             hit[1].get("checked_isa"))
    return path


def _exported_path(tower, kind: str, threads: int, int8: bool, cache, key: str | None,
                   queries, recipe: str | None = None) -> OnnxPath:
    """Export ``kind``'s path (int8: with ``recipe``), load and check it; then store it in
    ``cache`` (when given)."""
    from engine.cpu_features import cpu_isa

    with tempfile.TemporaryDirectory(prefix="ecsearch-onnx-") as folder:
        start = time.perf_counter()
        try:
            if int8:
                model_file, path, record = _export_int8(tower, Path(folder), queries, threads, recipe)
            else:
                model_file = export_path(tower, kind, Path(folder) / "path.onnx")
                path, record = OnnxPath(_session(model_file, kind, threads), kind, tower.backbones, False), {}
            cosine = _check(tower, path, MIN_COSINE_INT8 if int8 else MIN_COSINE)
        except _Int8Refused as exc:
            if cache is not None:
                cache.store_refusal(key, str(exc), {**exc.record, "checked_isa": cpu_isa()})
            raise
        record.update({"kind": kind, "int8": int8, "checked_isa": cpu_isa(), "probe_min_cosine": cosine})
        stored = cache.store(key, model_file, record) if cache is not None else None
    log.info("ONNX export: the %s path (%s%s) in %.1f s%s", kind, path.backend, f", {recipe}" if int8 else "",
             time.perf_counter() - start, f", cached as {stored[0]}" if stored else "")
    return path


def onnx_path(tower, kind: str, threads: int = 1, int8: bool = False, cache=None, queries=None) -> OnnxPath:
    """Export ``tower``'s fp32 path of ``kind``, load it into ONNX Runtime, check it.

    ``int8`` (text only): smoothed dynamic int8, kept only when its min cosine to fp32 over
    real ``queries`` (``tower_int8.product_queries``; 4 in 5 gate it, 1 in 5 calibrate the
    smoothing) is ≥ 0.995 (``engine.model.tower_int8``); the CPU's recipes
    (``tower_int8.recipes``) are tried in order and the first that passes is kept, each
    cached (a refusal too) under its own key.
    ``cache``: an ``engine.model.onnx_cache.OnnxCache``; the graph is taken from it when an
    intact entry exists (logged "ONNX cache: reusing ..."), else exported, checked (logged
    "ONNX export: ...") and stored there with the check's result and ISA level (an int8
    refusal is stored too). None: exported into a temporary folder, not kept. A cached
    graph checked on another ISA level is checked again; one that fails is exported again.

    Raises:
        GraphError: onnxruntime missing, export fails, int8 asked for a kind with an image,
            int8 without queries or below its gate, or the session's vectors differ from
            ``tower.encode``'s (cosine < 0.999 fp32, < 0.995 int8) on probe batches of
            other sizes and lengths than the export's.
    """
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise GraphError(f"onnxruntime is not installed: {exc}") from exc
    from engine.cpu_features import cpu_isa
    from engine.model import tower_int8

    if int8 and kind != "text":
        raise GraphError(f"int8 is only offered for the text path, not {kind}")
    refusals = []
    for recipe in tower_int8.recipes(cpu_isa()) if int8 else (None,):
        key = cache.key(tower.name, kind, _variant(recipe)) if cache is not None else None
        try:
            path = _cached_path(tower, kind, threads, int8, cache, key) if cache is not None else None
            return path if path is not None else _exported_path(tower, kind, threads, int8, cache, key, queries, recipe)
        except GraphError as exc:  # an int8 recipe refused (gate or probe texts): the next one, if any
            if not int8:
                raise
            refusals.append(str(exc))
    raise GraphError("; ".join(refusals))


def _variant(recipe: str | None) -> str:
    """The cache variant: "fp32" (``recipe`` None), or the int8 ``recipe``'s: int8 graphs (and
    their gate) depend on the recipe and the ISA's kernels."""
    from engine.cpu_features import cpu_isa
    from engine.model import tower_int8

    if recipe is None:
        return "fp32"
    weights = "u8u8" if tower_int8.uint8_weights(cpu_isa()) else "u8s8"
    return (f"int8-smooth{tower_int8.ALPHA}-{weights}-{recipe.replace('-', '')}-{cpu_isa()}"
            f"-gate{tower_int8.QUERIES}")


def _check(tower, path: OnnxPath, min_cosine: float) -> float:
    """Min cosine of ``path``'s vectors to the Python fp32 path's over the probe batches.
    Raises GraphError below ``min_cosine`` or when the session fails."""
    lowest = 1.0
    with_text, with_image = path.kind != "image", path.kind != "text"
    for n, rows in enumerate(_CHECK_BATCHES + ((0, 1, 2, 3, 4),)):
        texts = [_TRACE_TEXTS[i] for i in rows] if with_text else None
        pixels = _probe_pixels(tower.backbones, len(rows), seed=n + 1) if with_image else None
        expected = tower.encode(texts, pixels, precision="fp32", use_graphs=False)
        try:
            got = path(texts, pixels).numpy()
        except Exception as exc:
            raise GraphError(f"the ONNX {path.kind} path fails on {len(rows)} probe samples: {exc}") from exc
        cosine = float(np.min(np.sum(expected * got, axis=1)))
        if not cosine >= min_cosine:
            raise GraphError(f"ONNX {path.kind} path ({path.backend}) disagrees with the Python path "
                             f"(cosine {cosine:.5f} < {min_cosine} on {len(rows)} probe samples)")
        lowest = min(lowest, cosine)
    return lowest
