"""engine.cpu_features: the one CPU-feature probe and its ECSEARCH_CPU_ISA override."""
from __future__ import annotations

import pytest
import torch

from engine.cpu_features import (ISA_ENV, ISA_LEVELS, CpuFeatureError, bf16_is_fast, bf16_runs, cpu_isa,
                                 describe_cpu, detected_isa)

pytestmark = pytest.mark.isa  # depends on the CPU's ISA: CI reruns it as on an AVX2-only CPU


def test_detected_isa_follows_torchs_capability(monkeypatch):
    monkeypatch.delenv(ISA_ENV, raising=False)
    capability = torch.backends.cpu.get_cpu_capability().upper()
    found = detected_isa()
    assert found in ISA_LEVELS and cpu_isa() == found
    assert found.startswith("avx512") or found == "amx" if capability.startswith("AVX512") else found in ("avx2", "default")


def test_override_lowers_the_isa_and_every_bf16_decision(monkeypatch):
    found = ISA_LEVELS.index(detected_isa())
    for level in ISA_LEVELS[: found + 1]:
        monkeypatch.setenv(ISA_ENV, level.upper())
        assert cpu_isa() == level
        assert bf16_is_fast("cpu") == (level in ("avx512_bf16", "amx"))
        assert bf16_runs("cpu") == (level in ("avx512", "avx512_bf16", "amx"))
        assert f"isa={level}" in describe_cpu()
    for level in ISA_LEVELS[found + 1:]:  # exercised where the CPU (or CI's AVX2 pass) is below AMX
        monkeypatch.setenv(ISA_ENV, level)
        with pytest.raises(CpuFeatureError, match="above what this CPU runs"):
            cpu_isa()


def test_unknown_override_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(ISA_ENV, "avx1024")
    with pytest.raises(CpuFeatureError, match="expected one of default, avx2, avx512"):
        cpu_isa()
