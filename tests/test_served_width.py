"""indexer/served_width.py: an index version of items that all have a title and a photo leaves the
cross-modal block out (same scores), one with a text-only item keeps it, and an incremental
build refuses to add a one-modality product to a version without it."""
from __future__ import annotations

import json

import numpy as np
import pytest

from engine.model.model_folder import load_model, save_model
from indexer.errors import BuildError
from indexer.incremental import IncrementalJobConfig, run_incremental_job
from indexer.pipeline import IndexJobConfig, run_index_job
from indexer.search import open_index
from tests.test_cross_block import C, _with_cross
from indexer.version import VersionOptions
from tests.test_incremental import ENCODE
from tests.test_train import _mini_fashion

N = 40
VERSION = VersionOptions(n_shards=2, factory="IVF,Flat")  # any width (42 and 32 here)


@pytest.fixture(scope="module")
def cross_model_dir(tiny_backbone_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cross-model")
    save_model(_with_cross(tiny_backbone_dir), folder)
    return folder


def _build(catalog, model_dir, root):
    return run_index_job(IndexJobConfig(catalog=catalog, model_dir=model_dir, index_root=root, device="cpu",
                                        encode=ENCODE, version=VERSION), log=lambda _m: None)


def test_a_version_of_items_with_both_modalities_leaves_the_block_out(fashion_dir, cross_model_dir, tmp_path):
    catalog = _mini_fashion(fashion_dir, tmp_path / "fashion", n=N)
    built = _build(catalog, cross_model_dir, tmp_path / "root")
    model = load_model(cross_model_dir)
    assert built.manifest["dim"] == model.dim - C and built.manifest["query_dim"] == model.dim
    version = open_index(built.path)
    rows = [ln.split(",") for ln in (catalog / "styles.csv").read_text().splitlines()[1:]]
    titles = [r[-1] for r in rows]
    photos = [catalog / "images" / f"{r[0]}.jpg" for r in rows]
    items = model.item_tower.encode(titles, photos)
    assert np.all(items[:, model.dim - C:][:, [i for i in range(C) if i not in (C // 2 - 1, C - 1)]] == 0)
    queries = model.query_tower.encode(["black shoes", "red kurta"], None)  # full width: the version keeps its first dims
    scores, pids = version.search(queries, 5, nprobe=version.nlist, refine=True, k_factor=50)
    exact = queries @ items.T
    for row in range(2):
        top = np.argsort(-exact[row], kind="stable")[:5]
        assert pids[row] == [rows[i][0] for i in top]
        np.testing.assert_allclose(scores[row], exact[row, top], atol=2e-3)  # fp16 refine vectors
    with pytest.raises(Exception, match=rf"\(n, {model.dim}\) or \(n, {model.dim - C}\)"):
        version.search(np.ones((1, 7), np.float32), 5)
    version.close()
    # an upsert without a photo would need the block: refused, with the way out
    changes = tmp_path / "changes.jsonl"
    changes.write_text(json.dumps({"op": "upsert", "row": {"id": "990001", "productDisplayName": "Blue Denim Jeans"}})
                       + "\n", encoding="utf-8")
    with pytest.raises(BuildError, match="run a full build instead"):
        run_incremental_job(IncrementalJobConfig(index_root=tmp_path / "root", changes=changes, device="cpu",
                                                 encode=ENCODE), log=lambda _m: None)


def test_a_version_with_a_text_only_item_keeps_the_block(fashion_dir, cross_model_dir, tmp_path):
    first = (fashion_dir / "styles.csv").read_text(encoding="utf-8").splitlines()[1].split(",", 1)[0]
    catalog = _mini_fashion(fashion_dir, tmp_path / "fashion", n=N, drop_image=first)
    built = _build(catalog, cross_model_dir, tmp_path / "root")
    model = load_model(cross_model_dir)
    assert built.manifest["dim"] == model.dim and "query_dim" not in built.manifest
    assert built.manifest["counts"]["text_only"] == 1
