"""The index build job: read -> encode -> index -> metadata -> manifest -> publish.

``run_index_job(config)`` holds the build lock of ROOT, removes stale temporary folders,
reads the catalogue (``engine.catalog``), encodes it resumably into
``ROOT/tmp/build-<key>`` (key = catalogue + model + view + limit, so a rerun of the same job
resumes and any other leftover is stale), reusing the backbone tokens a token cache already
holds when ``encode.token_cache`` is set (``indexer.token_reuse``), writes the version into that folder
(``indexer.version``) and publishes it atomically (``indexer.publish``). Every product read
is either indexed or in ``rejects.jsonl``; ``indexed + rejected == read`` is checked.
Source: our choice.
"""
from __future__ import annotations

import dataclasses

import hashlib
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from engine.catalog import FieldMapping, Reject, read_catalog
from engine.model.file_hashing import sha256_file
from indexer.encode import FLAG_IMAGE_ONLY, FLAG_IMAGE_UNREADABLE, FLAG_TEXT_ONLY, EncodeOptions, encode_products
from indexer.changes import image_checksum
from indexer.errors import BuildError
from indexer.publish import (build_lock, cleanup_stale, new_version_id, prune_versions, publish_version,
                             read_current, tmp_dir)
from indexer.quantizer import load_trained, reuse_record
from indexer.query_sample import query_tower_sample
from indexer.served_width import stored_vectors
from indexer.version import VersionOptions, write_version


@dataclass
class IndexJobConfig:
    """One ``ecsearch index`` run.

    catalog: catalogue path (fashion folder, JSONL, CSV); model_dir: model folder;
    index_root: ROOT; mapping: field mapping (None = detect); limit: read at most N rows;
    keep_versions: versions kept under ROOT/versions (K, CURRENT always kept);
    device: torch device for the item tower ("cpu", "cuda", None = cuda when available).
    executor: "local" (this process) or "ray" (``indexer.ray_executor``; ray_address: the
    cluster, None = start a local one; ray_actors / ray_actor_gpus: encoder actors and the
    GPUs each one takes); reuse_quantizer: an index version (folder, or ROOT for its CURRENT)
    whose trained IVF quantizer and PQ codebooks are reused instead of training (``indexer.quantizer``).
    recall_query_sample: queries of each ``indexer.query_sample.QUERY_KINDS`` kind sent through the query
    tower, so that nprobe serves each kind of real query as well as the item vectors (0: items only).
    """

    catalog: Path
    model_dir: Path
    index_root: Path
    mapping: FieldMapping | None = None
    limit: int | None = None
    keep_versions: int = 3
    device: str | None = None
    encode: EncodeOptions = field(default_factory=EncodeOptions)
    version: VersionOptions = field(default_factory=VersionOptions)
    executor: str = "local"
    ray_address: str | None = None
    ray_actors: int | None = None
    ray_actor_gpus: float = 0.0
    reuse_quantizer: Path | None = None  # a version (folder or ROOT) whose trained quantizer is reused
    recall_query_sample: int = 128


@dataclass
class IndexJobResult:
    """The published version, its folder, the manifest and the previous CURRENT."""

    version: str
    path: Path
    manifest: dict[str, Any]
    previous: str | None


def log_stage(message: str) -> None:
    """Progress lines go to stderr, flushed (tests watch them)."""
    print(message, file=sys.stderr, flush=True)


def _job_key(catalog_fp: str, model_fp: str, config: IndexJobConfig) -> str:
    """Work-folder key of a build. ``--token-cache`` is deliberately not part of it: a vector from
    cached float16 tokens equals the fresh one within cosine >= 0.999 (``indexer.token_reuse``),
    so a killed build resumes its chunks with or without the cache; each chunk records where its
    titles and photos came from (manifest ``build.sources``). Version identity (model and
    catalogue fingerprints) is unchanged either way."""
    parts = [catalog_fp, model_fp, config.encode.view, str(config.limit), str(config.encode.chunk_size),
             repr(config.mapping), config.encode.precision]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


def _with_precision(config: IndexJobConfig, device: str) -> IndexJobConfig:
    """``encode.precision`` "auto" resolved for ``device`` (bf16 where it runs natively), on a
    copy: the caller's config is not changed."""
    if config.encode.precision != "auto":
        return config
    from engine.cpu_features import bf16_is_fast

    precision = "bf16" if bf16_is_fast(device) else "fp32"
    return dataclasses.replace(config, encode=dataclasses.replace(config.encode, precision=precision))


def product_record(product, flags: list[str], flag_detail: dict[str, str]) -> dict[str, Any]:
    """The metadata record of an encoded ``Product`` (``indexer.metadata``), with the sha256 of
    its local photo (``image_sha256``, None without one) for catalogue diffs."""
    return {"product_id": product.product_id, "title": product.title, "image": product.image,
            "image_sha256": image_checksum(product.image), "attributes": product.attributes,
            "extra": product.extra, "row": product.row, "flags": flags, "flag_detail": flag_detail}


def flag_counts(records: list[dict[str, Any]]) -> dict[str, int]:
    """How many records carry each encoder flag (manifest counts)."""
    return {name: sum(flag in (r.get("flags") or ()) for r in records)
            for name, flag in (("text_only", FLAG_TEXT_ONLY), ("image_only", FLAG_IMAGE_ONLY),
                               ("image_unreadable", FLAG_IMAGE_UNREADABLE))}


def _records_and_counts(catalog, encoded) -> tuple[list[dict[str, Any]], list[Reject], dict[str, int]]:
    """Metadata records of the encoded products, all rejects (catalogue + encoder) and the
    manifest counts. Raises BuildError when a product was neither indexed nor rejected."""
    rejects: list[Reject] = list(catalog.rejects)
    for pos, reason in sorted(encoded.rejects.items()):
        p = catalog.products[pos]
        rejects.append(Reject(p.row, p.product_id, reason, p.to_dict()))
    records = []
    for pos in encoded.indexed:
        p = catalog.products[pos]
        flags = encoded.flags.get(pos, [])
        records.append(product_record(p, flags, encoded.flag_detail.get(pos, {})))
    counts = {
        "read": catalog.read_count,
        "indexed": len(records),
        **flag_counts(records),
        "rejected": len(rejects),
        "rejected_by_catalog": len(catalog.rejects),
        "rejected_by_encoder": len(encoded.rejects),
    }
    if counts["indexed"] + counts["rejected"] != counts["read"]:
        raise BuildError(f"products lost: indexed {counts['indexed']} + rejected {counts['rejected']} "
                         f"!= read {counts['read']}")
    return records, rejects, counts


def _manifest_extra(config: IndexJobConfig, model, device: str, catalog, catalog_fp: str, key: str,
                    encoded) -> dict[str, Any]:
    """What the manifest records about the model, the catalogue and the build."""
    return {
        "model": {"fingerprint": model.fingerprint, "dir": str(Path(config.model_dir).resolve()),
                  "view": config.encode.view, "dim": int(model.dim), "device": device,
                  "precision": config.encode.precision},
        "catalog": {"path": str(Path(config.catalog).resolve()), "layout": catalog.layout,
                    "file": catalog.source, "fingerprint": f"sha256:{catalog_fp}", "limit": config.limit,
                    "mapping": dataclasses.asdict(config.mapping) if config.mapping else None},
        "build": {"job_key": key, "resumed_items": encoded.resumed_items,
                  "batch_size": config.encode.batch_size, "workers": config.encode.workers,
                  "token_cache": config.encode.token_cache, "sources": encoded.sources,
                  "item_photo_views": encoded.item_views},
    }


def _read_stage(config: IndexJobConfig, timings: dict[str, float], log: Callable[[str], None]):
    """Read the catalogue; returns (catalogue, sha256 of its file). Raises BuildError when no
    product is usable."""
    log("stage: read")
    t0 = time.perf_counter()
    catalog = read_catalog(config.catalog, config.mapping, config.limit)
    timings["read"] = time.perf_counter() - t0
    log(f"read: {catalog.read_count} rows, {len(catalog.products)} products, {len(catalog.rejects)} rejected "
        f"({catalog.layout}: {catalog.source})")
    if not catalog.products:
        raise BuildError(f"{config.catalog}: no usable product among {catalog.read_count} rows read")
    return catalog, sha256_file(Path(catalog.source))


def _executor(config: IndexJobConfig, device: str):
    """None for the local executor, a ``RayExecutor`` for "ray". Raises BuildError for an
    unknown executor, or "ray" without Ray installed."""
    if config.executor == "local":
        return None
    if config.executor != "ray":
        raise BuildError(f"unknown executor {config.executor!r}; expected local or ray")
    from indexer.ray_executor import RayExecutor

    return RayExecutor(config.model_dir, device, config.ray_address, config.ray_actors, config.ray_actor_gpus)


def _reused_quantizer(config: IndexJobConfig, extra: dict[str, Any]):
    """``(plan, trained empty index)`` of ``config.reuse_quantizer`` (recorded in ``extra``), or None."""
    if config.reuse_quantizer is None:
        return None
    plan, empty, source = load_trained(config.reuse_quantizer)
    extra["quantizer"] = reuse_record(source)
    return plan, empty


def publish_staged(root: Path, staged: Path, version: str, manifest: dict[str, Any], work: Path, keep_versions: int,
                   log: Callable[[str], None], t_job: float, note: str = "") -> IndexJobResult:
    """Publish the staged version as CURRENT, prune old versions, drop the work folder and log it
    (``note``: extra words for the log line). Shared by full and incremental builds."""
    log("stage: publish")
    previous = read_current(root)
    target = publish_version(root, staged, version)
    pruned = prune_versions(root, keep_versions)
    shutil.rmtree(work, ignore_errors=True)
    log(f"published {version} at {target} ({note}previous {previous}); pruned {pruned}; "
        f"total {time.perf_counter() - t_job:.1f} s")
    return IndexJobResult(version, target, manifest, previous)


def run_index_job(config: IndexJobConfig, log: Callable[[str], None] = log_stage) -> IndexJobResult:
    """Build and publish one index version. Raises CatalogError, ModelFolderError, BuildError."""
    import torch

    from engine.model.model_folder import load_model
    root = Path(config.index_root)
    t_job = time.perf_counter()
    timings: dict[str, float] = {}
    with build_lock(root):
        catalog, catalog_fp = _read_stage(config, timings, log)
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        log(f"stage: load model ({config.model_dir}, {device})")
        model = load_model(config.model_dir, device=device)
        config = _with_precision(config, device)
        log(f"encode precision: {config.encode.precision}")
        executor = _executor(config, device)
        key = _job_key(catalog_fp, model.fingerprint, config)
        work = tmp_dir(root) / f"build-{key}"
        removed = cleanup_stale(root, keep={work.name})
        if removed:
            log(f"cleanup: removed stale temporary folders {removed}")

        log("stage: encode")
        t0 = time.perf_counter()
        encoded = encode_products(model, catalog.products, work / "chunks", config.encode, log=log,
                                  encode_chunks=executor.encode_chunks if executor else None)
        timings["encode"] = time.perf_counter() - t0
        if config.encode.token_cache is not None:
            timings["encode_from_cache"] = encoded.cached_seconds  # part of "encode"

        records, rejects, counts = _records_and_counts(catalog, encoded)
        log(f"encode: {counts['indexed']} indexed ({counts['text_only']} text-only), {counts['rejected']} rejected"
            f"{f', {encoded.resumed_items} resumed' if encoded.resumed_items else ''}; "
            + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in encoded.sources.items()))

        log("stage: index")
        version = new_version_id()
        staged = work / "stage"
        if staged.exists():
            shutil.rmtree(staged)
        extra = _manifest_extra(config, model, device, catalog, catalog_fp, key, encoded)
        extra["build"]["executor"] = executor.describe() if executor else {"executor": "local"}
        queries = query_tower_sample(model, catalog.products, config.recall_query_sample, seed=config.version.seed,
                                     precision=config.encode.precision, log=log)
        vectors, queries = stored_vectors(model, encoded.vectors, queries, extra, log)
        written = write_version(staged, version, vectors, records, config.version, rejects=rejects,
                                counts=counts, extra_manifest=extra, timings_s=timings, log=log,
                                run_all=executor.run_all if executor else None,
                                trained=_reused_quantizer(config, extra), query_vectors=queries)

        return publish_staged(root, staged, version, written.manifest, work, config.keep_versions, log, t_job)
