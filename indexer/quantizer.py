"""Reuse an index version's trained IVF quantizer and PQ codebooks (no k-means).

Every shard of a version holds the same trained coarse quantizer and codebooks
(``indexer.build``), so an empty clone of any shard is the trained, empty index the version
was built from. A later version that reuses it (an incremental version, or a full build with
``--reuse-quantizer``) gives every unchanged vector the same list and the same PQ code.
Source: faiss (``clone_index`` + ``reset``); our choice.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss

from indexer.build import IndexPlan
from indexer.errors import BuildError
from indexer.manifest import read_manifest
from indexer.publish import resolve_version_dir


def empty_clone(shard: faiss.Index) -> faiss.Index:
    """A trained, empty copy of ``shard`` (same quantizer, codebooks, metric and dimension)."""
    index = faiss.clone_index(shard)
    index.reset()
    return index


def plan_of(manifest: dict[str, Any]) -> IndexPlan:
    """The ``IndexPlan`` a version was built with, read back from its manifest (``index`` block),
    with a note naming the version whose training it reuses. Raises BuildError when the
    manifest lacks a field."""
    index = manifest["index"]
    try:
        source = trained_in(manifest)
        notes = [f"quantizer and codebooks reused from version {source} (no k-means)"]
        return IndexPlan(index["factory_requested"], index["factory"], int(manifest["dim"]), int(index["nlist"]),
                         index["pq_m"], index["pq_nbits"], int(index["train_size"]), notes)
    except KeyError as exc:
        raise BuildError(f"version {manifest.get('version')}: manifest index block lacks {exc}") from exc


def load_trained(version: str | Path) -> tuple[IndexPlan, faiss.Index, dict[str, Any]]:
    """``(plan, trained empty index, manifest)`` of the index version at ``version`` (a version
    folder, or an index ROOT: its CURRENT). Reads shard 0 only.
    Raises IndexVersionError / NoCurrentVersionError / BuildError."""
    version_dir = resolve_version_dir(version)
    manifest = read_manifest(version_dir)
    shard_file = version_dir / manifest["shards"][0]["file"]
    try:
        shard = faiss.read_index(str(shard_file))
    except RuntimeError as exc:
        raise BuildError(f"{shard_file}: faiss cannot read this shard ({str(exc).splitlines()[0]})") from exc
    return plan_of(manifest), empty_clone(shard), manifest


def trained_in(manifest: dict[str, Any]) -> str:
    """The version whose full build trained this version's quantizer (itself when it trained
    its own): manifest ``quantizer.trained_in``."""
    return str((manifest.get("quantizer") or {}).get("trained_in", manifest["version"]))


def trained_items(manifest: dict[str, Any]) -> int:
    """How many items the version that trained the quantizer indexed (``quantizer.trained_items``,
    else this version's ``counts.indexed``): the denominator of the drift."""
    return int((manifest.get("quantizer") or {}).get("trained_items", manifest["counts"]["indexed"]))


def reuse_record(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest ``quantizer`` block of a version reusing the quantizer of ``manifest``'s version."""
    return {"trained_in": trained_in(manifest), "trained_items": trained_items(manifest)}
