"""Building, training and tracing leave process-wide state alone: torch's global generator,
the shared (cached) Hugging Face models, TorchScript's autocast flag."""
from __future__ import annotations

import torch

from engine.model.backbones import hf
from engine.model.towers import build_model
from tests.tiny_models import tiny_config


def test_build_model_leaves_the_global_generator_alone_and_is_reproducible(tiny_backbone_dir):
    config = tiny_config(tiny_backbone_dir)
    before = torch.get_rng_state()
    a = build_model(config, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    b = build_model(config, seed=7)
    for name, value in a.trainable_state_dict().items():
        assert torch.equal(value, b.trainable_state_dict()[name]), name


def test_a_text_backbone_does_not_reconfigure_the_shared_cached_model(tiny_backbone_dir):
    folder = str(tiny_config(tiny_backbone_dir).text_backbone["path"])
    hf._load_cached.cache_clear()
    shared = hf.load_hf_model(folder)
    implementation = shared.config._attn_implementation
    backbone = hf.HFTextBackbone(folder)
    assert hf.load_hf_model(folder) is shared
    assert shared.config._attn_implementation == implementation  # untouched
    assert backbone.model.config._attn_implementation == "eager"  # the backbone got its own


def test_tracing_a_graph_never_toggles_the_process_wide_jit_autocast_flag(tiny_model, monkeypatch):
    from engine.model import tower_graphs

    calls = []
    original = torch._C._jit_set_autocast_mode
    monkeypatch.setattr(torch._C, "_jit_set_autocast_mode", lambda on: calls.append(on) or original(on))
    tower_graphs.trace_path(tiny_model.query_tower, "text", "fp32")
    assert calls == []
    assert original(False) is False  # off, as set once when the module was imported
