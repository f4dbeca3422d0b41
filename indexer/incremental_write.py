"""Write an incremental index version from its base: copied rows + newly encoded rows.

Row layout of the new version (our choice): the base's rows in base order, without deleted
products, an upserted product taking its base row's place; products new to the base
appended in change order. ``RowPlan.base_row[i]`` is the base internal id row ``i`` is copied
from (-1: a newly encoded vector, ``new_vectors[new_of_row[i]]``).

What is written, and how it equals a full build with the same quantizer:

- ``vectors.f16.npy``: copied fp16 rows (bit for bit) and the new float32 vectors cast to fp16,
  as ``indexer.build.write_exact_vectors`` casts them;
- shards: an empty clone of each base shard (same trained quantizer and PQ codebooks, no
  k-means); each inverted list gets the base list's entries of kept rows (their PQ codes
  copied, ids renumbered) and the new vectors' entries (encoded by faiss with the same
  quantizer), sorted by id: the order in which a full build adds them;
- ``metadata.lmdb``: unchanged records copied as bytes (``indexer.metadata_copy``);
  ``rejects.jsonl``; ``flags.jsonl`` (the base's entries of copied rows + the new ones); the
  manifest with ``indexer.version``'s writer; recall is the base's (same quantizer, same
  nprobe), plus a check that the upserted items are found by their own vectors.
Source: faiss inverted lists (``InvertedLists.add_entries``); our choice.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import faiss
import numpy as np

from engine.catalog import Reject, write_rejects
from indexer.build import IndexPlan, ShardBuild
from indexer.errors import BuildError
from indexer.lexical import write_lexical
from indexer.manifest import describe_file, write_manifest
from indexer.metadata import MetadataReader
from indexer.quantizer import empty_clone
from indexer.refine import manifest_entry, write_refine
from indexer.shards import assign_shards
from indexer.metadata_copy import copy_metadata
from indexer.pipeline import flag_counts
from indexer.version import FLAGS_FILE, METADATA_FILE, REJECTS_FILE, VECTORS_FILE, VersionOptions, _manifest


@dataclass
class RowPlan:
    """base_row: int64 (n,), the base internal id each new row copies, -1 for a new vector;
    new_of_row: int64 (n,), the row of ``new_vectors`` for new rows, -1 for copied ones."""

    base_row: np.ndarray
    new_of_row: np.ndarray

    @property
    def n(self) -> int:
        return int(self.base_row.size)


def _invlist(invlists, list_no: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int64 (m,), codes uint8 (m, code_size))`` of one inverted list (copies)."""
    size = invlists.list_size(list_no)
    code_size = invlists.code_size
    if size == 0:
        return np.empty(0, np.int64), np.empty((0, code_size), np.uint8)
    ids = faiss.rev_swig_ptr(invlists.get_ids(list_no), size).copy()
    codes = faiss.rev_swig_ptr(invlists.get_codes(list_no), size * code_size).copy().reshape(size, code_size)
    return ids.astype(np.int64, copy=False), codes


def merge_shard(base_shard: faiss.Index, old_to_new: np.ndarray, new_vectors: np.ndarray,
                new_ids: np.ndarray) -> faiss.Index:
    """A shard over the same trained quantizer as ``base_shard``: its entries whose base id
    maps to a new id (``old_to_new`` int64 (n_base,), -1 = dropped), with the PQ codes
    copied, plus ``new_vectors`` (float32 (m, d)) added with ids ``new_ids`` (int64 (m,)).
    Each list is sorted by id. Returns the new CPU index."""
    out = empty_clone(base_shard)
    fresh = empty_clone(base_shard)
    if new_ids.size:
        fresh.add_with_ids(np.ascontiguousarray(new_vectors, dtype=np.float32), new_ids)
    base_lists = faiss.extract_index_ivf(base_shard).invlists
    fresh_lists = faiss.extract_index_ivf(fresh).invlists
    ivf = faiss.extract_index_ivf(out)
    total = 0
    for list_no in range(ivf.nlist):
        old_ids, old_codes = _invlist(base_lists, list_no)
        renumbered = old_to_new[old_ids] if old_ids.size else old_ids
        keep = renumbered >= 0
        add_ids, add_codes = _invlist(fresh_lists, list_no)
        ids = np.concatenate([renumbered[keep], add_ids])
        if ids.size == 0:
            continue
        codes = np.concatenate([old_codes[keep], add_codes])
        order = np.argsort(ids, kind="stable")
        ids, codes = np.ascontiguousarray(ids[order]), np.ascontiguousarray(codes[order])
        ivf.invlists.add_entries(list_no, ids.size, faiss.swig_ptr(ids), faiss.swig_ptr(codes))
        total += int(ids.size)
    ivf.ntotal = total
    out.ntotal = total
    return out


def write_vectors(base_vectors: np.ndarray, rows: RowPlan, new_vectors: np.ndarray, path: Path,
                  chunk_rows: int = 65536) -> None:
    """``vectors.f16.npy`` of the new version: fp16 rows copied from ``base_vectors`` (memmap,
    (n_base, d)) and ``new_vectors`` (float32) cast to fp16, chunk by chunk."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows.n, base_vectors.shape[1]))
    for start in range(0, rows.n, chunk_rows):
        base_row = rows.base_row[start:start + chunk_rows]
        new_row = rows.new_of_row[start:start + chunk_rows]
        block = np.empty((base_row.size, base_vectors.shape[1]), np.float16)
        copied = base_row >= 0
        if copied.any():  # copied rows keep the base order: read their span at once, then pick
            lo, hi = int(base_row[copied].min()), int(base_row[copied].max())
            block[copied] = np.asarray(base_vectors[lo:hi + 1])[base_row[copied] - lo]
        block[~copied] = new_vectors[new_row[~copied]].astype(np.float16)
        out[start:start + base_row.size] = block
    out.flush()
    del out


def _flags(base, rows: RowPlan, records: Sequence[dict[str, Any] | None]) -> list[dict[str, Any]]:
    """``flags.jsonl`` entries of the new version: the base's for copied rows, the records' own."""
    entries = []
    base_file = base.path / base.manifest.get("flags_file", FLAGS_FILE)
    flagged = []
    if base_file.is_file():
        with open(base_file, encoding="utf-8") as fh:
            flagged = [json.loads(line) for line in fh if line.strip()]
    if flagged:
        as_bytes = np.fromiter((r is None for r in records), dtype=bool, count=len(records))
        old_to_new = np.full(base.n_items, -1, np.int64)
        old_to_new[rows.base_row[as_bytes]] = np.flatnonzero(as_bytes)
        new_rows = old_to_new[base.internal_ids([f["product_id"] for f in flagged])]
        entries += [(int(i), f) for i, f in zip(new_rows, flagged) if i >= 0]
    entries += [(i, {"product_id": r["product_id"], "row": r.get("row"), "flags": r.get("flags"),
                     "detail": r.get("flag_detail")})
                for i, r in enumerate(records) if r is not None and r.get("flags")]
    return [f for _, f in sorted(entries, key=lambda e: e[0])]


def _write_side_files(out_dir: Path, flagged: list[dict[str, Any]], rejects: Sequence[Reject]) -> dict[str, int]:
    """``rejects.jsonl`` and ``flags.jsonl``; returns the flag counts for the manifest."""
    write_rejects(rejects, out_dir / REJECTS_FILE)
    with open(out_dir / FLAGS_FILE, "w", encoding="utf-8") as fh:
        for f in flagged:
            fh.write(json.dumps(f, ensure_ascii=False) + "\n")
    return flag_counts(flagged)


def write_incremental_version(out_dir: Path, version: str, base, rows: RowPlan, new_vectors: np.ndarray,
                              records: Sequence[dict[str, Any] | None], product_ids: Sequence[str],
                              rejects: Sequence[Reject], plan: IndexPlan, options: VersionOptions,
                              counts: dict[str, int], extra: dict[str, Any],
                              log: Callable[[str], None] = print) -> tuple[dict[str, Any], dict[str, float]]:
    """Write the version into ``out_dir`` (created) from the opened ``base`` (``IndexVersion``).

    records: per row, the record (a dict: new or changed) or None (the base's, copied as bytes);
    product_ids: per row; new_vectors: float32 (m, d), rows L2-normalised; options: the base's
    shard count, nprobe and refine settings; counts: manifest counts (flag counts are added).
    Returns ``(manifest, timings_s)``. Raises BuildError when rows and records disagree.
    """
    if rows.n != len(records) or rows.n != len(product_ids) or rows.n == 0:
        raise BuildError(f"incremental version: {rows.n} rows but {len(records)} records (an empty index "
                         "cannot be built incrementally)")
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {"train": 0.0}
    t0 = time.perf_counter()
    shard_of_row = _shard_of_rows(base, rows, product_ids, options.n_shards)
    builds, shards = _write_shards(out_dir, base, rows, new_vectors, shard_of_row)
    timings["add"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_vectors(base._vectors, rows, new_vectors, out_dir / VECTORS_FILE)
    timings["vectors"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    map_size = copy_metadata(out_dir / METADATA_FILE, base._metadata, base.n_items, rows.base_row, records,
                             product_ids, shard_of_row)
    counts = {**counts, **_write_side_files(out_dir, _flags(base, rows, records), rejects)}
    timings["metadata"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    extra, lexical_files, refine_file = _lexical_and_refine(out_dir, base, rows.n, options, extra)
    timings["lexical_refine"] = time.perf_counter() - t0
    manifest = _manifest(out_dir, version, (rows.n, base.dim), plan, options, builds, map_size, counts, extra,
                         lexical_files)
    manifest["refine"].update(manifest_entry(options.refine_storage, refine_file, base.dim))
    if refine_file:
        manifest["files"][refine_file] = describe_file(out_dir / refine_file)
    manifest["index"]["trained_on"] = base.manifest["index"].get("trained_on")
    if "query_dim" in base.manifest:  # the base's stored width (indexer/served_width.py) holds
        manifest["query_dim"] = base.manifest["query_dim"]
    if "nprobe_by_query_kind" in base.manifest["index"]:  # same quantizer: the base's per-kind nprobe holds
        manifest["index"]["nprobe_by_query_kind"] = base.manifest["index"]["nprobe_by_query_kind"]
    write_manifest(out_dir, manifest)
    t0 = time.perf_counter()
    manifest["recall"] = check_upserts(out_dir, shards, base, np.flatnonzero(rows.base_row < 0), options)
    timings["recall"] = time.perf_counter() - t0
    write_manifest(out_dir, manifest)
    log(f"index: {manifest['recall']['upserted_checked']} upserted items searched with their own vector at nprobe "
        f"{options.nprobe}: {manifest['recall']['upserted_self_at_rank_1_or_tie']} at rank 1 (ties counted); "
        f"recall@10 {manifest['recall'].get('recall_at_10')} as measured on {base.version} (same quantizer)")
    return manifest, timings


def _lexical_and_refine(out_dir: Path, base, n: int, options: VersionOptions, extra: dict[str, Any]
                        ) -> tuple[dict[str, Any], list[str], str | None]:
    """The parts a version derives from all its rows: the BM25 index (rebuilt over every record
    of the new metadata, when the base has one) and the refine file of the base's refine storage.
    Returns ``(extra manifest with the lexical section, lexical files, refine file or None)``."""
    lexical_files: list[str] = []
    if base.manifest.get("lexical") is not None:
        reader = MetadataReader(out_dir / METADATA_FILE)
        try:
            records = reader.records(range(n))
        finally:
            reader.close()
        section, lexical_files = write_lexical(out_dir, records)
        extra = {**extra, "lexical": section}
    vectors = np.load(out_dir / VECTORS_FILE, mmap_mode="r")
    return extra, lexical_files, write_refine(vectors, out_dir, options.refine_storage)


def check_upserts(out_dir: Path, shards: list[faiss.Index], base, new_rows: np.ndarray, options: VersionOptions,
                  sample: int = 2000) -> dict[str, Any]:
    """The manifest's ``recall`` of an incremental version: the base's measurement (same
    quantizer and nprobe; ``inherited_from``) plus a check that upserted items are found: the
    share of (up to ``sample``) upserted rows that their own vector finds at rank 1, ties
    counted, searched as ``IndexVersion.search`` does (IVF-PQ candidates over the new
    ``shards`` at the default nprobe, re-scored on the written fp16 vectors when refine is on).
    Our choice: re-measuring recall@10 exactly costs a scan of every vector, more than the
    whole update at 1M items."""
    recall = {k: v for k, v in (base.manifest.get("recall") or {}).items() if not k.startswith("upserted_")}
    recall["inherited_from"] = (base.manifest.get("recall") or {}).get("inherited_from", base.version)
    rows = new_rows if new_rows.size <= sample else \
        np.sort(np.random.default_rng(options.seed).choice(new_rows, size=sample, replace=False))
    found = np.zeros(0, dtype=bool)
    if rows.size:
        vectors = np.load(out_dir / VECTORS_FILE, mmap_mode="r")
        q = np.asarray(vectors[rows], dtype=np.float32)
        sharded = faiss.IndexShards(q.shape[1], False, False)
        for shard in shards:
            sharded.add_shard(shard)
        scores, ids = sharded.search(q, options.probe_k_factor if options.refine else 1,
                                     params=faiss.SearchParametersIVF(nprobe=options.nprobe))
        if options.refine:
            scores = np.einsum("nd,nkd->nk", q, np.asarray(vectors[np.maximum(ids, 0)], dtype=np.float32))
        scores[ids < 0] = -np.inf
        best = np.argmax(scores, axis=1)
        top_i, top_s = ids[np.arange(rows.size), best], scores[np.arange(rows.size), best]
        found = (top_i == rows) | (top_s >= np.einsum("nd,nd->n", q, q) - 1e-4)
    share = round(float(found.mean()), 4) if found.size else None
    return {**recall, "upserted_checked": int(rows.size), "upserted_self_at_rank_1_or_tie": share}


def _shard_of_rows(base, rows: RowPlan, product_ids: Sequence[str], n_shards: int) -> np.ndarray:
    """``int32 (n,)`` shard of each row: a copied row stays in its base shard (read off the base
    shards' id lists), a new row is hashed (``indexer.shards.assign_shards``)."""
    out = np.zeros(rows.n, np.int32)
    if n_shards == 1:
        return out
    shard_of_base = np.zeros(base.n_items, np.int32)
    for s, shard in enumerate(base._shards):
        invlists = faiss.extract_index_ivf(shard).invlists
        for list_no in range(invlists.nlist):
            shard_of_base[_invlist(invlists, list_no)[0]] = s
    copied = rows.base_row >= 0
    out[copied] = shard_of_base[rows.base_row[copied]]
    fresh = np.flatnonzero(~copied)
    out[fresh] = assign_shards([product_ids[i] for i in fresh], n_shards)
    return out


def _write_shards(out_dir: Path, base, rows: RowPlan, new_vectors: np.ndarray,
                  shard_of_row: np.ndarray) -> tuple[list[ShardBuild], list[faiss.Index]]:
    """One merged shard per base shard (``merge_shard``), written as ``shard_XXX.faiss``;
    returns the builds and the shards."""
    old_to_new = np.full(base.n_items, -1, np.int64)
    copied = np.flatnonzero(rows.base_row >= 0)
    old_to_new[rows.base_row[copied]] = copied
    fresh_rows = np.flatnonzero(rows.base_row < 0)
    builds, shards = [], []
    for s, base_shard in enumerate(base._shards):
        t_shard = time.perf_counter()
        mine = fresh_rows[shard_of_row[fresh_rows] == s]
        shard = merge_shard(base_shard, old_to_new, new_vectors[rows.new_of_row[mine]], mine.astype(np.int64))
        name = f"shard_{s:03d}.faiss"
        faiss.write_index(shard, str(out_dir / name))
        builds.append(ShardBuild(name, int(shard.ntotal), time.perf_counter() - t_shard))
        shards.append(shard)
    return builds, shards
