"""The encode stage's resumable chunk files: ``chunk_<start>.npy`` (float32 (count, d), zero
rows for rejects) + ``chunk_<start>.json`` (outcome per product), each written to a temporary
name, fsynced and renamed, so a killed job resumes at the first missing chunk. Written by both
executors (local and Ray). Source: our choice.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def _chunk_paths(work: Path, start: int) -> tuple[Path, Path]:
    return work / f"chunk_{start:09d}.npy", work / f"chunk_{start:09d}.json"


def load_chunk(work: Path, start: int, count: int, dim: int) -> tuple[np.ndarray, dict] | None:
    """A chunk written by an earlier run, or None when absent / incomplete / unreadable."""
    npy, meta = _chunk_paths(work, start)
    if not (npy.is_file() and meta.is_file()):
        return None
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
        vecs = np.load(npy)
    except (OSError, ValueError):
        return None
    if info.get("start") != start or info.get("count") != count or vecs.shape != (count, dim):
        return None
    return vecs, info


def save_chunk(work: Path, start: int, vecs: np.ndarray, info: dict) -> None:
    """Write chunk ``start`` (vectors float32 (count, d) + outcome dict) atomically."""
    npy, meta = _chunk_paths(work, start)
    for path, write in ((meta, lambda f: f.write(json.dumps(info).encode())), (npy, lambda f: np.save(f, vecs))):
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
