"""The base of an incremental build, opened for copying: manifest, shards, vector memmap, metadata.

Lighter than ``indexer.search.open_index``: no search pipeline is built (at 1M items that
would copy the 512 MB of fp16 vectors into a refine index only to read them back), and file
sizes are checked but not their sha256 (the new version's files get fresh checksums).
Source: our choice.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import faiss
import numpy as np

from indexer.errors import IndexIntegrityError
from indexer.manifest import read_manifest, verify_files
from indexer.metadata import MetadataReader


class BaseVersion:
    """An index version opened read-only for an incremental build.

    Attributes: ``path``, ``manifest``, ``version``, ``dim``, ``n_items``, ``nprobe_default``,
    ``k_factor_default``, ``refine_default``, ``refine_storage``, ``_shards`` (faiss indexes), ``_vectors`` (fp16
    memmap (n, d)), ``_metadata`` (``MetadataReader``). Raises IndexVersionError /
    IndexIntegrityError on open."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.manifest: dict[str, Any] = read_manifest(self.path)
        verify_files(self.path, self.manifest, checksums=False)
        m = self.manifest
        self.version, self.dim, self.n_items = str(m["version"]), int(m["dim"]), int(m["counts"]["indexed"])
        self.query_dim = int(m.get("query_dim", self.dim))  # the model's width (indexer/served_width.py)
        self.nprobe_default = int(m["index"]["nprobe_default"])
        self.k_factor_default, self.refine_default = int(m["refine"]["k_factor"]), bool(m["refine"]["default"])
        self.refine_storage = str(m["refine"].get("storage", "fp16_ram"))  # older versions: fp16 in RAM
        self._shards = []
        for entry in m["shards"]:
            try:
                self._shards.append(faiss.read_index(str(self.path / entry["file"])))
            except RuntimeError as exc:
                raise IndexIntegrityError(f"{self.path / entry['file']}: faiss cannot read this shard") from exc
        self._vectors = np.load(self.path / m["vectors"]["file"], mmap_mode="r")
        if self._vectors.shape != (self.n_items, self.dim) or self._vectors.dtype != np.float16:
            raise IndexIntegrityError(f"{self.path}: vectors {self._vectors.dtype} {self._vectors.shape}, "
                                      f"manifest says float16 ({self.n_items}, {self.dim})")
        self._metadata = MetadataReader(self.path / m["metadata"]["file"])

    def internal_ids(self, product_ids: Iterable[str]) -> np.ndarray:
        """``int64 (n,)`` internal ids of product ids, ``-1`` for unknown ones."""
        return self._metadata.internal_ids(product_ids)

    def close(self) -> None:
        self._metadata.close()
        self._shards = []
        self._vectors = np.empty((0, self.dim), np.float16)

    def __enter__(self) -> "BaseVersion":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
