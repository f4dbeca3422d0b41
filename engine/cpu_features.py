"""What the CPU can run fast: the one place ecsearch decides on CPU-feature-dependent paths.

Every path that depends on the CPU (bf16 weights, bf16 autocast in indexing and in the text
encoder's distillation, the serving backend that ``--precision auto`` picks; training itself
runs fp32 on every CPU, ``engine.training.cli``) asks :func:`cpu_isa` or
:func:`bf16_is_fast` here, never torch directly, so one override moves all of them:

``ECSEARCH_CPU_ISA=avx2|avx512|avx512_bf16|amx`` caps the ISA ecsearch believes it has (it
can only lower it: asking for AMX on an AVX2 CPU is an error). CI's AVX2 pass runs the
suite with ``ECSEARCH_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``, the
path a plain AVX2 machine takes. Our choice.
"""
from __future__ import annotations

import os
from functools import lru_cache

import torch

#: ISA levels, lowest first. "avx512_bf16": AVX-512 with native bf16 dot products (and the
#: BW/VL/DQ subsets oneDNN needs); "amx": Intel AMX tiles (bf16/int8 matrix units).
ISA_LEVELS = ("default", "avx2", "avx512", "avx512_bf16", "amx")
ISA_ENV = "ECSEARCH_CPU_ISA"
# Read by bench/cpuid_avx2.c when preloaded (how far it masks CPUID); named in describe_cpu().
CPUID_MASK_ENV = "ECSEARCH_CPUID_MAX_ISA"


class CpuFeatureError(ValueError):
    """``ECSEARCH_CPU_ISA`` names an unknown ISA, or one above what the CPU has."""


def _probe(name: str) -> bool:
    check = getattr(torch.cpu, name, None)
    try:
        return bool(check and check())
    except Exception:  # a probe that is missing or fails means "no"
        return False


@lru_cache(maxsize=None)
def detected_isa() -> str:
    """The highest ISA level of ``ISA_LEVELS`` that this CPU *and* torch's kernels run,
    ignoring the override. ``ATEN_CPU_CAPABILITY`` lowers what torch runs, so it lowers this."""
    capability = torch.backends.cpu.get_cpu_capability()  # "DEFAULT" | "AVX2" | "AVX512" | ...
    if capability.upper().startswith("AVX512"):
        if _probe("_is_amx_tile_supported"):
            return "amx"
        if _probe("_is_avx512_bf16_supported"):
            return "avx512_bf16"
        return "avx512"
    if capability.upper() == "AVX2":
        return "avx2"
    return "default"


@lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as the kernel lists them (``/proc/cpuinfo``, first ``flags`` line,
    e.g. ``"avx2"``, ``"amx_tile"``, ``"cpuid_fault"``); empty where there is no such file (not Linux).
    Read from the kernel, so a preloaded CPUID mask (``bench/cpuid_avx2.c``) does not change it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((frozenset(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")),
                        frozenset())
    except OSError:
        return frozenset()


@lru_cache(maxsize=None)
def hardware_isa() -> str:
    """The ISA level of the CPU itself, from ``/proc/cpuinfo`` flags (Linux), whatever torch or
    the override run; ``"unknown"`` elsewhere. For benchmark lines: an emulated AVX2 run on an
    AMX machine says so."""
    flags = cpu_flags()
    for level, flag in (("amx", "amx_tile"), ("avx512_bf16", "avx512_bf16"), ("avx512", "avx512f"), ("avx2", "avx2")):
        if flag in flags:
            return level
    return "default" if flags else "unknown"


def cpu_isa() -> str:
    """The ISA level ecsearch uses: :func:`detected_isa`, lowered by ``ECSEARCH_CPU_ISA``.

    Returns one of ``ISA_LEVELS``. Raises :class:`CpuFeatureError` when the override is not
    a level, or is above the detected one.
    """
    found = detected_isa()
    wanted = os.environ.get(ISA_ENV, "").strip().lower()
    if not wanted:
        return found
    if wanted not in ISA_LEVELS:
        raise CpuFeatureError(f"{ISA_ENV}={wanted!r}: expected one of {', '.join(ISA_LEVELS)}")
    if ISA_LEVELS.index(wanted) > ISA_LEVELS.index(found):
        raise CpuFeatureError(f"{ISA_ENV}={wanted!r} is above what this CPU runs ({found})")
    return wanted


def bf16_is_fast(device: str | torch.device = "cpu") -> bool:
    """True when bfloat16 matmuls run natively on ``device``, i.e. when ``precision="bf16"``
    is a speed-up and safe to take: CPU at ISA level ``avx512_bf16`` or ``amx`` (after the
    override); CUDA with compute capability >= 8.0. Our choice."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return ISA_LEVELS.index(cpu_isa()) >= ISA_LEVELS.index("avx512_bf16")


def bf16_runs(device: str | torch.device = "cpu") -> bool:
    """True when bf16 kernels run at all on ``device`` (they may be emulated and slow).
    oneDNN refuses bf16 below AVX-512 (BW/VL/DQ) unless the CPU has AVX-NE-CONVERT; we
    treat anything below ``avx512`` as "no". Tests of bf16 paths skip when this is False."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return ISA_LEVELS.index(cpu_isa()) >= ISA_LEVELS.index("avx512")


def describe_cpu() -> str:
    """One line for logs and benchmarks: ISA used, ISA detected, torch's capability, model name."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    caps = [f"{name}={os.environ[name]}" for name in (ISA_ENV, "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                                                       CPUID_MASK_ENV) if os.environ.get(name)]
    extra = f" (emulated on {hardware_isa()} hardware: {' '.join(caps)})" if caps else ""
    return (f"isa={cpu_isa()}{extra} detected={detected_isa()} "
            f"torch_capability={torch.backends.cpu.get_cpu_capability()} cpu={model!r} cores={os.cpu_count()}")
