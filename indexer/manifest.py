"""``manifest.json`` of an index version: what was built, from what, and file checksums.

The manifest names every data file of the version with its ``size_bytes`` and ``sha256``;
``verify_files`` recomputes them so a corrupted or truncated file is refused on open with
a precise error instead of giving wrong results. Source: our choice.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from engine.model.file_hashing import sha256_file
from indexer.errors import IndexIntegrityError, IndexVersionError

MANIFEST = "manifest.json"
FORMAT = "ecsearch-index-v1"
# what opening a version reads from its manifest (dotted = nested); checked before any file opens
REQUIRED_KEYS = ("version", "dim", "files", "shards", "index", "index.nlist", "index.nprobe_default", "refine",
                 "refine.default", "refine.k_factor", "vectors", "vectors.file", "metadata", "metadata.file",
                 "counts", "counts.indexed")


def describe_file(path: Path) -> dict[str, Any]:
    """``{"size_bytes", "sha256"}`` of ``path``."""
    return {"size_bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(version_dir: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest`` (with ``format`` set) as ``version_dir/manifest.json``, fsynced."""
    manifest = {"format": FORMAT, **manifest}
    path = version_dir / MANIFEST
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=False, ensure_ascii=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    return path


def read_manifest(version_dir: Path) -> dict[str, Any]:
    """Load and sanity-check ``version_dir/manifest.json``: the format and every key of
    ``REQUIRED_KEYS`` (and each shard's ``file`` / ``items``).

    Raises IndexVersionError (no manifest, another format) or IndexIntegrityError
    (unreadable, or a key missing: named, dotted, e.g. ``'refine.k_factor'``)."""
    path = Path(version_dir) / MANIFEST
    if not path.is_file():
        raise IndexVersionError(f"{version_dir}: not an index version (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexIntegrityError(f"{path}: unreadable manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise IndexVersionError(f"{path}: format {found!r}, expected {FORMAT!r}")
    missing = next((key for key in REQUIRED_KEYS if not _has(manifest, key)), None)
    if missing is not None:
        raise IndexIntegrityError(f"{path}: manifest lacks {missing!r}")
    for n, shard in enumerate(manifest["shards"] if isinstance(manifest["shards"], list) else [None]):
        if not isinstance(shard, dict) or "file" not in shard or "items" not in shard:
            raise IndexIntegrityError(f"{path}: manifest lacks 'shards[{n}].file' or 'shards[{n}].items'")
    return manifest


def _has(manifest: dict[str, Any], dotted: str) -> bool:
    node: Any = manifest
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def verify_files(version_dir: Path, manifest: dict[str, Any], checksums: bool = True) -> None:
    """Check every file listed in ``manifest["files"]`` exists with the recorded size and,
    when ``checksums``, the recorded sha256.

    Raises IndexIntegrityError naming the first bad file, expected and found values.
    """
    for name, expected in manifest["files"].items():
        path = Path(version_dir) / name
        if not path.is_file():
            raise IndexIntegrityError(f"{path}: listed in the manifest but missing")
        size = path.stat().st_size
        if size != expected["size_bytes"]:
            raise IndexIntegrityError(
                f"{path}: size {size} bytes, manifest says {expected['size_bytes']} (truncated or replaced file)")
        if checksums:
            found = sha256_file(path)
            if found != expected["sha256"]:
                raise IndexIntegrityError(
                    f"{path}: sha256 {found[:16]}..., manifest says {expected['sha256'][:16]}... (corrupted file)")
