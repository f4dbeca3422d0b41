"""Describe the machine a benchmark ran on (ISA, CPU model, cores, memory, library versions)."""
from __future__ import annotations

import os
import platform


def describe_machine() -> str:
    """One line: ``engine.cpu_features.describe_cpu()`` first (the ISA ecsearch ran on: AVX2 /
    AVX-512 / AVX-512-BF16 / AMX after the ECSEARCH_CPU_ISA override, whether it was emulated,
    torch's capability, CPU model, cores), then RAM GiB and the Python / torch / faiss /
    onnxruntime versions, GPU if any."""
    from engine.cpu_features import describe_cpu

    parts = [describe_cpu()]
    try:
        parts.append(f"ram={os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f}GiB")
    except (ValueError, OSError):
        pass
    parts.append(f"python={platform.python_version()}")
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
    return " ".join(parts)
