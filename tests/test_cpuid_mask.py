"""bench/cpuid_avx2.c: the preloaded CPUID mask that makes every library see a smaller CPU.

Built with the machine's C compiler and run on a real CPUID probe (a small C program) and on
ecsearch's own probe (engine.cpu_features in a fresh interpreter). Skips where the kernel
cannot fault CPUID (no ``cpuid_fault`` flag) or no C compiler is found.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cpu_features import CPUID_MASK_ENV, cpu_flags

ROOT = Path(__file__).resolve().parents[1]
PROBE_C = r"""
#include <cpuid.h>
#include <stdio.h>
int main(void) {
    unsigned a, b, c, d;
    __cpuid_count(7, 0, a, b, c, d);
    printf("avx2=%u avx512f=%u amx_tile=%u ", (b >> 5) & 1, (b >> 16) & 1, (d >> 24) & 1);
    __cpuid_count(7, 1, a, b, c, d);
    printf("avx512_bf16=%u\n", (a >> 5) & 1);
    return 0;
}
"""


FLAGS = cpu_flags()
CC = shutil.which("cc") or shutil.which("gcc")
pytestmark = pytest.mark.skipif("cpuid_fault" not in FLAGS or CC is None,
                                reason="needs Linux CPUID faulting (the cpuid_fault flag) and a C compiler")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("cpuid")
    shim, probe = out / "cpuid_avx2.so", out / "probe"
    (out / "probe.c").write_text(PROBE_C)
    subprocess.run([CC, "-O2", "-shared", "-fPIC", "-o", str(shim), str(ROOT / "bench" / "cpuid_avx2.c"), "-ldl"],
                   check=True)
    subprocess.run([CC, "-O2", "-o", str(probe), str(out / "probe.c")], check=True)
    return shim, probe


def _run(cmd: list[str], shim: Path, level: str | None, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in (CPUID_MASK_ENV, "LD_PRELOAD", "ECSEARCH_CPU_ISA",
                                                           "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    env["LD_PRELOAD"] = str(shim)
    if level is not None:
        env[CPUID_MASK_ENV] = level
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, **kwargs)


def _bits(line: str) -> dict[str, int]:
    return {key: int(value) for key, value in (item.split("=") for item in line.split())}


def test_default_mask_leaves_avx2_only(built):
    shim, probe = built
    result = _run([str(probe)], shim, None)
    assert result.returncode == 0, result.stderr
    assert _bits(result.stdout) == {"avx2": int("avx2" in FLAGS), "avx512f": 0, "amx_tile": 0, "avx512_bf16": 0}


def test_avx512_bf16_level_hides_amx_only(built):
    shim, probe = built
    result = _run([str(probe)], shim, "avx512_bf16")
    assert result.returncode == 0, result.stderr
    assert _bits(result.stdout) == {"avx2": int("avx2" in FLAGS), "avx512f": int("avx512f" in FLAGS),
                                    "amx_tile": 0, "avx512_bf16": int("avx512_bf16" in FLAGS)}


def test_unknown_level_exits_3_with_the_reason(built):
    shim, probe = built
    result = _run([str(probe)], shim, "avx1024")
    assert result.returncode == 3
    assert "ECSEARCH_CPUID_MAX_ISA=avx1024: expected avx2 or avx512_bf16" in result.stderr


@pytest.mark.skipif("amx_tile" not in FLAGS or "avx512_bf16" not in FLAGS, reason="needs an AMX CPU to hide AMX on")
def test_ecsearch_probe_sees_avx512_bf16_on_an_amx_cpu(built):
    shim, _ = built
    code = "from engine.cpu_features import detected_isa, describe_cpu; print(detected_isa()); print(describe_cpu())"
    result = _run([sys.executable, "-c", code], shim, "avx512_bf16", cwd=ROOT)
    assert result.returncode == 0, result.stderr
    found, line = result.stdout.splitlines()[-2:]
    assert found == "avx512_bf16"
    assert f"{CPUID_MASK_ENV}=avx512_bf16" in line and "emulated on amx hardware" in line
