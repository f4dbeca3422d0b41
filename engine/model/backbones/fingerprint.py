"""Content fingerprints of backbone files (sha256), cached per (path, size, mtime)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from engine.model.file_hashing import sha256_named_files

_SKIP = {"README.md", ".gitattributes"}


def fingerprint_path(path: Path) -> str:
    """sha256 hex digest over a file, or over every regular file directly in a folder
    (name + bytes, sorted by name; README skipped). Raises FileNotFoundError."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name not in _SKIP)
    else:
        raise FileNotFoundError(f"backbone path not found: {path}")
    key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _digest(key)


@lru_cache(maxsize=64)
def _digest(key: tuple) -> str:
    return sha256_named_files((Path(name).name, name) for name, _size, _mtime in key)
