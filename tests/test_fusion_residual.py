"""The pooled residual of the fusion output (engine/model/fusion.py, issue 12 item 4)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.model.fusion import FusionEncoder
from engine.model.model_folder import load_model, save_model
from tests.tiny_models import make_tiny_model

HT, HI, D = 12, 20, 16


def _encoders():
    torch.manual_seed(0)
    plain = FusionEncoder(HT, HI, dim=D, heads=2, cross_layers=1, self_layers=1, fusion_layers=1, dropout=0.0)
    torch.manual_seed(0)
    residual = FusionEncoder(HT, HI, dim=D, heads=2, cross_layers=1, self_layers=1, fusion_layers=1, dropout=0.0,
                             pooled_residual=True)
    return plain.eval(), residual.eval()


def _batch(b: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    t, v = torch.randn(b, 7, HT, generator=g), torch.randn(b, 9, HI, generator=g)
    tm = torch.ones(b, 7, dtype=torch.bool)
    tm[0, 4:] = False
    vm = torch.ones(b, 9, dtype=torch.bool)
    has_t = torch.tensor([True, True, False, True, True][:b])
    has_v = torch.tensor([True, False, True, True, True][:b])
    return t, tm, v, vm, has_t, has_v


def test_residual_parameters_are_created_last_and_a_zero_gain_gives_the_plain_encoder():
    plain, residual = _encoders()
    shared = {k: v for k, v in residual.state_dict().items() if k in plain.state_dict()}
    assert set(residual.state_dict()) - set(shared) == {"text_residual.weight", "text_residual.bias",
                                                        "image_residual.weight", "image_residual.bias", "residual_gain"}
    for k, v in shared.items():  # same initial values as a model without the residual
        assert torch.equal(v, plain.state_dict()[k])
    batch = _batch()
    with torch.no_grad():
        residual.residual_gain.zero_()
        assert torch.allclose(residual(*batch), plain(*batch), atol=1e-6)


def test_an_absent_modality_adds_no_residual_and_a_present_one_moves_the_vector():
    _, residual = _encoders()
    t, tm, v, vm, has_t, has_v = _batch()
    with torch.no_grad():
        out = residual(t, tm, v, vm, has_t, has_v)
        v2 = v.clone()
        v2[1] = torch.randn(9, HI)  # row 1 has no image: its image tokens must not matter
        assert torch.allclose(residual(t, tm, v2, vm, has_t, has_v)[1], out[1], atol=1e-6)
        # with a huge image gain, an image-only row points along its projected raw mean
        residual.residual_gain[1] = 1e4
        big = residual(t, tm, v, vm, has_t, has_v)
        expected = F.normalize(residual.image_residual(v[2].mean(0)), dim=-1)
        assert torch.allclose(big[2], expected, atol=1e-3)
        assert torch.allclose(big.norm(dim=1), torch.ones(5), atol=1e-5)


def test_a_model_with_the_residual_round_trips_through_its_folder(tiny_backbone_dir, tmp_path):
    model = make_tiny_model(tiny_backbone_dir, pooled_residual=True)
    with torch.no_grad():
        model.item_tower.fusion.residual_gain.fill_(0.5)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.config.pooled_residual
    assert torch.equal(loaded.item_tower.fusion.residual_gain, torch.full((2,), 0.5))
    a = model.item_tower.encode(["blue shirt"], None)
    b = loaded.item_tower.encode(["blue shirt"], None)
    assert (a * b).sum() > 0.9999
