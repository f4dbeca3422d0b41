"""Which query tower path a server runs: precision x graph backend, chosen for the CPU it finds.

``--precision auto --backend auto`` (the default) picks, from ``engine.cpu_features``:

| CPU ISA (after ``ECSEARCH_CPU_ISA``) | precision | backend |
|---|---|---|
| ``avx512_bf16``, ``amx`` | bf16 | TorchScript (bf16 weights, oneDNN-packed linears) |
| ``avx2``, ``avx512``, ``default`` | fp32 | ONNX Runtime (TorchScript when onnxruntime is missing) |

The figures behind the table are in docs/serving.md (bf16 TorchScript is the fastest path
where the CPU has native bf16; without it, fp32 ONNX Runtime beats fp32 TorchScript). A kind
of batch whose graph cannot be built, or disagrees with the Python path, falls back to
TorchScript, then to Python, with a warning; the chosen path is logged at start-up. Our choice.
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

PRECISION_CHOICES = ("auto", "fp32", "bf16")
BACKEND_CHOICES = ("auto", "torchscript", "onnxruntime", "onnxruntime-int8", "python")


class BackendError(ValueError):
    """A precision / backend combination that cannot run (e.g. bf16 on ONNX Runtime)."""


@dataclass(frozen=True)
class TowerPlan:
    """What the query tower runs: ``precision`` ("fp32" | "bf16", the weights and the
    ``Tower.encode`` precision) and ``backend`` ("torchscript" | "onnxruntime" |
    "onnxruntime-int8" | "python"); ``isa`` is the ISA level the choice was made for."""

    precision: str
    backend: str
    isa: str


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

    if precision not in PRECISION_CHOICES:
        raise BackendError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {precision!r}")
    if backend not in BACKEND_CHOICES:
        raise BackendError(f"backend must be one of {', '.join(BACKEND_CHOICES)}, got {backend!r}")
    isa = cpu_isa()
    if precision == "auto":
        precision = "bf16" if bf16_is_fast("cpu") else "fp32"
    if not graphs:
        backend = "python"
    elif backend == "auto":
        backend = "onnxruntime" if precision == "fp32" and onnxruntime_available() else "torchscript"
    if backend.startswith("onnxruntime") and precision != "fp32":
        raise BackendError(f"the {backend} backend runs fp32 weights; use --precision fp32 (or auto on a CPU "
                           f"without native bf16), not {precision}")
    return TowerPlan(precision, backend, isa)


def prepare_tower(tower, plan: TowerPlan, threads: int) -> str:
    """Build ``plan``'s graphs on ``tower`` (after ``cast_for_inference(plan.precision)``);
    kinds the backend refuses fall back (int8 → fp32 ONNX Runtime → TorchScript → Python),
    each step with a warning.

    Returns:
        One line for the start-up log, e.g. ``"onnxruntime fp32 (isa=avx2): text, image,
        text+image"``.
    """
    from engine.tower_graphs import KINDS

    if plan.backend == "python":
        return f"python {plan.precision} (isa={plan.isa}; --no-graphs)"
    chain = {"onnxruntime-int8": ("onnxruntime-int8", "onnxruntime", "torchscript"),
             "onnxruntime": ("onnxruntime", "torchscript")}.get(plan.backend, ("torchscript",))
    built: dict = {}
    refused: dict = dict.fromkeys(KINDS, "")
    for position, backend in enumerate(chain):
        if position:
            for kind, reason in refused.items():
                log.warning("%s queries: %s refused (%s); trying %s", kind, chain[position - 1], reason, backend)
        refused = tower.use_graphs(plan.precision, kinds=tuple(refused), backend=backend, threads=threads)
        built.update(tower.graphs)
        if not refused:
            break
    tower.graphs = built
    for kind, reason in refused.items():
        log.warning("%s queries run in Python: %s", kind, reason)
    groups: dict[str, list[str]] = {}
    for kind, graph in built.items():
        groups.setdefault(graph.backend, []).append(kind)
    if refused:
        groups.setdefault(f"python {plan.precision}", []).extend(refused)
    return "; ".join(f"{name} (isa={plan.isa}): {', '.join(kinds)}" for name, kinds in groups.items())
