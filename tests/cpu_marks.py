"""pytest marks for CPU-feature-dependent tests, decided by engine.cpu_features (so the
ECSEARCH_CPU_ISA override of CI's AVX2 pass moves them too)."""
from __future__ import annotations

import pytest

from engine.cpu_features import bf16_runs, cpu_isa

needs_bf16 = pytest.mark.skipif(
    not bf16_runs("cpu"),
    reason=f"bf16 kernels need AVX-512 (BW/VL/DQ) or better; this run's ISA is {cpu_isa()}")


def precisions() -> list:
    """``["fp32", "bf16"]`` for ``pytest.mark.parametrize``; bf16 skipped where it cannot run."""
    return ["fp32", pytest.param("bf16", marks=needs_bf16)]
