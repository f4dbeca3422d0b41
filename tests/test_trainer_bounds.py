"""engine.training.trainer keeps its learned scalars in range: the logit scale (one cap, from the model
config, on the parameter) and the uncertainty loss weights. Tiny random model, token tables
built in memory (random tokens: the values do not matter here, only the bounds)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.tokens.cache import TokenTable
from engine.training.trainer import Trainer, TrainConfig, TrainingData
from tests.tiny_models import make_tiny_model

N = 16


def _table(name: str, n: int, length: int, hidden: int, seed: int) -> TokenTable:
    rng = np.random.default_rng(seed)
    tokens = rng.standard_normal((n, length, hidden)).astype(np.float16)
    lengths = rng.integers(1, length + 1, size=n).astype(np.int32)
    return TokenTable(Path(name), [f"{name}-{i}" for i in range(n)], tokens, lengths)


def _data(model) -> TrainingData:
    texts = _table("text", N, 6, model.backbones.text.hidden_size, 0)
    images = _table("image", N, 5, model.backbones.image.hidden_size, 1)
    rows = np.arange(N, dtype=np.int64)
    none = np.full(N, -1, dtype=np.int64)
    return TrainingData(texts, images, q_text=rows, q_image=rows, item_text=rows, item_image=rows, item=rows,
                        query_product=rows, item_group=none, query_group=none, kinds=np.array(["instance"] * N))


def _trainer(model, tmp_path, **config) -> Trainer:
    settings = dict(steps=3, stage1_steps=1, batch_size=8, checkpoint_every=100, seed=0, lr=1e-3)
    settings.update(config)
    return Trainer(model, _data(model), TrainConfig(**settings), tmp_path, progress=False)


def test_logit_scale_above_its_cap_comes_back_and_keeps_a_gradient(tiny_backbone_dir, tmp_path):
    model = make_tiny_model(tiny_backbone_dir)
    cap = model.config.logit_scale_max
    trainer = _trainer(model, tmp_path)
    with torch.no_grad():
        model.log_logit_scale.fill_(math.log(3 * cap))  # e.g. loaded from elsewhere, or overshot
    model.logit_scale.backward()
    assert model.log_logit_scale.grad.item() > 0  # a read-time clamp would give 0 here
    model.log_logit_scale.grad = None
    trainer.train_step()
    assert model.logit_scale.item() <= cap * (1 + 1e-6)


def test_the_model_config_cap_is_the_only_cap(tiny_backbone_dir, tmp_path):
    """A config allowing a scale of 40 trains at 40, not at a second hard-coded e^3."""
    model = make_tiny_model(tiny_backbone_dir, logit_scale_init=40.0, logit_scale_max=50.0)
    record = _trainer(model, tmp_path).train_step()
    assert record["logit_scale"] == pytest.approx(40.0, rel=1e-5)
    with pytest.raises(ValueError, match="logit_scale_init"):
        make_tiny_model(tiny_backbone_dir, logit_scale_init=60.0, logit_scale_max=50.0)


def test_trainer_keeps_the_uncertainty_weights_in_their_range(tiny_backbone_dir, tmp_path):
    model = make_tiny_model(tiny_backbone_dir)
    trainer = _trainer(model, tmp_path, stage1_steps=0)
    weighting = trainer.weighting["stage2"]
    with torch.no_grad():
        weighting.log_vars.copy_(torch.tensor([-50.0, 0.0, 50.0]))
    trainer.train_step()
    assert max(weighting.weights().values()) < 100.0  # not e^50: bounded
    lo, hi = weighting.log_var_range
    assert weighting.log_vars.min().item() >= lo and weighting.log_vars.max().item() <= hi
    assert all(math.exp(-hi) * (1 - 1e-6) <= w <= math.exp(-lo) * (1 + 1e-6) for w in weighting.weights().values())


def test_the_scalar_gains_train_at_their_own_learning_rate(tiny_backbone_dir, tmp_path):
    """gain_lr_scale puts the fusion output's gains in their own AdamW group at lr * scale, without
    weight decay; every other parameter keeps its group and rate."""
    model = make_tiny_model(tiny_backbone_dir, pooled_residual=True, deep_gain=0.5, solo_gains=[1.0, 1.0])
    trainer = _trainer(model, tmp_path, gain_lr_scale=20.0)
    gain_group = trainer.optimizer.param_groups[-1]
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = sorted(names[id(p)].rsplit(".", 1)[-1] for p in gain_group["params"])
    assert grouped == sorted(["residual_gain", "solo_gain", "deep_gain"] * 2)  # both towers
    assert gain_group["weight_decay"] == 0.0
    assert gain_group["initial_lr"] == pytest.approx(20 * trainer.optimizer.param_groups[0]["initial_lr"])
    plain = _trainer(make_tiny_model(tiny_backbone_dir, pooled_residual=True, deep_gain=0.5), tmp_path / "p")
    assert len(plain.optimizer.param_groups) == 2  # scale 1: the groups as before


def test_the_logit_scale_trains_at_its_own_learning_rate(tiny_backbone_dir, tmp_path):
    """logit_scale_lr_scale puts the log logit scale alone in an AdamW group at lr * scale, no
    weight decay; over the same steps it moves about that many times further than at scale 1
    (AdamW's step is about lr whatever the gradient), still under the config's cap."""
    moved = {}
    for factor in (1.0, 20.0):
        model = make_tiny_model(tiny_backbone_dir)
        trainer = _trainer(model, tmp_path / str(factor), logit_scale_lr_scale=factor, steps=4, warmup_fraction=0.0)
        groups = trainer.optimizer.param_groups
        if factor == 1.0:
            assert len(groups) == 2  # the groups as before
        else:
            assert [id(p) for p in groups[-1]["params"]] == [id(model.log_logit_scale)]
            assert groups[-1]["weight_decay"] == 0.0
            assert groups[-1]["initial_lr"] == pytest.approx(factor * groups[0]["initial_lr"])
            assert all(model.log_logit_scale is not p for g in groups[:-1] for p in g["params"])
        start = model.log_logit_scale.item()
        for _ in range(4):
            trainer.train_step()
        moved[factor] = abs(model.log_logit_scale.item() - start)
        assert model.logit_scale.item() <= model.config.logit_scale_max * (1 + 1e-6)
    assert moved[20.0] > 5 * moved[1.0] > 0


def test_the_linear_baseline_gets_the_same_logit_scale_rate(tiny_backbone_dir):
    """The baseline's logit scale trains at the same factor as the towers' (a fair baseline)."""
    from engine.training.linear_baseline import train_linear_baseline

    model = make_tiny_model(tiny_backbone_dir)
    data = _data(model)
    moved = {}
    for factor in (1.0, 20.0):
        config = TrainConfig(steps=4, stage1_steps=1, batch_size=8, seed=0, lr=1e-3, warmup_fraction=0.0,
                             logit_scale_lr_scale=factor)
        linear, _ = train_linear_baseline(data, config, dim=8)
        moved[factor] = abs(linear.log_logit_scale.item() - math.log(10.0))
    assert moved[20.0] > 5 * moved[1.0] > 0
