"""Open file descriptors of this process that point at a given file (via ``/proc/self/fd``).

Used to show that an LMDB environment, a faiss shard or a memmap was really released: the
count of descriptors on ``metadata.lmdb`` before and after an operation. Linux only.
"""
from __future__ import annotations

import os
from pathlib import Path


def open_fds(path: Path) -> int:
    """Number of this process's open file descriptors whose target is ``path``."""
    target = os.path.realpath(path)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                count += 1
        except OSError:  # closed between listdir and readlink
            continue
    return count
