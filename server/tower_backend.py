"""Which query tower path a server runs: precision x graph backend, chosen for the CPU it finds.

``--precision auto --backend auto`` (the default) picks, from ``engine.cpu_features``:

| CPU ISA (after ``ECSEARCH_CPU_ISA``) | text-only batches | image-only, text+image batches |
|---|---|---|
| every ISA, onnxruntime installed | int8 ONNX Runtime if it passes its gate, else fp32 | fp32 ONNX Runtime |
| ``avx512_bf16``, ``amx``, no onnxruntime | bf16 TorchScript (oneDNN-packed bf16 linears) | bf16 TorchScript |
| other ISAs, no onnxruntime | fp32 TorchScript | fp32 TorchScript |

The figures behind the table are in docs/serving.md: ONNX Runtime's fp32 kernels beat
TorchScript for the convolutional image backbone on every CPU measured, and since text-only
queries run the distilled text encoder (two backbone layers) the int8 text graph beats bf16
TorchScript even where bf16 is native (AMX Xeon, text at concurrency 8 over gRPC: p50 12.6-12.9
against 14.8-15.1 ms). ``--precision auto`` tries the smoothed int8 text path
(``engine.model.tower_int8``), kept only where its min cosine to fp32 over up to 720 real
queries from the served index's products is ≥ 0.995 (measured when exported, recorded in the
ONNX cache); an explicit ``--precision fp32`` stays fp32, an explicit ``--precision bf16``
runs text through bf16 TorchScript. A kind of batch
whose graph cannot be built, or disagrees with the Python path, falls back (int8 → fp32 ONNX Runtime → TorchScript →
Python) with a warning; the plan is logged at start-up, what was built once the model is
loaded. Our choice.
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PRECISION_CHOICES = ("auto", "fp32", "bf16")
BACKEND_CHOICES = ("auto", "torchscript", "onnxruntime", "onnxruntime-int8", "python")
# ONNX Runtime backends tried, in order, before TorchScript (then Python) takes a kind
_ONNX_CHAINS = {"onnxruntime-int8": ("onnxruntime-int8", "onnxruntime"), "onnxruntime": ("onnxruntime",)}


class BackendError(ValueError):
    """A precision / backend combination that cannot run (e.g. bf16 on ONNX Runtime)."""


@dataclass(frozen=True)
class TowerPlan:
    """What the query tower runs: ``precision`` ("fp32" | "bf16": the weights of the Python and
    TorchScript paths, and the ``Tower.encode`` precision), ``backends`` (kind of batch →
    "torchscript" | "onnxruntime" | "onnxruntime-int8" | "python"; ONNX Runtime always runs
    fp32), and ``isa``, the ISA level the choice was made for."""

    precision: str
    backends: dict
    isa: str

    def describe(self) -> str:
        """E.g. ``"text: torchscript bf16; image, text+image: onnxruntime fp32 (isa=amx)"``."""
        groups: dict[str, list[str]] = {}
        for kind, backend in self.backends.items():
            name = {"onnxruntime": "onnxruntime fp32", "onnxruntime-int8": "onnxruntime int8 if its gate passes, "
                    "else fp32"}.get(backend, f"{backend} {self.precision}")
            groups.setdefault(name, []).append(kind)
        return "; ".join(f"{', '.join(kinds)}: {name}" for name, kinds in groups.items()) + f" (isa={self.isa})"


def onnxruntime_available() -> bool:
    """True when the ``onnxruntime`` package can be imported."""
    return importlib.util.find_spec("onnxruntime") is not None


def plan_tower(precision: str = "auto", backend: str = "auto", graphs: bool = True) -> TowerPlan:
    """Resolve ``--precision`` / ``--backend`` (``graphs=False``: ``--no-graphs``, Python) for this CPU.

    Raises:
        BackendError: unknown choice, or an ONNX Runtime backend asked for with bf16.
        engine.cpu_features.CpuFeatureError: a bad ``ECSEARCH_CPU_ISA``.
    """
    from engine.cpu_features import bf16_is_fast, cpu_isa
    from engine.model.tower_graphs import KINDS

    if precision not in PRECISION_CHOICES:
        raise BackendError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {precision!r}")
    if backend not in BACKEND_CHOICES:
        raise BackendError(f"backend must be one of {', '.join(BACKEND_CHOICES)}, got {backend!r}")
    isa, auto = cpu_isa(), precision == "auto"
    if precision == "auto":  # ONNX Runtime (auto where installed, or asked for) runs fp32 on any CPU
        onnx = backend.startswith("onnxruntime") or (graphs and backend == "auto" and onnxruntime_available())
        precision = "bf16" if bf16_is_fast("cpu") and not onnx else "fp32"
    if backend.startswith("onnxruntime") and precision != "fp32":
        raise BackendError(f"the {backend} backend runs fp32 weights; use --precision fp32 (or auto on a CPU "
                           f"without native bf16), or --backend auto, not --precision {precision}")
    if not graphs:
        backends = dict.fromkeys(KINDS, "python")
    elif backend != "auto":
        backends = dict.fromkeys(KINDS, backend)
    else:
        fp32_graphs = "onnxruntime" if onnxruntime_available() else "torchscript"
        backends = dict.fromkeys(KINDS, fp32_graphs)
        if auto and precision == "fp32" and fp32_graphs == "onnxruntime":  # int8 text, if it passes its gate
            backends["text"] = "onnxruntime-int8"
        if precision == "bf16":  # asked for (or no onnxruntime): bf16 TorchScript for text
            backends["text"] = "torchscript"
    return TowerPlan(precision, backends, isa)


def onnx_cache_for(model, folder: str | Path | None = "auto"):
    """The ``engine.model.onnx_cache.OnnxCache`` the server keeps ``model``'s ONNX graphs in.

    ``folder``: "auto" → ``<model folder>/../cache/onnx`` (e.g. ``var/cache/onnx`` for the
    demo's ``var/model``); None or "none" → no cache (export at every start). Also None for
    a model that was not loaded from a folder (no fingerprint to key the cache on).
    """
    from engine.model.onnx_cache import OnnxCache
    from engine.model.tower_onnx import OPSET

    if folder is None or str(folder) == "none" or not getattr(model, "fingerprint", None):
        return None
    if str(folder) == "auto":
        if getattr(model, "folder", None) is None:
            return None
        folder = Path(model.folder).resolve().parent / "cache" / "onnx"
    return OnnxCache(folder, model.fingerprint, OPSET)


def index_queries(index, count: int = 900, seed: int = 0) -> list[str]:
    """Real query strings from the products of ``index`` (an ``indexer.search.IndexVersion``):
    up to ``count`` titles, brand + type and attribute phrases of up to ``count`` products
    drawn with ``seed`` (``engine.model.tower_int8.product_queries``); they calibrate and
    gate the int8 text path. Empty when the index has no titled products."""
    import random

    from engine.model.tower_graphs import GraphError
    from engine.model.tower_int8 import product_queries

    drawn = random.Random(seed).sample(range(index.n_items), min(index.n_items, count))
    try:
        return product_queries(index.records(sorted(drawn)), count, seed)
    except GraphError:
        return []


def prepare_query_tower(model, plan: TowerPlan, threads: int, onnx_cache=None, int8_queries=None) -> str:
    """Build ``plan``'s graphs on ``model.query_tower`` and store its weights for
    ``plan.precision`` (``cast_for_inference``): ONNX Runtime graphs are exported first, from
    the fp32 weights, or taken from ``onnx_cache`` (``onnx_cache_for``); ``int8_queries``
    (``index_queries``) calibrate and gate an int8 text path. A kind its backend
    refuses falls back (int8 → fp32 ONNX Runtime → TorchScript → Python), each step with a
    warning. ``model`` must hold fp32 weights.

    Returns:
        One line for the start-up log: what each kind of batch runs through, e.g. ``"text:
        torchscript bf16; image, text+image: onnxruntime fp32 (isa=amx)"``, and the layers of the
        distilled text encoder text-only queries run when the model has one
        (``engine.model.text_student``).
    """
    from engine.model.tower_graphs import KINDS

    tower = model.query_tower
    built: dict = {}
    for kind in KINDS:
        backend = plan.backends[kind]
        chain = _ONNX_CHAINS.get(backend, ())
        for position, step in enumerate(chain):
            reason = tower.use_graphs("fp32", kinds=(kind,), backend=step, threads=threads,
                                      onnx_cache=onnx_cache, int8_queries=int8_queries).get(kind)
            if reason is None:
                built[kind] = tower.graphs[kind]
                break
            log.warning("%s queries: %s refused (%s); trying %s", kind, step, reason,
                        chain[position + 1] if position + 1 < len(chain) else "torchscript")
    model.cast_for_inference(plan.precision)
    traced = [kind for kind in KINDS if kind not in built and plan.backends[kind] != "python"]
    refused = tower.use_graphs(plan.precision, kinds=traced, backend="torchscript") if traced else {}
    built.update(tower.graphs if traced else {})
    tower.graphs = built
    for kind, reason in refused.items():
        log.warning("%s queries run in Python: %s", kind, reason)
    groups: dict[str, list[str]] = {}
    for kind in KINDS:
        name = built[kind].backend if kind in built else f"python {plan.precision}"
        groups.setdefault(name, []).append(kind)
    student = tower.text_student
    encoder = "" if student is None else f"; text-only queries: distilled text encoder, backbone layers {list(student.keep)}"
    return "; ".join(f"{', '.join(kinds)}: {name}" for name, kinds in groups.items()) + f" (isa={plan.isa}){encoder}"
