"""Shared fixtures: the real fashion catalogue and tiny random models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import engine  # noqa: F401,E402  (sets OMP_WAIT_POLICY before torch / faiss load)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
FASHION_DIR = Path(os.environ.get("ECSEARCH_DATA", REPO.parent / "shared" / "data" / "fashion-products"))


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    """``../shared/data/fashion-products`` (override with ECSEARCH_DATA)."""
    if not (FASHION_DIR / "styles.csv").is_file():
        pytest.fail(f"fashion catalogue not found at {FASHION_DIR} (set ECSEARCH_DATA)")
    return FASHION_DIR


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory) -> Path:
    """A folder holding tiny random HF backbones (``tiny-bert``, ``tiny-clip``)."""
    from tests.tiny_models import make_tiny_bert, make_tiny_clip

    folder = tmp_path_factory.mktemp("tiny-backbones")
    make_tiny_bert(folder / "tiny-bert")
    make_tiny_clip(folder / "tiny-clip")
    return folder


@pytest.fixture(scope="session")
def tiny_model(tiny_backbone_dir):
    """A tiny random TwoTowerModel (d=32) in eval mode; do not mutate it in tests."""
    from tests.tiny_models import make_tiny_model

    return make_tiny_model(tiny_backbone_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model, tmp_path_factory) -> Path:
    """``tiny_model`` saved as a model folder (config.json + model.safetensors)."""
    from engine.model.model_folder import save_model

    folder = tmp_path_factory.mktemp("tiny-model")
    save_model(tiny_model, folder)
    return folder
