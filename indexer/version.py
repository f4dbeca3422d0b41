"""Write the files of one index version from item vectors and product records.

Given float32 (n, d) unit vectors and n records, writes into a (staging) folder:
``shard_XXX.faiss`` (IVF-PQ, one per shard), ``vectors.f16.npy`` (exact fp16 vectors, row =
internal id), ``metadata.lmdb``, ``lexical/`` (BM25, ``indexer.lexical``), ``rejects.jsonl``,
``flags.jsonl`` and ``manifest.json`` (with checksums, timings, the chosen parameters and measured recall@10 vs exact search).
Steps 3-5 of the indexer; publication is ``indexer.publish``. Source: our choice.
"""
from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import faiss
import numpy as np

from engine.catalog import Reject, write_rejects
from indexer.build import IndexPlan, ShardBuild, build_shard, plan_index, shard_rows, train_index, write_exact_vectors, _gpu_count
from indexer.errors import BuildError
from indexer.lexical import write_lexical
from indexer.manifest import describe_file, write_manifest
from indexer.metadata import SCHEMA as METADATA_SCHEMA, write_metadata
from indexer.nprobe_choice import choose_nprobe, nprobe_by_request_kind, query_sets, query_tower_report
from indexer.recall import exact_search, recall_at_k
from indexer.refine import check_storage, manifest_entry, write_refine
from indexer.refine_depth import K_FACTOR_MAX, choose_k_factor
from indexer.search import open_index
from indexer.shards import assign_shards

VECTORS_FILE = "vectors.f16.npy"
METADATA_FILE = "metadata.lmdb"
REJECTS_FILE = "rejects.jsonl"
FLAGS_FILE = "flags.jsonl"


@dataclass
class VersionOptions:
    """Index build options.

    n_shards: number of shards (stable hash of the product id).
    factory: faiss factory string or "auto" (see ``indexer.build.plan_index``).
    nprobe: default nprobe written to the manifest; None = smallest of 1, 2, 4, ... whose
        recall@10 with refine reaches ``target_recall`` on the recall sample and, when the
        build passes query-tower vectors (``write_version(query_vectors=)``), on those too.
    k_factor: refine re-scores the top ``k * k_factor`` candidates; None (default): the
        smallest depth that loses no recall on the recall samples (``indexer.refine_depth``,
        which says why). 50 suits 1M synthetic clustered vectors, IVF2048,PQ32, nprobe 4:
        recall@10 0.78 with 10, 0.91 with 20, 0.993 with 50 (bench/bench_index.py).
    refine: refine by default at search time.
    refine_storage: where the refine vectors live: "fp16_ram", "fp16_mmap", "fp16_pread", "sq8" or "none"
        (``indexer.refine``; "none" turns the refine default off).
    recall_queries: item vectors used as queries to measure recall@10 vs exact search.
    target_recall: recall@10 aimed at when choosing nprobe.
    photo_target_recall: recall@10 that a kind of Search request carrying a photo ("image",
        "text+image") aims at when its own nprobe is chosen (``indexer.nprobe_choice``); at least
        ``target_recall``.
    self_queries: items searched with their own vector (self-retrieval at rank 1).
    seed: sampling seed (training sample, recall queries).
    """

    n_shards: int = 1
    factory: str = "auto"
    nprobe: int | None = None
    k_factor: int | None = None
    refine: bool = True
    refine_storage: str = "fp16_ram"
    recall_queries: int = 1000
    target_recall: float = 0.95
    photo_target_recall: float = 0.99
    self_queries: int = 20_000
    seed: int = 0

    @property
    def probe_k_factor(self) -> int:
        """The refine depth to measure recall with before the default one is chosen: the given
        ``k_factor``, else the deepest candidate (``indexer.refine_depth.K_FACTOR_MAX``)."""
        return K_FACTOR_MAX if self.k_factor is None else self.k_factor


@dataclass
class VersionResult:
    """What ``write_version`` produced: the manifest written and per-stage seconds."""

    manifest: dict[str, Any]
    timings_s: dict[str, float] = field(default_factory=dict)


def write_version(out_dir: Path, version: str, vectors: np.ndarray, records: Sequence[dict[str, Any]],
                  options: VersionOptions, *, rejects: Sequence[Reject] = (), counts: dict[str, int] | None = None,
                  extra_manifest: dict[str, Any] | None = None, timings_s: dict[str, float] | None = None,
                  log: Callable[[str], None] = print, run_all: Callable[[list[Callable[[], Any]]], list] | None = None,
                  trained: tuple[IndexPlan, faiss.Index] | None = None,
                  query_vectors: dict[str, np.ndarray] | np.ndarray | None = None) -> VersionResult:
    """Write a complete index version into ``out_dir`` (created; must be empty or absent).

    query_vectors: optional query-tower vectors, ``{kind: float32 (q, d)}`` or one (q, d) array
    (``indexer.query_sample`` says why): nprobe must reach ``options.target_recall`` on each kind too.
    vectors: float32 (n, d), rows L2-normalised; row i belongs to ``records[i]`` (a dict
    with at least ``product_id``; the shard number is added). rejects: catalogue / encode
    rejects written to ``rejects.jsonl``. counts: ``read``/``indexed``/``rejected``/... for
    the manifest (``indexed`` must equal n; ``indexed + rejected == read`` is checked).
    run_all: runs the independent parts (one add per shard, the fp16 vectors, the refine
    file, the LMDB metadata) given as picklable zero-argument callables and returns their
    results in order (default ``run_in_process``: one after the other; ``indexer.ray_executor``
    runs them as parallel Ray tasks).
    trained: ``(plan, trained empty index)`` to reuse instead of training (e.g. another
    version's quantizer and codebooks: ``indexer.quantizer.load_trained``); None: train.
    Raises BuildError on a count mismatch, an empty input or an unknown refine storage.
    """
    check_storage(options.refine_storage)
    t_all = time.perf_counter()
    timings = dict(timings_s or {})
    n, dim = vectors.shape
    counts = _checked_counts(n, len(records), len(rejects), counts)
    out_dir.mkdir(parents=True, exist_ok=True)

    plan = plan_index(options.factory, n, dim) if trained is None else trained[0]
    for note in plan.notes:
        log(f"index: {note}")
    log(f"index: factory {plan.factory}, train on {plan.train_size} of {n} vectors, {options.n_shards} shard(s)")
    t0 = time.perf_counter()
    trained = train_index(vectors, plan, seed=options.seed) if trained is None else trained[1]
    timings["train"] = time.perf_counter() - t0

    shard_of_row = assign_shards([str(r["product_id"]) for r in records], options.n_shards)
    shard_builds, refine_file, map_size = _write_parts(out_dir, trained, vectors, records, shard_of_row, rejects,
                                                       options, run_all, timings)
    t0 = time.perf_counter()
    lexical, lexical_files = write_lexical(out_dir, records)  # BM25 over titles + attribute values
    timings["lexical"] = time.perf_counter() - t0
    manifest = _manifest(out_dir, version, (n, dim), plan, options, shard_builds, map_size, counts,
                         {**(extra_manifest or {}), "lexical": lexical}, lexical_files)
    manifest["refine"].update(manifest_entry(options.refine_storage, refine_file, dim))
    if refine_file:
        manifest["files"][refine_file] = describe_file(out_dir / refine_file)
    write_manifest(out_dir, manifest)

    t0 = time.perf_counter()
    quality = measure_quality(out_dir, options, query_vectors=query_vectors)
    timings["recall"] = time.perf_counter() - t0
    _record_quality(manifest, quality)
    timings["version_total"] = time.perf_counter() - t_all
    manifest["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    write_manifest(out_dir, manifest)
    log(_quality_line(manifest["index"]["nprobe_default"], manifest["refine"]["k_factor"], quality))
    return VersionResult(manifest, timings)


def _record_quality(manifest: dict[str, Any], quality: dict[str, Any]) -> None:
    """Write ``measure_quality``'s choices (nprobe, per-kind nprobe, refine depth) and its
    recall report into ``manifest``."""
    manifest["index"].update(nprobe_default=quality.pop("nprobe_chosen"), **quality.pop("by_request_kind"))
    manifest["refine"]["k_factor"] = quality.pop("k_factor_chosen")
    manifest["recall"] = quality


def run_in_process(tasks: list[Callable[[], Any]]) -> list:
    """The local executor of ``write_version``'s parts: each task in turn, in this process."""
    return [task() for task in tasks]


def _timed(fn: Callable, *args) -> tuple[Any, float]:
    """``(fn(*args), seconds)``; module-level so that a ``functools.partial`` of it pickles."""
    t0 = time.perf_counter()
    return fn(*args), time.perf_counter() - t0


def _write_parts(out_dir: Path, trained, vectors: np.ndarray, records, shard_of_row: np.ndarray, rejects,
                 options: VersionOptions, run_all, timings: dict[str, float]
                 ) -> tuple[list[ShardBuild], str | None, int]:
    """The independent parts of a version, through ``run_all``: one ``build_shard`` per shard,
    the fp16 vectors, the refine file and the metadata. Adds their seconds to ``timings``
    ("add" = sum over shards, "parts_wall" = wall time of them all). Returns (the ShardBuilds,
    the refine file name or None, the LMDB map size in bytes)."""
    t0 = time.perf_counter()
    shards = shard_rows(shard_of_row, options.n_shards)
    tasks = [functools.partial(_timed, build_shard, trained, vectors, rows, name, out_dir) for name, rows in shards]
    tasks += [functools.partial(_timed, write_exact_vectors, vectors, out_dir / VECTORS_FILE),
              functools.partial(_timed, write_refine, vectors, out_dir, options.refine_storage, options.seed),
              functools.partial(_timed, _write_records, out_dir, records, shard_of_row, rejects)]
    results = (run_all or run_in_process)(tasks)
    builds = [r[0] for r in results[:len(shards)]]
    (_, timings["vectors"]), (refine_file, timings["refine"]), (map_size, timings["metadata"]) = results[len(shards):]
    timings["add"] = sum(b.add_s for b in builds)
    timings["parts_wall"] = time.perf_counter() - t0
    return builds, refine_file, map_size


def _checked_counts(n: int, n_records: int, n_rejects: int, counts: dict[str, int] | None) -> dict[str, int]:
    """The manifest counts (given, or derived); raises BuildError when they do not add up."""
    if n != n_records:
        raise BuildError(f"{n} vectors but {n_records} records")
    counts = dict(counts or {"read": n + n_rejects, "indexed": n, "rejected": n_rejects})
    if counts["indexed"] != n or counts["indexed"] + counts["rejected"] != counts["read"]:
        raise BuildError(f"counts do not add up: indexed {counts['indexed']} (vectors {n}) + rejected "
                         f"{counts['rejected']} != read {counts['read']}")
    return counts


def _write_records(out_dir: Path, records: Sequence[dict[str, Any]], shard_of_row: np.ndarray,
                   rejects: Sequence[Reject]) -> int:
    """Write ``metadata.lmdb`` (records with their shard), ``rejects.jsonl`` and
    ``flags.jsonl``; returns the LMDB ``map_size`` in bytes."""
    full_records = [{**r, "shard": int(s)} for r, s in zip(records, shard_of_row)]
    map_size = write_metadata(out_dir / METADATA_FILE, full_records)
    write_rejects(rejects, out_dir / REJECTS_FILE)
    flagged = [{"product_id": r["product_id"], "row": r.get("row"), "flags": r.get("flags"),
                "detail": r.get("flag_detail")} for r in records if r.get("flags")]
    with open(out_dir / FLAGS_FILE, "w", encoding="utf-8") as fh:
        for f in flagged:
            fh.write(json.dumps(f, ensure_ascii=False) + "\n")
    return map_size


def _manifest(out_dir: Path, version: str, shape: tuple[int, int], plan, options: VersionOptions,
              shard_builds: list[ShardBuild], map_size: int, counts: dict[str, int],
              extra_manifest: dict[str, Any] | None, extra_files: Sequence[str] = ()) -> dict[str, Any]:
    """The manifest of the files written so far (recall and timings are added later);
    ``extra_files`` (e.g. the lexical index's) are listed and checksummed with the others."""
    n, dim = shape
    data_files = [b.file for b in shard_builds] + [VECTORS_FILE, METADATA_FILE, REJECTS_FILE, FLAGS_FILE,
                                                   *extra_files]
    return {
        "version": version,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dim": dim,
        "metric": "inner_product",
        **(extra_manifest or {}),
        "index": {
            "factory_requested": plan.factory_requested, "factory": plan.factory, "nlist": plan.nlist,
            "pq_m": plan.pq_m, "pq_nbits": plan.pq_nbits, "train_size": plan.train_size,
            "nprobe_default": min(options.nprobe or 1, plan.nlist), "notes": plan.notes,
            "faiss_version": faiss.__version__, "trained_on": "gpu" if _gpu_count() > 0 else "cpu",
        },
        "refine": {"default": options.refine and options.refine_storage != "none",
                   "k_factor": options.probe_k_factor},  # the chosen one once measured
        "shard_assignment": "blake2b-64(product_id utf-8), big-endian, mod n_shards",
        "shards": [{"file": b.file, "items": b.items, **describe_file(out_dir / b.file)} for b in shard_builds],
        "vectors": {"file": VECTORS_FILE, "dtype": "float16", "shape": [n, dim]},
        "metadata": {"file": METADATA_FILE, "schema": METADATA_SCHEMA, "map_size_bytes": map_size,
                     "encoding": "records: uint64-BE key -> UTF-8 JSON; see indexer/metadata.py"},
        "rejects_file": REJECTS_FILE,
        "flags_file": FLAGS_FILE,
        "counts": counts,
        "files": {name: describe_file(out_dir / name) for name in data_files},
    }


def _quality_line(nprobe: int, k_factor: int, quality: dict[str, Any]) -> str:
    by_kind = quality.get("recall_at_10_query_tower_by_kind", {})
    query_tower = (f"; {quality['recall_at_10_query_tower']:.4f} on {quality['query_tower_queries']} query-tower "
                   "queries (" + ", ".join(f"{kind} {r:.4f}" for kind, r in by_kind.items()) + ")"
                   if "recall_at_10_query_tower" in quality else "")
    return (f"index: nprobe {nprobe}, refine k_factor {k_factor}: recall@10 {quality['recall_at_10']:.4f} with refine, "
            f"{quality['recall_at_10_no_refine']:.4f} without (vs exact, {quality['queries']} item queries{query_tower}); "
            f"self at rank 1 {quality['self_at_rank_1']:.4f} ({quality['self_at_rank_1_or_tie']:.4f} counting ties) "
            f"over {quality['self_items']} items")


def measure_quality(version_dir: Path, options: VersionOptions, k: int = 10,
                    query_vectors: dict[str, np.ndarray] | np.ndarray | None = None) -> dict[str, Any]:
    """Recall@k of the ANN search vs exact search, using a sample of item vectors as queries
    (and ``query_vectors``, query-tower vectors per kind, when given; see ``write_version``).

    Chooses nprobe (``options.nprobe`` or the smallest candidate whose refined recall@10
    reaches ``options.target_recall`` on every query set). Also the self-retrieval rate at that nprobe: the
    share of items (all of them up to ``options.self_queries``, else a sample) found at rank
    1 by their own vector (``self_at_rank_1``), and the same counting a rank-1 item with the
    same score as found (``self_at_rank_1_or_tie``: duplicate products have identical
    vectors). Returns a dict for the manifest.
    """
    index = open_index(version_dir, verify=False)
    try:
        n = index.n_items
        rng = np.random.default_rng(options.seed + 1)
        rows = np.sort(rng.choice(n, size=min(options.recall_queries, n), replace=False))
        queries = index.vectors(rows)
        exact_s, exact_i = exact_search(index._vectors, queries, k)
        sets = {"items": (queries, exact_i), **query_sets(index, query_vectors, k)}
        chosen, by_nprobe = choose_nprobe(index, sets, options, k)
        by_kind = {} if options.nprobe is not None else nprobe_by_request_kind(by_nprobe, options, chosen)
        k_factor, by_k_factor = (options.k_factor, {}) if options.k_factor is not None else choose_k_factor(
            index, sets, sorted({chosen, *by_kind.get("nprobe_by_query_kind", {}).values()}), k)
        _, refined = index.search_ids(queries, k, nprobe=chosen, refine=True, k_factor=k_factor)
        _, plain = index.search_ids(queries, k, nprobe=chosen, refine=False)
        self_rows = np.arange(n) if n <= options.self_queries else \
            np.sort(rng.choice(n, size=options.self_queries, replace=False))
        hits = ties = 0
        for start in range(0, self_rows.size, 4096):
            ids = self_rows[start:start + 4096]
            q = index.vectors(ids)
            top_s, top_i = index.search_ids(q, 1, nprobe=chosen, refine=options.refine, k_factor=k_factor)
            hit = top_i[:, 0] == ids
            hits += int(hit.sum())
            ties += int((hit | (top_s[:, 0] >= np.einsum("nd,nd->n", q, q) - 1e-4)).sum())
        return {
            "k": k, "queries": int(rows.size), "nprobe_chosen": int(chosen),
            "by_request_kind": by_kind, "k_factor_chosen": int(k_factor),
            "recall_at_10_by_k_factor": {str(f): round(r, 4) for f, r in by_k_factor.items()},
            "recall_at_10": round(recall_at_k(refined, exact_i, k), 4),
            "recall_at_10_no_refine": round(recall_at_k(plain, exact_i, k), 4),
            "recall_at_10_by_nprobe_refined": {str(p): round(r["items"], 4) for p, r in by_nprobe.items()},
            **query_tower_report(sets, by_nprobe, chosen),
            "self_items": int(self_rows.size),
            "self_at_rank_1": round(hits / self_rows.size, 4),
            "self_at_rank_1_or_tie": round(ties / self_rows.size, 4),
            "target_recall": options.target_recall, "photo_target_recall": options.photo_target_recall,
        }
    finally:
        index.close()
