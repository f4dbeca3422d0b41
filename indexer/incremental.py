"""The incremental build job: base version + changes -> a new, complete index version.

``run_incremental_job(config)`` holds the build lock of ROOT, opens the base version
(``CURRENT`` or a name), takes the changes (a changes file, or a diff of a new catalogue
against the base's metadata: ``indexer.changes``), encodes only the upserted products with
the base's model (same fingerprint, view and precision), copies every other product's
vector, PQ code and record, reuses the base's trained quantizer and codebooks (no k-means:
``indexer.incremental_write``) and publishes the result atomically (``indexer.publish``),
so a killed build leaves ``CURRENT`` on the complete old version; leftovers under
``ROOT/tmp`` go with the next build (a rerun of the same job resumes its encoded chunks).

The manifest records ``incremental`` (base version, kept / upserted / added / replaced /
updated / deleted / rejected counts, drift) and ``quantizer`` (the version whose full build
trained it). Drift = products upserted or deleted since that training / items it indexed;
past ``drift_threshold`` the job warns that a full rebuild (which retrains) is due.
Source: our choice.
"""
from __future__ import annotations

import dataclasses
import hashlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from engine.catalog import FieldMapping, read_catalog
from engine.catalog.reader import FASHION_MAPPING
from engine.model.file_hashing import sha256_file
from indexer.changes import ChangeSet, diff_catalog, read_changes
from indexer.encode import EncodeOptions, encode_products
from indexer.served_width import stored_width
from indexer.errors import BuildError
from indexer.manifest import write_manifest
from indexer.incremental_write import RowPlan, write_incremental_version
from indexer.pipeline import IndexJobResult, log_stage, product_record, publish_staged
from indexer.publish import VERSIONS, build_lock, cleanup_stale, new_version_id, read_current, tmp_dir
from indexer.quantizer import plan_of, reuse_record, trained_items
from indexer.base_version import BaseVersion as IndexVersion
from indexer.version import VersionOptions

# Drift past which a full rebuild (retraining the quantizer) is advised: our choice (a fifth
# of the catalogue re-encoded or removed since the quantizer was trained).
DEFAULT_DRIFT_THRESHOLD = 0.2


@dataclass
class IncrementalJobConfig:
    """One ``ecsearch index --base-version`` run.

    index_root: ROOT; base_version: a version name or "CURRENT"; changes: a changes file,
    or catalog: a new catalogue to diff against the base (exactly one of the two);
    model_dir: None = the base's model folder (its fingerprint must match the base's);
    mapping: field mapping of the catalogue rows (None: the base's); encode: batch size,
    workers, token cache (view and precision are the base's); drift_threshold: share of
    items changed since the quantizer's training past which the job warns;
    (recall: the base's, same quantizer and nprobe, plus a check that upserts are found:
    ``indexer.incremental_write.check_upserts``).
    """

    index_root: Path
    base_version: str = "CURRENT"
    changes: Path | None = None
    catalog: Path | None = None
    model_dir: Path | None = None
    mapping: FieldMapping | None = None
    keep_versions: int = 3
    device: str | None = None
    encode: EncodeOptions = field(default_factory=EncodeOptions)
    drift_threshold: float = DEFAULT_DRIFT_THRESHOLD


def resolve_base(root: Path, name: str) -> Path:
    """The base version folder: ``CURRENT`` or a name under ``ROOT/versions``. Raises BuildError."""
    version = read_current(root) if name == "CURRENT" else name
    if version is None:
        raise BuildError(f"{root}: no CURRENT version to build on (run a full build first)")
    folder = root / VERSIONS / version
    if not folder.is_dir():
        known = sorted(p.name for p in (root / VERSIONS).iterdir()) if (root / VERSIONS).is_dir() else []
        raise BuildError(f"base version {version!r} not found under {root / VERSIONS} (known: {known})")
    return folder


def base_mapping(manifest: dict[str, Any], override: FieldMapping | None) -> tuple[FieldMapping, Path]:
    """The field mapping and image root of the base's catalogue (``override`` wins)."""
    catalog = manifest.get("catalog") or {}
    layout, path = catalog.get("layout"), Path(catalog.get("path", "."))
    image_root = path if layout == "fashion" else path.parent
    if override is not None:
        return override, image_root
    if catalog.get("mapping"):
        return FieldMapping(**catalog["mapping"]), image_root
    return (FASHION_MAPPING if layout == "fashion" else FieldMapping()), image_root


def _changes(config: IncrementalJobConfig, base: IndexVersion, base_pids: list[str]) -> ChangeSet:
    if (config.changes is None) == (config.catalog is None):
        raise BuildError("an incremental build needs exactly one of a changes file or a new catalogue")
    mapping, image_root = base_mapping(base.manifest, config.mapping)
    if config.changes is not None:
        return read_changes(config.changes, mapping, image_root, set(base_pids))
    layout = (base.manifest.get("catalog") or {}).get("layout")
    catalog = read_catalog(config.catalog, config.mapping or (None if layout == "fashion" else mapping))
    return diff_catalog(catalog, base._metadata.records(range(base.n_items)))


def _row_plan(base_pids: list[str], changes: ChangeSet, indexed_upserts: dict[str, int]) -> RowPlan:
    """Rows of the new version: base order without deletes, replaced in place, new ones appended."""
    deleted = set(changes.deletes)
    base_row, new_of_row = [], []
    for iid, pid in enumerate(base_pids):
        if pid in deleted:
            continue
        j = indexed_upserts.get(pid, -1)
        base_row.append(-1 if j >= 0 else iid)
        new_of_row.append(j)
    known = set(base_pids)
    for pid, j in indexed_upserts.items():
        if pid not in known:
            base_row.append(-1)
            new_of_row.append(j)
    return RowPlan(np.asarray(base_row, np.int64), np.asarray(new_of_row, np.int64))


def _records(base: IndexVersion, base_pids: list[str], rows: RowPlan, new_records: list[dict],
             changes: ChangeSet) -> tuple[list[dict | None], list[str]]:
    """Per row: the record (new, or a base record with a diff update applied) or None (the
    base's, copied as bytes), and the product id."""
    updates = {p.product_id: p for p in changes.updates}
    out: list[dict | None] = []
    pids: list[str] = []
    for old, j in zip(rows.base_row.tolist(), rows.new_of_row.tolist()):
        if j >= 0:
            out.append(new_records[j])
            pids.append(str(new_records[j]["product_id"]))
            continue
        pid = base_pids[old]
        pids.append(pid)
        update = updates.get(pid)
        if update is None:
            out.append(None)
            continue
        record = dict(base._metadata.records([old])[0])
        record.update(title=update.title, image=update.image, attributes=update.attributes, extra=update.extra,
                      row=update.row)
        out.append(record)
    return out, pids


def _encode_upserts(config, base: IndexVersion, changes: ChangeSet, options: EncodeOptions, work: Path, log):
    """Load the base's model (fingerprint checked) and encode the upserts (None when there are none)."""
    import torch

    from engine.model.model_folder import load_model

    if not changes.upserts:
        return None
    recorded = base.manifest.get("model") or {}
    model_dir = config.model_dir or Path(recorded.get("dir", ""))
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    log(f"stage: load model ({model_dir}, {device})")
    model = load_model(model_dir, device=device)
    if model.fingerprint != recorded.get("fingerprint"):
        raise BuildError(f"model {model_dir} (fingerprint {model.fingerprint[:16]}...) is not the base version's "
                         f"({str(recorded.get('fingerprint'))[:16]}...): vectors would not be comparable; "
                         "run a full build instead")
    log(f"stage: encode {len(changes.upserts)} upserted products ({options.view}, {options.precision})")
    encoded = encode_products(model, changes.upserts, work / "chunks", options, log=log)
    if base.query_dim > base.dim:  # the base stores the model's first dims only (indexer/served_width.py)
        if len(encoded.vectors) and stored_width(model, encoded.vectors) != base.dim:
            raise BuildError(f"base version {base.version} stores {base.dim} of the model's {base.query_dim} dimensions "
                             "(every product had a title and a photo, so the cross-modal block was left out); an "
                             "upserted product without a title or a photo needs that block: run a full build instead")
        encoded.vectors = np.ascontiguousarray(encoded.vectors[:, :base.dim])
    return encoded


def _work_key(base: IndexVersion, changes: ChangeSet, options: EncodeOptions) -> str:
    """Work-folder key: base version + changes (file checksum) + encode settings; a rerun of
    the same job resumes its encoded chunks, any other leftover is stale."""
    source = Path(changes.source)
    parts = [base.version, sha256_file(source) if source.is_file() else changes.source, options.view,
             options.precision, str(options.chunk_size)]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


def _drift(base: IndexVersion, changed: int, threshold: float) -> dict[str, Any]:
    """The manifest's drift record: changed products since the quantizer's training, over
    the items it was trained on."""
    previous = (base.manifest.get("incremental") or {}).get("changed_since_training", 0)
    since = int(previous) + changed
    items = max(1, trained_items(base.manifest))
    drift = since / items
    return {"changed_since_training": since, "trained_items": items, "drift": round(drift, 6),
            "drift_threshold": threshold, "retrain_advised": drift > threshold}


def base_product_ids(base: IndexVersion) -> list[str]:
    """Product id of every internal id of ``base``, in internal id order (one LMDB cursor pass)."""
    meta = base._metadata
    with meta._env.begin() as txn:
        return [bytes(v).decode("utf-8") for v in txn.cursor(db=meta._dbs[b"iid2pid"]).iternext(keys=False)]


def _assemble(base: IndexVersion, base_pids: list[str], changes: ChangeSet, encoded,
              log) -> tuple[RowPlan, np.ndarray, list, list, list, dict]:
    """Rows, new vectors, final records (None: copied), product ids, all rejects and the change counts."""
    from engine.catalog import Reject

    rejects = list(changes.rejects)
    new_vectors = np.empty((0, base.dim), np.float32)
    indexed: dict[str, int] = {}
    new_records: list[dict] = []
    if encoded is not None:
        for pos, reason in sorted(encoded.rejects.items()):
            p = changes.upserts[pos]
            rejects.append(Reject(p.row, p.product_id, f"{reason} (the base's product, if any, is kept)",
                                  p.to_dict()))
        for j, pos in enumerate(encoded.indexed):
            p = changes.upserts[pos]
            indexed[p.product_id] = j
            new_records.append(product_record(p, encoded.flags.get(pos, []), encoded.flag_detail.get(pos, {})))
        new_vectors = encoded.vectors
    rows = _row_plan(base_pids, changes, indexed)
    records, pids = _records(base, base_pids, rows, new_records, changes)
    added = len(set(indexed) - set(base_pids))
    counts = {"kept": int((rows.base_row >= 0).sum()), "upserted": len(indexed), "added": added,
              "replaced": len(indexed) - added, "updated": len(changes.updates), "deleted": len(changes.deletes),
              "rejected": len(rejects), "changes_read": changes.read_count}
    log(f"changes: {counts['kept']} kept, {counts['upserted']} upserted ({added} new), {counts['updated']} "
        f"metadata updates, {counts['deleted']} deleted, {counts['rejected']} rejected ({changes.source})")
    return rows, new_vectors, records, pids, rejects, counts


def _manifest_extra(config: IncrementalJobConfig, base: IndexVersion, changes: ChangeSet, options: EncodeOptions,
                    key: str) -> dict[str, Any]:
    """What the manifest records about the model, the catalogue and the build (the base's model)."""
    extra = {k: base.manifest[k] for k in ("model", "catalog") if k in base.manifest}
    if config.catalog is not None:
        extra["catalog"] = {**extra.get("catalog", {}), "path": str(Path(config.catalog).resolve()),
                            "file": changes.source, "fingerprint": f"sha256:{sha256_file(Path(changes.source))}"}
    extra["build"] = {"job_key": key, "batch_size": options.batch_size, "workers": options.workers,
                      "token_cache": options.token_cache}
    return extra


def write_changed_version(base: IndexVersion, base_pids: list[str], changes: ChangeSet, encoded, staged: Path,
                          version: str, options: VersionOptions, extra: dict[str, Any], mode: str,
                          drift_threshold: float = DEFAULT_DRIFT_THRESHOLD,
                          log: Callable[[str], None] = log_stage) -> tuple[dict[str, Any], dict[str, float]]:
    """Write the version ``changes`` make of ``base`` into ``staged``: upserts' vectors from
    ``encoded`` (an ``indexer.encode.EncodeResult`` over ``changes.upserts``, or None when
    there are none), everything else copied. ``mode``: "changes" or "catalog_diff".
    base_pids: ``base_product_ids(base)``.
    Returns ``(manifest, timings_s)``; the manifest records ``incremental`` and ``quantizer``."""
    rows, new_vectors, records, pids, rejects, counts = _assemble(base, base_pids, changes, encoded, log)
    extra = {**extra, "quantizer": reuse_record(base.manifest)}
    extra["incremental"] = {"base_version": base.version, "changes": changes.source, "mode": mode, **counts,
                            **_drift(base, counts["upserted"] + counts["deleted"], drift_threshold)}
    full = {"read": rows.n + len(rejects), "indexed": rows.n, "rejected": len(rejects),
            **{k: v for k, v in counts.items() if k != "rejected"}}
    log("stage: index (base quantizer reused)")
    return write_incremental_version(staged, version, base, rows, new_vectors, records, pids, rejects,
                                     plan_of(base.manifest), options, full, extra, log)


def _version_options(base: IndexVersion, config: IncrementalJobConfig) -> VersionOptions:
    return VersionOptions(n_shards=len(base.manifest["shards"]), factory=base.manifest["index"]["factory"],
                          nprobe=base.nprobe_default, k_factor=base.k_factor_default, refine=base.refine_default,
                          refine_storage=base.refine_storage)


def _build(config: IncrementalJobConfig, base: IndexVersion, root: Path, log) -> tuple[dict, Path, Path, str]:
    """Changes -> encode -> staged version under ``ROOT/tmp``; returns (manifest, staged, work, version)."""
    t0 = time.perf_counter()
    base_pids = base_product_ids(base)
    changes = _changes(config, base, base_pids)
    timings = {"changes": time.perf_counter() - t0}
    recorded = base.manifest.get("model") or {}
    options = dataclasses.replace(config.encode, view=recorded.get("view", "fused"),
                                  precision=recorded.get("precision", "fp32"))
    key = _work_key(base, changes, options)
    work = tmp_dir(root) / f"incr-{key}"
    removed = cleanup_stale(root, keep={work.name})
    if removed:
        log(f"cleanup: removed stale temporary folders {removed}")
    t0 = time.perf_counter()
    encoded = _encode_upserts(config, base, changes, options, work, log)
    timings["encode"] = time.perf_counter() - t0
    version = new_version_id()
    staged = work / "stage"
    shutil.rmtree(staged, ignore_errors=True)
    mode = "changes" if config.changes is not None else "catalog_diff"
    manifest, stage_timings = write_changed_version(
        base, base_pids, changes, encoded, staged, version, _version_options(base, config),
        _manifest_extra(config, base, changes, options, key), mode, config.drift_threshold, log)
    manifest["timings_s"] = {k: round(v, 3) for k, v in {**timings, **stage_timings}.items()}
    write_manifest(staged, manifest)
    return manifest, staged, work, version


def run_incremental_job(config: IncrementalJobConfig, log: Callable[[str], None] = log_stage) -> IndexJobResult:
    """Build and publish an incremental version. Raises CatalogError, ModelFolderError, BuildError."""
    root = Path(config.index_root)
    t_job = time.perf_counter()
    with build_lock(root):
        base_dir = resolve_base(root, config.base_version)
        log(f"stage: open base version {base_dir.name}")
        with IndexVersion(base_dir) as base:
            manifest, staged, work, version = _build(config, base, root, log)
        drift = manifest["incremental"]
        if drift["retrain_advised"]:
            log(f"warning: drift {drift['drift']:.3f} > {drift['drift_threshold']}: {drift['changed_since_training']}"
                f" of {drift['trained_items']} products changed since the quantizer was trained in "
                f"{manifest['quantizer']['trained_in']}; run a full build (no --base-version) to retrain")
        return publish_staged(root, staged, version, manifest, work, config.keep_versions, log, t_job,
                              note=f"base {base_dir.name}, ")
