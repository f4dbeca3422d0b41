"""The trained CLIP-style linear two-tower baseline (issue 12 item 5b) on a real subset."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from engine.cli import main as cli_main
from engine.evaluation.evaluate import SCENARIOS, build_pool
from engine.evaluation.evaluate import linear_rows
from engine.training.linear_baseline import LINEAR_ROW, load_linear_baseline
from engine.evaluation.robustness import LINEAR_LABEL
from engine.training.job import TrainJob, train_model
from engine.training.trainer import TrainConfig
from tests.test_train import _mini_fashion
from tests.tiny_models import tiny_config


@pytest.fixture(scope="module")
def trained(fashion_dir, tiny_backbone_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("linear")
    catalog = _mini_fashion(fashion_dir, root / "fashion", n=120)
    job = TrainJob(catalog=str(catalog), out=str(root / "model"), cache_dir=str(root / "cache"), progress=False,
                   model=tiny_config(tiny_backbone_dir), photo_query_rate=0.5, augment_views=1,
                   train=TrainConfig(steps=40, stage1_steps=2, batch_size=32, lr=5e-3, checkpoint_every=100, seed=0))
    return catalog, root, train_model(job)


def test_training_writes_a_baseline_that_beats_chance_on_its_pairs(trained):
    _, root, summary = trained
    info = summary["linear_baseline"]
    assert info["steps"] == 40 and info["batch_size"] == 32
    # in-batch InfoNCE at chance is log(batch); the learned projections are well below it
    assert info["final_loss"] < math.log(32) - 0.5
    model = load_linear_baseline(root / "model")
    assert model is not None
    meta = json.loads((root / "model" / "linear_baseline.json").read_text())
    assert meta["dim"] == model.text_proj.out_features and meta["steps"] == 40
    assert load_linear_baseline(root / "nowhere") is None


def test_linear_rows_share_projections_between_queries_and_items(trained, tiny_backbone_dir):
    catalog, root, _ = trained
    from engine.catalog import read_catalog
    from engine.model.model_folder import load_model

    model = load_model(root / "model")
    linear = load_linear_baseline(root / "model")
    pool = build_pool(read_catalog(str(catalog)).products, model.backbones, str(root / "cache"), progress=False)
    rows = linear_rows(linear, pool)[LINEAR_ROW]
    assert set(rows) == set(SCENARIOS)
    photos = [p.image for p in pool.products]
    unique_photos = np.mean([photos.count(x) == 1 for x in photos])
    assert rows["i2i"]["recall@1"] >= unique_photos - 1e-9  # same photo, same projection, same vector
    for s in SCENARIOS:
        assert 0.0 <= rows[s]["recall@1"] <= rows[s]["recall@10"] <= 1.0


def test_eval_cli_reports_the_linear_rows_and_robustness(trained, tmp_path):
    catalog, root, _ = trained
    out = tmp_path / "results.json"
    rc = cli_main(["eval", "--model", str(root / "model"), "--catalog", str(catalog), "--split", "all",
                   "--cache-dir", str(root / "cache"), "--out", str(out), "--robust", "20", "--quiet"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert set(report["rows"][LINEAR_ROW]) == set(SCENARIOS)
    linear = report["comparisons"]["trained (fused) against the linear two-tower"]
    assert set(linear) == {"t2i", "t2m", "i2t", "i2m", "m2t", "m2i"}
    assert linear["t2i"]["recall@1"]["mean_b"] == pytest.approx(report["rows"][LINEAR_ROW]["t2i"]["recall@1"])
    robust = report["robustness"]
    for task in ("augmented_photo", "brand_type", "attribute_phrase", "composed"):
        if task in robust:
            assert LINEAR_LABEL in robust[task]["rows"]
    assert "augmented_photo" in robust
