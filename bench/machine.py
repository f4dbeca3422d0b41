"""Describe the machine a benchmark ran on (CPU model, cores, memory, library versions)."""
from __future__ import annotations

import os
import platform


def describe_machine() -> str:
    """One line: CPU model, logical cores, RAM GiB, Python / torch / faiss / onnxruntime versions, GPU if
    any, then ``engine.cpu_features.describe_cpu()`` (ISA used and detected, torch's capability)."""
    cpu = platform.processor() or "unknown cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = 0.0
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        pass
    parts = [f"cpu={cpu}", f"cores={os.cpu_count()}", f"ram={mem_gib:.0f}GiB", f"python={platform.python_version()}"]
    try:
        import torch

        parts.append(f"torch={torch.__version__} threads={torch.get_num_threads()}")
        parts.append(f"cuda={torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "cuda=none")
    except ImportError:
        pass
    try:
        import faiss

        parts.append(f"faiss={faiss.__version__} gpus={faiss.get_num_gpus()}")
    except ImportError:
        pass
    try:
        import onnxruntime

        parts.append(f"onnxruntime={onnxruntime.__version__}")
    except ImportError:
        pass
    try:
        from engine.cpu_features import describe_cpu

        parts.append(f"| {describe_cpu()}")  # the ISA ecsearch uses (ECSEARCH_CPU_ISA) and torch's
    except ImportError:
        pass
    return " ".join(parts)
