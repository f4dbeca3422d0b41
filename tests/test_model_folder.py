"""Model folders: bit-exact round trip, fingerprints, and clear errors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from engine.model.errors import ModelFolderError
from engine.model.model_folder import check_model_folder, fingerprint_folder, load_model, save_model
from tests.test_towers import photos  # noqa: F401  (fixture: four real catalogue photos)
from tests.tiny_models import make_tiny_model


def test_save_load_round_trips_bit_exactly(tiny_model, tiny_model_dir, fashion_dir):
    loaded = load_model(tiny_model_dir)
    a, b = tiny_model.trainable_state_dict(), loaded.trainable_state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    photo = str(fashion_dir / "images" / "1563.jpg")
    for tower in ("query_tower", "item_tower"):
        x = getattr(tiny_model, tower).encode(["navy shirt", None], [photo, photo])
        y = getattr(loaded, tower).encode(["navy shirt", None], [photo, photo])
        np.testing.assert_array_equal(x, y)
    assert loaded.fingerprint == fingerprint_folder(tiny_model_dir) == tiny_model.fingerprint


def test_no_pickle_in_our_files(tiny_model_dir):
    assert sorted(p.name for p in tiny_model_dir.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model"]["dim"] == 32 and set(config["backbone_fingerprints"]) == {"text", "image"}


def test_fingerprint_changes_with_weights(tiny_backbone_dir, tmp_path):
    a = save_model(make_tiny_model(tiny_backbone_dir, seed=1), tmp_path / "a")
    b = save_model(make_tiny_model(tiny_backbone_dir, seed=2), tmp_path / "b")
    assert a != b and len(a) == 64


def test_shared_fusion_round_trip(tiny_backbone_dir, tmp_path):
    model = make_tiny_model(tiny_backbone_dir, share_fusion=True)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    q = loaded.query_tower.encode(["red heels"], [None])
    np.testing.assert_array_equal(q, loaded.item_tower.encode(["red heels"], [None]))
    np.testing.assert_array_equal(q, model.query_tower.encode(["red heels"], [None]))


def test_shared_fusion_with_private_blocks_keeps_each_towers_gains(tiny_backbone_dir, tmp_path, photos):
    # share_fusion shares the trained fusion encoder; the fixed private blocks stay per tower (their gains differ)
    model = make_tiny_model(tiny_backbone_dir, seed=4, share_fusion=True, image_private_dim=6,
                            image_private_query_gains=[0.0, 3.0, 0.0], image_private_item_gain=1.0,
                            text_private_dim=5, text_private_query_gains=[0.8, 0.0, 0.4], text_private_item_gain=0.5)
    q, i = model.query_tower.fusion, model.item_tower.fusion
    assert q is not i and q.text_proj is i.text_proj and q.merge is i.merge and q.text_absent is i.text_absent
    assert q.private is not i.private and i.private.gains.tolist() == [1.0, 1.0, 1.0]
    assert len(list(model.parameters())) == len(list(make_tiny_model(tiny_backbone_dir, share_fusion=True).parameters()))
    g = torch.Generator().manual_seed(4)
    for block in ("private", "text_private"):
        shape = getattr(q, block).weight.shape
        weight, bias = torch.randn(*shape, generator=g), torch.randn(shape[0], generator=g)
        for fusion in (q, i):
            getattr(fusion, block).set_projection(weight, bias)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.query_tower.fusion.merge is loaded.item_tower.fusion.merge
    assert loaded.item_tower.fusion.private.gains.tolist() == [1.0, 1.0, 1.0]
    assert loaded.query_tower.fusion.private.gains.tolist() == [0.0, 3.0, 0.0]
    texts, images = ["red heels", None, "blue jeans"], [None, photos[0], photos[1]]
    for tower in ("query_tower", "item_tower"):
        np.testing.assert_allclose(getattr(loaded, tower).encode(texts, images, use_graphs=False),
                                   getattr(model, tower).encode(texts, images, use_graphs=False), atol=1e-6)
    # same trained encoder, different block gains: a photo-only query and item differ only in the blocks
    qv = loaded.query_tower.encode(None, photos[:1], use_graphs=False)[0]
    iv = loaded.item_tower.encode(None, photos[:1], use_graphs=False)[0]
    np.testing.assert_allclose(qv[:32] / np.linalg.norm(qv[:32]), iv[:32] / np.linalg.norm(iv[:32]), atol=1e-6)
    assert not np.allclose(qv, iv, atol=1e-3)


def test_a_config_edited_after_saving_is_refused_not_ignored(tiny_backbone_dir, tmp_path):
    # the private blocks' gains live in the weights too: an edited config.json must not be silently ignored
    model = make_tiny_model(tiny_backbone_dir, text_private_dim=6, text_private_query_gains=[0.8, 0.0, 0.4])
    save_model(model, tmp_path / "m")
    assert load_model(tmp_path / "m").config.text_private_query_gains == [0.8, 0.0, 0.4]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["model"]["text_private_query_gains"] = [0.8, 0.0, 0.6]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match=r"text_private\.gains is \[0\.8.*0\.4.*config\.json says"):
        load_model(tmp_path / "m")


def test_missing_and_corrupt_files_give_clear_errors(tiny_model_dir, tmp_path):
    with pytest.raises(ModelFolderError, match="has no config.json"):
        load_model(tmp_path / "nothing-here")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\0" * 100)
    with pytest.raises(ModelFolderError, match="cannot read"):
        load_model(broken)


def test_changed_backbone_is_refused(tiny_backbone_dir, tmp_path):
    from tests.tiny_models import make_tiny_bert, tiny_config
    from engine.model.towers import build_model

    bert = make_tiny_bert(tmp_path / "bert", seed=0)
    config = tiny_config(tiny_backbone_dir, text_backbone={"type": "hf", "path": str(bert)})
    save_model(build_model(config), tmp_path / "m")
    assert check_model_folder(tmp_path / "m") == load_model(tmp_path / "m").fingerprint
    make_tiny_bert(bert, seed=5)  # different weights at the same path
    for check in (load_model, check_model_folder):  # the quick check (no model built) refuses it too
        with pytest.raises(ModelFolderError, match="text backbone changed"):
            check(tmp_path / "m")
    with pytest.raises(ModelFolderError, match="has no config.json"):
        check_model_folder(tmp_path / "nothing-here")
