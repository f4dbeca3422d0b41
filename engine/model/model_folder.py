"""Model folders: ``config.json`` + ``model.safetensors``, loaded from local paths only.

``config.json`` holds the ``ModelConfig`` (with references to the backbone folders / files,
``pkg:`` paths for the default weights) and the backbones' content fingerprints, so a model is
never silently paired with different backbones. ``model.safetensors`` holds our own weights
(fusion heads, logit scale) — no pickle. The model's fingerprint is the sha256 of the two
files' bytes; index versions record it. Source: our choice.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.model.errors import ModelFolderError
from engine.model.file_hashing import sha256_named_files
from engine.model.towers import ModelConfig, TwoTowerModel, build_model

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "ecsearch-two-tower/1"


def save_model(model: TwoTowerModel, folder: str | Path, extra: dict | None = None) -> str:
    """Write ``model`` to ``folder`` (created) and return its fingerprint.

    Files are written to temporary names and renamed, so a reader never sees half a folder.
    ``extra`` (JSON-serialisable, e.g. training summary) is stored under ``"extra"``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.trainable_state_dict().items()}
    if model.config.share_fusion:  # one tensor, one name: drop the item tower's aliases of the query's
        state = {k: v for k, v in state.items() if not _aliases_query(k, v, state)}
    config = {
        "format": FORMAT,
        "model": model.config.to_dict(),
        "backbone_fingerprints": {"text": model.backbones.text_fingerprint,
                                  "image": model.backbones.image_fingerprint},
        "extra": extra or {},
    }
    _atomic_write(folder / WEIGHTS_FILE, lambda p: save_file(state, str(p), metadata={"format": FORMAT}))
    _atomic_write(folder / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    model.fingerprint = fingerprint_folder(folder)
    return model.fingerprint


def _item_key(query_key: str) -> str:
    return "item_tower." + query_key[len("query_tower."):]


def _aliases_query(key: str, value: torch.Tensor, state: dict) -> bool:
    """``key`` is an item-tower tensor that is the query tower's own (``share_fusion``)."""
    if not key.startswith("item_tower."):
        return False
    twin = state.get("query_tower." + key[len("item_tower."):])
    return twin is not None and twin.data_ptr() == value.data_ptr() and twin.shape == value.shape


def load_model(folder: str | Path, device: str | torch.device = "cpu", check_backbones: bool = True) -> TwoTowerModel:
    """Load a model folder written by ``save_model``; returns the model in eval mode on ``device``.

    Raises:
        ModelFolderError: folder or files missing, unreadable, wrong format, weights not matching
            the config, or (``check_backbones``) a backbone whose content changed since saving.
    """
    folder = Path(folder)
    meta, config = _read_config(folder)
    model = build_model(config, seed=None)
    if check_backbones:
        _check_backbones(folder, meta, {"text": model.backbones.text_fingerprint,
                                        "image": model.backbones.image_fingerprint})
    weights_path = folder / WEIGHTS_FILE
    try:
        state = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types
        raise ModelFolderError(f"cannot read {weights_path}: {exc}") from exc
    expected = set(model.trainable_state_dict())
    if config.share_fusion:  # the item tower's aliases (its own private blocks are saved)
        state.update({k: v for k, v in ((_item_key(q), v) for q, v in list(state.items())
                                        if q.startswith("query_tower.")) if k in expected and k not in state})
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ModelFolderError(f"{weights_path} does not match its config: missing {sorted(missing)[:5]}, "
                               f"unexpected {sorted(unexpected)[:5]}")
    _check_fixed_buffers(model, state, weights_path)
    model.load_state_dict(state, strict=False)
    model.fingerprint = fingerprint_folder(folder)
    model.folder = folder
    model.extra = meta.get("extra", {})
    return model.to(device).eval()


def _check_fixed_buffers(model: TwoTowerModel, state: dict, weights_path: Path) -> None:
    """The private blocks' fixed gains are set from the config and saved with the weights; a
    config edited after saving would otherwise be ignored without a word. Raises ModelFolderError
    when the two disagree (our choice)."""
    built = model.state_dict()
    for name, value in state.items():
        if name.endswith(".gains") and name in built and not torch.allclose(built[name].float(), value.float()):
            raise ModelFolderError(f"{weights_path}: {name} is {value.tolist()} but config.json says "
                                   f"{built[name].tolist()} (config.json edited after saving? write a new "
                                   "model folder instead)")


def check_model_folder(folder: str | Path) -> str:
    """What ``load_model`` checks before reading the weights (files present, format, config,
    backbones unchanged since saving), without building the model; returns the folder's
    fingerprint. Fast (no backbone is loaded): for "is this folder still usable" checks.

    Raises:
        ModelFolderError: as ``load_model``, except weights that do not match the config.
    """
    from engine.model.backbones.registry import spec_fingerprint

    folder = Path(folder)
    meta, config = _read_config(folder)
    _check_backbones(folder, meta, {"text": spec_fingerprint(config.text_backbone),
                                    "image": spec_fingerprint(config.image_backbone)})
    return fingerprint_folder(folder)


def _read_config(folder: Path) -> tuple[dict, ModelConfig]:
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ModelFolderError(f"model folder {folder} has no {path.name}")
    try:
        meta = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"cannot read {config_path}: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise ModelFolderError(f"{config_path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        return meta, ModelConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFolderError(f"{config_path}: bad model config: {exc}") from exc


def _check_backbones(folder: Path, meta: dict, actual: dict) -> None:
    stored = meta.get("backbone_fingerprints", {})
    for side in ("text", "image"):
        if stored.get(side) != actual[side]:
            raise ModelFolderError(
                f"the {side} backbone changed since {folder} was saved "
                f"(stored {stored.get(side)}, found {actual[side]})")


def fingerprint_folder(folder: str | Path) -> str:
    """sha256 hex digest over ``config.json`` and ``model.safetensors`` bytes.

    Raises:
        ModelFolderError: a file is missing.
    """
    files = [(name, Path(folder) / name) for name in (CONFIG_FILE, WEIGHTS_FILE)]
    for name, path in files:
        if not path.is_file():
            raise ModelFolderError(f"model folder {folder} has no {name}")
    return sha256_named_files(files)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.chmod(tmp, 0o644)  # some writers create 0600 temporary files; model folders are shared read-only
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
