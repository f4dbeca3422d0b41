"""Training with augmented query photos and shopper / composed pairs (issue 12 items 1-3):
the trainer's photo swap, the relevance of facet-keyed pairs, and a short end-to-end run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.training.job import TrainJob, train_model
from engine.training.trainer import Trainer, TrainConfig, TrainingData
from tests.test_train import _mini_fashion
from tests.test_trainer_bounds import _table
from tests.tiny_models import make_tiny_model, tiny_config

N, V = 12, 3


def _data(model, **extra) -> TrainingData:
    texts = _table("text", N, 6, model.backbones.text.hidden_size, 0)
    images = _table("image", N, 5, model.backbones.image.hidden_size, 1)
    rows = np.arange(N, dtype=np.int64)
    none = np.full(N, -1, dtype=np.int64)
    return TrainingData(texts, images, q_text=rows, q_image=rows, item_text=rows, item_image=rows, item=rows,
                        query_product=none, item_group=none, query_group=none,
                        kinds=np.array(["instance"] * N), **extra)


def test_query_photos_are_swapped_for_augmented_views_per_step(tiny_backbone_dir, tmp_path):
    model = make_tiny_model(tiny_backbone_dir)
    aug = _table("aug", N * V, 7, model.backbones.image.hidden_size, 2)
    q_aug = np.arange(N * V, dtype=np.int64).reshape(N, V)
    q_aug[0] = -1  # a query photo without views keeps its clean photo
    data = _data(model, aug_images=aug, q_image_aug=q_aug)
    idx = np.arange(N)
    config = dict(steps=2, stage1_steps=0, batch_size=N, checkpoint_every=100, seed=0)
    always = Trainer(model, data, TrainConfig(augment_p=1.0, **config), tmp_path, progress=False)
    batch, swapped = always.query_batch(idx)
    assert swapped == N - 1 and batch.has_image.all()
    assert torch.equal(batch.image_tokens[0, :data.images.lengths[0]],
                       torch.from_numpy(data.images.tokens[0, :data.images.lengths[0]].astype(np.float32)))
    for r in range(1, N):  # row r holds one of the V views of photo r, and nothing past its length
        n = int(batch.image_mask[r].sum())
        assert any(n == aug.lengths[v] and torch.equal(batch.image_tokens[r, :n],
                   torch.from_numpy(aug.tokens[v, :n].astype(np.float32))) for v in q_aug[r])
        assert batch.image_mask[r, :n].all() and not batch.image_mask[r, n:].any()
    again, _ = always.query_batch(idx)
    assert torch.equal(again.image_tokens, batch.image_tokens)  # a pure function of (seed, step)
    always.step = 1
    assert not torch.equal(always.query_batch(idx)[0].image_tokens, batch.image_tokens)
    never = Trainer(model, data, TrainConfig(augment_p=0.0, **config), tmp_path / "n", progress=False)
    assert never.query_batch(idx)[1] == 0
    with pytest.raises(ValueError, match="augment_p"):
        TrainConfig(augment_p=1.5)


def test_facet_keyed_pairs_mark_every_matching_item_relevant(tiny_backbone_dir):
    model = make_tiny_model(tiny_backbone_dir)
    # spec 0 (e.g. brand + type): products 0-3 share key 5, 4-5 key 6, the rest none
    keys = np.full((1, N), -1, dtype=np.int64)
    keys[0, :4], keys[0, 4:6] = 5, 6
    spec, key = np.full(N, -1, dtype=np.int64), np.full(N, -1, dtype=np.int64)
    spec[1], key[1] = 0, 5  # query 1 asks for key 5
    spec[4], key[4] = 0, 6
    fn = _data(model, relevance_keys=keys, query_spec=spec, query_key=key).false_negatives(np.arange(N)).numpy()
    assert fn[1].tolist() == [True, False, True, True] + [False] * (N - 4)
    assert fn[4].tolist() == [False] * 5 + [True] + [False] * (N - 6)
    assert not fn[[0, 2, 3, 5, 6]].any()  # instance queries: no relevant other item


def test_training_with_augmented_views_and_shopper_pairs(fashion_dir, tiny_backbone_dir, tmp_path):
    catalog = _mini_fashion(fashion_dir, tmp_path / "fashion", n=60)
    job = TrainJob(catalog=str(catalog), out=str(tmp_path / "model"), cache_dir=str(tmp_path / "cache"),
                   progress=False, model=tiny_config(tiny_backbone_dir), augment_views=2,
                   brand_query_rate=1.0, partial_title_rate=1.0, phrase_query_rate=1.0, composed_rate=1.0,
                   train=TrainConfig(steps=3, stage1_steps=1, batch_size=16, checkpoint_every=100, seed=0))
    summary = train_model(job)
    assert {"brand_query", "partial_title", "phrase_query", "composed"} <= set(summary["pairs_by_kind"])
    aug = summary["augmented_image_cache"]
    assert aug["views"] == 2 and aug["items"] == 2 * summary["image_cache"]["items"] and aug["bytes"] > 0
    log = [json.loads(line) for line in (Path(job.out) / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(r["augmented_photos"] > 0 for r in log)
    assert "fingerprint" in summary


def test_train_cli_augment_and_shopper_flags(fashion_dir, tiny_model_dir, tmp_path):
    from engine.cli import main as cli_main

    catalog = _mini_fashion(fashion_dir, tmp_path / "fashion", n=40)
    out = tmp_path / "cli"
    rc = cli_main(["train", "--catalog", str(catalog), "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
                   "--init-model", str(tiny_model_dir), "--steps", "2", "--stage1-steps", "1", "--batch-size", "8",
                   "--augment-views", "1", "--augment-p", "0.5", "--brand-query-rate", "1", "--composed-rate", "1",
                   "--partial-title-rate", "0", "--quiet"])
    assert rc == 0
    training = json.loads((out / "config.json").read_text())["extra"]["training"]
    assert training["augmented_image_cache"]["views"] == 1 and training["train"]["augment_p"] == 0.5
    assert {"brand_query", "composed"} <= set(training["pairs_by_kind"])
    assert "partial_title" not in training["pairs_by_kind"]  # the recipe's default rate, turned off
