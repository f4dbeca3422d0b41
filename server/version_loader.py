"""Open an index version for serving and pair it with the query tower's model folder.

The manifest of an index version records the fingerprint of the model whose item tower
built it (and the folder it was loaded from). The server encodes queries with the query
tower of the *same* model, so a version is only served when the fingerprints agree:
otherwise query and item vectors live in different spaces and results are silently
wrong. Source: our choice.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from engine.model.errors import ModelFolderError
from server.index_holder import ServedVersion

log = logging.getLogger(__name__)


class ModelMismatchError(RuntimeError):
    """The model's fingerprint differs from the one the index version's manifest records,
    or no model folder can be found for it."""


def manifest_model(manifest: dict[str, Any]) -> tuple[str | None, str | None]:
    """``(fingerprint, model folder)`` recorded in an index manifest (either may be None)."""
    model = manifest.get("model")
    if isinstance(model, dict):
        return model.get("fingerprint"), model.get("path") or model.get("folder") or model.get("dir")
    return manifest.get("model_fingerprint"), manifest.get("model_dir")


def open_served_version(root: Path, *, model_dir: Path | None = None, model: Any = None,
                        precision: str = "fp32") -> tuple[ServedVersion, Any]:
    """Open ``ROOT/CURRENT``'s index version and check it against the query model.

    Args:
        root: index root (or a version folder).
        model_dir: model folder to load when ``model`` is None; None: the folder the
            manifest records.
        model: an already loaded ``TwoTowerModel`` (hot swap: the model never changes).
        precision: "fp32" or "bf16": how a freshly loaded model stores its weights
            (``TwoTowerModel.cast_for_inference``); the query tower must encode with it.

    Returns:
        ``(ServedVersion, model)``.

    Raises:
        indexer.errors.IndexVersionError: the version cannot be opened.
        ModelMismatchError: no model folder known, folder unusable, or fingerprint mismatch.
    """
    from indexer.search import open_index

    index = open_index(root)
    try:
        expected, recorded_dir = manifest_model(index.manifest)
        if model is None:
            folder = Path(model_dir) if model_dir is not None else (Path(recorded_dir) if recorded_dir else None)
            if folder is None:
                raise ModelMismatchError(
                    f"index version {index.version} records no model folder; pass --model MODEL_DIR")
            from engine.model.model_folder import load_model

            try:
                model = load_model(folder)
                model.cast_for_inference(precision)
            except ModelFolderError as exc:
                raise ModelMismatchError(f"cannot load the query tower's model folder {folder}: {exc}") from exc
            log.info("loaded model %s (fingerprint %s)", folder, model.fingerprint[:12])
        if expected is None:
            raise ModelMismatchError(f"index version {index.version} records no model fingerprint")
        if model.fingerprint != expected:
            raise ModelMismatchError(
                f"model fingerprint {model.fingerprint[:12]}... differs from the {expected[:12]}... "
                f"recorded by index version {index.version}: its item vectors were built by another model")
        fields = frozenset(index.facet_values())
        from server.filters import VersionCache

        from engine.retrieval.instance_first import instance_columns

        return ServedVersion(index=index, version=index.version, metadata_fields=fields,
                             cache=VersionCache(index), instance=instance_columns(model)), model
    except BaseException:
        index.close()
        raise
