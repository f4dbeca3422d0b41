"""Where the refine vectors of an index version live: the RAM bound per product.

The refine step re-scores the top ``k * k_factor`` IVF-PQ candidates with better vectors
(faiss ``IndexRefine``). Four storages, chosen at build time (``VersionOptions.refine_storage``)
and recorded in the manifest (``refine.storage``; versions without the field are ``fp16_ram``):

- ``fp16_ram``: the exact fp16 vectors copied into an fp16 ``IndexScalarQuantizer`` in RAM when
  the version opens (2 * d bytes per product in RAM; exact scores).
- ``fp16_mmap``: the same fp16 index written as ``refine.fp16.faiss`` and memory-mapped
  (``faiss.IO_FLAG_MMAP_IFC``): exact scores, pages read from disk on demand (the page cache
  holds the hot ones; nothing is copied into the process's anonymous memory). Costs 2 * d
  bytes per product more on disk.
- ``sq8``: an 8-bit scalar quantizer (per-dimension min/max, trained on a sample) in RAM,
  ``refine.sq8.faiss``: d bytes per product, approximate scores.
- ``fp16_pread``: no refine file and nothing mapped: the candidates' rows are read from
  ``vectors.f16.npy`` with ``os.pread`` (one read per candidate, through the page cache) into
  a per-call buffer and re-scored in numpy (``PreadRefine``). Exact scores; the process's
  resident memory holds only the IVF-PQ codes, whatever the query mix (a memory-mapped file's
  touched pages count in the process's RSS while mapped: ``fp16_mmap`` grows towards 2 * d
  bytes per product as queries touch the file). Costs 1.7-3.6 us per candidate (a system
  call and a kernel copy, cached pages; measured in indexer/README.md) instead of
  fp16_mmap's page-table hit.
- ``none``: no refine index; searches use the PQ scores only (``refine`` requests are
  ignored and the manifest's refine default is off).

``vectors.f16.npy`` (memory-mapped) stays in every version: ``IndexVersion.vectors``, the
recall check and exact filtered search over a small allowed set read it. Measured costs:
``indexer/README.md`` (bench/bench_index.py scale). Source: faiss (Jégou et al., ICASSP 2011,
re-ranking with source coding; faiss ``IndexRefine`` / ``IndexScalarQuantizer``); choices ours.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexer.errors import BuildError, IndexIntegrityError

REFINE_STORAGES = ("fp16_ram", "fp16_mmap", "fp16_pread", "sq8", "none")
REFINE_FILES = {"fp16_mmap": "refine.fp16.faiss", "sq8": "refine.sq8.faiss"}
DEFAULT_STORAGE = "fp16_ram"
# SQ8 min/max training sample (our choice: 100k rows fix per-dimension ranges well).
SQ8_TRAIN_ROWS = 100_000


def check_storage(storage: str) -> str:
    """``storage`` if it is one of REFINE_STORAGES; raises BuildError otherwise."""
    if storage not in REFINE_STORAGES:
        raise BuildError(f"refine storage {storage!r}: expected one of {', '.join(REFINE_STORAGES)}")
    return storage


def _new_index(dim: int, storage: str) -> faiss.IndexScalarQuantizer:
    qtype = faiss.ScalarQuantizer.QT_8bit if storage == "sq8" else faiss.ScalarQuantizer.QT_fp16
    return faiss.IndexScalarQuantizer(dim, qtype, faiss.METRIC_INNER_PRODUCT)


def _fill(index: faiss.Index, vectors: np.ndarray, chunk_rows: int) -> faiss.Index:
    """Add ``vectors`` rounded to fp16 by numpy first, as ``vectors.f16.npy`` holds them (faiss's
    own fp16 rounding of float32 can differ in the last bit)."""
    for start in range(0, vectors.shape[0], chunk_rows):
        index.add(np.asarray(vectors[start:start + chunk_rows], dtype=np.float16).astype(np.float32))
    return index


def write_refine(vectors: np.ndarray, out_dir: Path, storage: str, seed: int = 0,
                 chunk_rows: int = 65536) -> str | None:
    """Write the refine file of ``storage`` for ``vectors`` (float32 or float16 (n, d), row =
    internal id; a memmap is read chunk by chunk) into ``out_dir``. Returns the file name, or
    None for ``fp16_ram`` / ``none`` (nothing to write). Raises BuildError for an unknown storage."""
    check_storage(storage)
    if storage not in REFINE_FILES:
        return None
    index = _new_index(vectors.shape[1], storage)
    if storage == "sq8":
        rng = np.random.default_rng(seed)
        n = vectors.shape[0]
        rows = np.sort(rng.choice(n, size=SQ8_TRAIN_ROWS, replace=False)) if n > SQ8_TRAIN_ROWS else np.arange(n)
        index.train(np.ascontiguousarray(vectors[rows], dtype=np.float32))
    _fill(index, vectors, chunk_rows)
    name = REFINE_FILES[storage]
    faiss.write_index(index, str(out_dir / name))
    return name


def manifest_entry(storage: str, file: str | None, dim: int) -> dict[str, Any]:
    """The manifest's description of the refine storage (merged into ``manifest["refine"]``)."""
    ram = {"fp16_ram": 2 * dim, "fp16_mmap": 0, "fp16_pread": 0, "sq8": dim, "none": 0}[storage]
    return {"storage": storage, "file": file, "ram_bytes_per_item": ram,
            "exact_scores": storage in ("fp16_ram", "fp16_mmap", "fp16_pread"),
            "read": {"fp16_mmap": "mmap", "fp16_pread": "pread"}.get(storage, "ram")}


def open_refine(version_dir: Path, manifest: dict[str, Any], vectors: np.ndarray,
                chunk_rows: int = 65536) -> "faiss.Index | PreadRows | None":
    """The refine index of an opened version (None for ``none``; a ``PreadRows`` reader of
    ``vectors`` for ``fp16_pread``). ``vectors``: the version's fp16 (n, d) memmap. Raises
    IndexIntegrityError for an unknown storage or a refine file faiss cannot read or whose size
    does not match."""
    storage = manifest.get("refine", {}).get("storage", DEFAULT_STORAGE)
    if storage not in REFINE_STORAGES:
        raise IndexIntegrityError(f"{version_dir}: unknown refine storage {storage!r} in the manifest")
    if storage == "none":
        return None
    if storage == "fp16_pread":
        return PreadRows(vectors)
    if storage == "fp16_ram":
        return _fill(_new_index(vectors.shape[1], storage), vectors, chunk_rows)
    file = version_dir / manifest["refine"]["file"]
    flags = faiss.IO_FLAG_MMAP_IFC if storage == "fp16_mmap" else 0
    try:
        index = faiss.read_index(str(file), flags)
    except RuntimeError as exc:
        raise IndexIntegrityError(f"{file}: faiss cannot read this refine index ({str(exc).splitlines()[0]})") \
            from exc
    if index.ntotal != vectors.shape[0] or index.d != vectors.shape[1]:
        raise IndexIntegrityError(f"{file}: {index.ntotal} x {index.d}, the vectors are {vectors.shape}")
    return index


class PreadRows:
    """Rows of an fp16 ``.npy`` file read with ``os.pread`` (``fp16_pread``): nothing of the
    file is mapped into the process. ``vectors``: the version's fp16 (n, d) memmap (its file
    and data offset are used; an in-memory array is indexed directly). Thread-safe
    (positional reads on one descriptor, closed when the object is collected). ``rows``
    raises IndexIntegrityError on a short read (a truncated file). Source: our choice."""

    def __init__(self, vectors: np.ndarray):
        self.shape = vectors.shape
        self.row_bytes = int(vectors.shape[1]) * 2
        filename = getattr(vectors, "filename", None)
        self._array = None if filename else vectors
        self._file = open(filename, "rb", buffering=0) if filename else None
        self._offset = int(getattr(vectors, "offset", 0))

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """float32 (len(ids), d): the rows ``ids`` (int64, each in [0, n))."""
        if self._file is None:
            return np.asarray(self._array[ids], dtype=np.float32)
        fd, size, pread = self._file.fileno(), self.row_bytes, os.pread
        offsets = (np.asarray(ids, dtype=np.int64) * size + self._offset).tolist()
        data = b"".join([pread(fd, size, at) for at in offsets])
        if len(data) != size * len(ids):
            raise IndexIntegrityError(f"{self._file.name}: short read ({len(data)} of {size * len(ids)} bytes)")
        return np.frombuffer(data, dtype=np.float16).reshape(len(ids), self.shape[1]).astype(np.float32)


class PreadRefine:
    """``IndexRefine``'s search for ``fp16_pread``: the top ``k * k_factor`` candidates of
    ``base`` (IVF-PQ), re-scored exactly (inner product) with their rows read by ``reader``.
    ``search(q float32 (n, d), k, params=IndexRefineSearchParameters | None)`` returns
    ``(float32 (n, k), int64 (n, k))``, best first, ``-inf`` / ``-1`` padding. Source: our choice
    (the re-ranking of Jégou et al. 2011 with the refine rows on disk)."""

    def __init__(self, base: faiss.Index, reader: PreadRows):
        self.base, self.reader = base, reader
        self.d, self.ntotal = base.d, base.ntotal

    def search(self, q: np.ndarray, k: int, params=None) -> tuple[np.ndarray, np.ndarray]:
        k_factor = max(1, int(params.k_factor)) if params is not None else 1
        base_params = params.base_index_params if params is not None else None
        _, candidates = self.base.search(q, k * k_factor, params=base_params)
        scores = np.full((q.shape[0], k), -np.inf, dtype=np.float32)
        ids = np.full((q.shape[0], k), -1, dtype=np.int64)
        for row, found in enumerate(candidates):
            found = np.sort(found[found >= 0])  # file order: neighbouring rows share pages
            if found.size == 0:
                continue
            exact = self.reader.rows(found) @ q[row]
            top = np.argsort(-exact, kind="stable")[:k]
            scores[row, :top.size], ids[row, :top.size] = exact[top], found[top]
        return scores, ids


def exact_subset_search(vectors: np.ndarray, queries: np.ndarray, k: int, allowed: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner product of ``queries`` (float32 (n, d)) over the rows ``allowed``
    (sorted int64) of ``vectors`` (fp16 memmap (N, d)): the filtered path when the refine
    index does not hold exact vectors. Returns ``(float32 (n, k), int64 (n, k))``, ``-inf`` /
    ``-1`` padding."""
    n = queries.shape[0]
    scores = np.full((n, k), -np.inf, dtype=np.float32)
    ids = np.full((n, k), -1, dtype=np.int64)
    if allowed.size == 0:
        return scores, ids
    sims = queries @ np.asarray(vectors[allowed], dtype=np.float32).T
    take = min(k, allowed.size)
    top = np.argpartition(-sims, take - 1, axis=1)[:, :take]
    order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
    top = np.take_along_axis(top, order, axis=1)
    scores[:, :take] = np.take_along_axis(sims, top, axis=1)
    ids[:, :take] = allowed[top]
    return scores, ids


def search_pipeline(shards: list[faiss.Index], refine_index: faiss.Index | None, dim: int, storage: str
                     ) -> tuple[faiss.IndexShards, faiss.Index | None, faiss.IndexRefine | None]:
    """The shards as one faiss index (``IndexShards``: each shard searched in turn in the
    calling thread, results merged by score; ids are the shards' own, global internal ids),
    the index of exact vectors for filtered search (the refine index when it holds the fp16
    vectors, else None), and the shards refined by ``refine_index`` (``indexer.refine``; None
    for storage "none"). The pipeline does not own the shards: keep them alive while it is
    used. Source: our choice (faiss's own ``IndexRefine``, as its ``IndexRefineFlat`` but
    with fp16 or SQ8 codes)."""
    sharded = faiss.IndexShards(dim, False, False)  # threaded=False, successive_ids=False
    for shard in shards:
        sharded.add_shard(shard)
    if isinstance(refine_index, PreadRows):
        return sharded, None, PreadRefine(sharded, refine_index)
    refined = None if refine_index is None else faiss.IndexRefine(sharded, refine_index)
    exact = refine_index if storage in ("fp16_ram", "fp16_mmap") else None
    return sharded, exact, refined
