"""The learned deep-path gain and the one-modality residual gains (engine/model/fusion.py, issue 12 item 4)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.model.fusion import FusionEncoder, masked_mean
from engine.model.model_folder import load_model, save_model
from engine.model.towers import ModelConfig
from tests.test_fusion_residual import _batch as fusion_batch
from tests.tiny_models import make_tiny_model

HT, HI, D = 12, 20, 16


def _encoder(**kwargs) -> FusionEncoder:
    torch.manual_seed(0)
    return FusionEncoder(HT, HI, dim=D, heads=2, cross_layers=1, self_layers=1, fusion_layers=1, dropout=0.0,
                         pooled_residual=True, **kwargs).eval()


def _batch():
    """Four rows: both modalities, text only, image only, both (the residual tests' batch)."""
    return fusion_batch(4)


def _residual_only(enc: FusionEncoder, t, tm, v, vm, has_t, has_v, gains=(1.0, 1.0)) -> torch.Tensor:
    """The expected output when the deep path contributes nothing: unit(sum of the present residuals)."""
    rt = F.normalize(enc.text_residual(masked_mean(t, tm)), dim=-1) * gains[0] * has_t[:, None]
    rv = F.normalize(enc.image_residual(masked_mean(v, vm)), dim=-1) * gains[1] * has_v[:, None]
    return F.normalize(rt + rv, dim=-1)


def test_a_zero_deep_gain_starts_the_encoder_as_its_linear_residual_views_and_the_gain_learns():
    enc = _encoder(deep_gain=0.0)
    batch = _batch()
    out = enc(*batch)
    assert torch.allclose(out, _residual_only(enc, *batch), atol=1e-6)
    with torch.no_grad():  # the deep weights do not matter while the gain is 0
        enc.merge.weight.mul_(3.0)
    assert torch.allclose(enc(*batch), out, atol=1e-6)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (enc(*batch) * target).sum().backward()
    assert enc.deep_gain.grad is not None and enc.deep_gain.grad.abs() > 0


def test_one_modality_rows_take_their_own_gains_and_rows_with_both_do_not():
    enc = _encoder(solo_gains=(1.0, 1.0))
    batch = _batch()
    before = enc(*batch).detach()
    with torch.no_grad():
        enc.solo_gain[1] = 1e4  # row 2 is image-only: it points along its image residual
        after = enc(*batch)
    rv = F.normalize(enc.image_residual(batch[2][2].mean(0)), dim=-1)
    assert torch.allclose(after[2], rv, atol=1e-3)
    assert not torch.allclose(after[2], before[2], atol=1e-3)
    for row in (0, 1, 3):  # both modalities (0, 3) or text-only (1): unchanged
        assert torch.allclose(after[row], before[row], atol=1e-6)


def test_solo_gains_need_the_pooled_residual():
    with pytest.raises(ValueError, match="pooled_residual"):
        FusionEncoder(HT, HI, dim=D, heads=2, solo_gains=(1.0, 2.0))


def test_the_gains_round_trip_through_the_model_folder_and_old_configs_still_load(tiny_backbone_dir, tmp_path):
    model = make_tiny_model(tiny_backbone_dir, pooled_residual=True, deep_gain=0.25, solo_gains=[1.0, 2.0])
    with torch.no_grad():
        model.item_tower.fusion.deep_gain.fill_(0.5)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.config.deep_gain == 0.25 and loaded.config.solo_gains == [1.0, 2.0]
    assert loaded.item_tower.fusion.deep_gain.item() == 0.5
    assert torch.equal(loaded.query_tower.fusion.solo_gain, torch.tensor([1.0, 2.0]))
    a = model.item_tower.encode(["blue shirt"], None)
    assert (a * loaded.item_tower.encode(["blue shirt"], None)).sum() > 0.9999
    old = {k: v for k, v in ModelConfig().to_dict().items() if k not in ("deep_gain", "solo_gains")}
    assert ModelConfig.from_dict(old).deep_gain is None  # a folder written before these fields
    plain = make_tiny_model(tiny_backbone_dir, pooled_residual=True)
    assert not any("deep_gain" in k or "solo_gain" in k for k in plain.trainable_state_dict())
