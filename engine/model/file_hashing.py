"""The one file-hashing loop: sha256 over a file's bytes, read in 1 MiB blocks.

Used for model-folder fingerprints (``engine.model.model_folder``), backbone fingerprints
(``engine.model.backbones.fingerprint``) and index-version file checksums (``indexer.manifest``).
Source: our choice.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

BLOCK_BYTES = 1 << 20


def update_with_file(digest: "hashlib._Hash", path: str | Path) -> None:
    """Feed the bytes of ``path`` into ``digest``. Raises OSError (e.g. FileNotFoundError)."""
    with open(path, "rb") as fh:
        while block := fh.read(BLOCK_BYTES):
            digest.update(block)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of the file's bytes."""
    digest = hashlib.sha256()
    update_with_file(digest, path)
    return digest.hexdigest()


def sha256_named_files(files: Iterable[tuple[str, str | Path]]) -> str:
    """Hex sha256 over ``(name, path)`` pairs in the given order: each name (UTF-8), then
    the file's bytes."""
    digest = hashlib.sha256()
    for name, path in files:
        digest.update(name.encode())
        update_with_file(digest, path)
    return digest.hexdigest()
