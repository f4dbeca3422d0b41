"""engine.evaluation.evaluate / ``ecsearch eval`` on a tiny random model and a real subset."""
from __future__ import annotations

import json

import numpy as np
import pytest

from engine.catalog import read_catalog
from engine.cli import main as cli_main
from engine.evaluation.evaluate import RAW_ROWS, SCENARIOS, build_pool, evaluate_models, markdown_tables, own_photo_ranks
from engine.evaluation.ranking_metrics import rank_of_targets
from tests.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def pool_products(fashion_dir):
    return read_catalog(fashion_dir, limit=150).products


def test_identity_towers_score_perfectly_on_same_form_scenarios(pool_products, tiny_backbone_dir, tmp_path):
    """With one shared fusion encoder the query and the item of the same product and form get
    the same vector, so t2t / i2i / m2m instance recall@1 is the share of products whose
    title / photo / both are unique in the pool: a check of the whole eval plumbing."""
    model = make_tiny_model(tiny_backbone_dir, share_fusion=True)
    pool = build_pool(pool_products, model.backbones, str(tmp_path), progress=False)
    result = evaluate_models({"shared": model}, pool)
    rows = result["rows"]["shared"]
    titles = [p.title for p in pool.products]
    unique_titles = np.mean([titles.count(t) == 1 for t in titles])
    assert rows["t2t"]["recall@1"] >= unique_titles - 1e-9
    assert rows["i2i"]["recall@1"] == pytest.approx(1.0)
    assert rows["m2m"]["recall@1"] == pytest.approx(1.0)
    for s in SCENARIOS:
        for value in rows[s].values():
            assert 0.0 <= value <= 1.0
        assert rows[s]["recall@1"] <= rows[s]["recall@5"] <= rows[s]["recall@10"]
    # attribute queries: phrase of a group with >= 2 pool members, representative left out
    assert len(pool.query_phrases) == len(pool.query_reps) > 0
    for phrase, rep, gid in zip(pool.query_phrases, pool.query_reps, pool.query_groups):
        assert pool.groups[rep] == gid and (pool.groups == gid).sum() >= 2
        a = pool.products[rep].attributes
        assert phrase == f"{a['gender']} {a['baseColour']} {a['articleType']}".lower()
    table = markdown_tables(result["rows"])
    assert "| shared |" in table and "ndcg@10" in table


def test_eval_cli_writes_json_and_markdown_with_baselines(fashion_dir, tiny_model_dir, tmp_path):
    out, md = tmp_path / "results.json", tmp_path / "results.md"
    rc = cli_main(["eval", "--model", str(tiny_model_dir), "--catalog", str(fashion_dir), "--limit", "300",
                   "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--markdown", str(md), "--quiet",
                   "--own-photo", "30"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["own_photo"]["products"] + len(report["own_photo"]["excluded"]) == 30
    assert 0.0 <= report["own_photo"]["rank1"] <= report["own_photo"]["recall@5"] <= 1.0
    assert "own photo -> product, first" in md.read_text()
    split = dict(line.split(",") for line in (fashion_dir / "split.csv").read_text().splitlines()[1:])
    ids = [line.split(",", 1)[0] for line in (fashion_dir / "styles.csv").read_text().splitlines()[1:301]]
    assert report["pool_size"] + len(report["excluded"]) == sum(split[i] == "test" for i in ids)
    labels = set(report["rows"])
    assert {"trained (fused)", "trained, m = average of T and V"} <= labels
    assert not any("untrained" in label for label in labels)  # issue 12 item 5: the chance-level rows are gone
    raw = {label: report["rows"].pop(label) for label in RAW_ROWS}
    assert set(raw[RAW_ROWS[0]]) == {"t2t"} and set(raw[RAW_ROWS[1]]) == {"i2i"}
    assert set(raw[RAW_ROWS[2]]) == {"t2m", "i2m", "m2t", "m2i", "m2m"}  # t and v share no space: no t2i, i2t
    assert raw[RAW_ROWS[1]]["i2i"]["recall@1"] == pytest.approx(1.0)  # same photo, same feature
    assert raw[RAW_ROWS[2]]["m2m"]["recall@1"] == pytest.approx(1.0)
    # a zero half adds nothing: t2m of the concatenation ranks like t2t of the text features
    assert raw[RAW_ROWS[2]]["t2m"]["recall@10"] == pytest.approx(raw[RAW_ROWS[0]]["t2t"]["recall@10"])
    labels -= set(RAW_ROWS)
    for label in labels:
        assert set(report["rows"][label]) == set(SCENARIOS)
        assert set(report["rows"][label]["t2i"]) == {"recall@1", "recall@5", "recall@10", "mrr",
                                                     "ndcg@10", "precision@10"}
    # the trained rows differ only in the m form: t2i is the same for the four
    t2i = {report["rows"][b]["t2i"]["recall@10"] for b in labels if b.startswith("trained")}
    assert len(t2i) == 1
    assert "trained, m = average of T and V" in md.read_text()


def test_own_photo_ranks_match_the_live_towers(pool_products, tiny_backbone_dir, tmp_path):
    """Photo alone through the query tower vs the fused item vectors, from the token cache:
    the same vectors (up to the cache's fp16) and ranks as the towers' own encode API."""
    model = make_tiny_model(tiny_backbone_dir)
    products = pool_products[:40]
    pool = build_pool(products, model.backbones, str(tmp_path), progress=False)
    ranks = own_photo_ranks(model, pool)
    n = len(pool.products)
    assert ranks.shape == (n,) and ranks.min() >= 1 and ranks.max() <= n
    photos = [p.image for p in pool.products]
    q = model.query_tower.encode([None] * n, photos)
    c = model.item_tower.encode([p.title for p in pool.products], photos)
    live = rank_of_targets(q, c, np.arange(n))
    assert np.mean(ranks == live) >= 0.9  # fp16 cache: near-ties may swap


def test_eval_cli_reports_a_missing_model_folder(fashion_dir, tmp_path, capsys):
    rc = cli_main(["eval", "--model", str(tmp_path / "nope"), "--catalog", str(fashion_dir), "--quiet"])
    assert rc == 2
    assert "has no config.json" in capsys.readouterr().err


def test_the_cross_block_row_ranks_each_title_near_its_own_photo(pool_products, tiny_backbone_dir, tmp_path):
    """``cross_block_rows``: fitted on the pool's own (title, photo) pairs, the canonical variates
    put a product's photo far above chance for its title (and the title for its photo); a model
    without the block has no such row."""
    from engine.evaluation.evaluate import CROSS_ROW, cross_block_rows
    from engine.training.cross_fit import init_cross_block

    model = make_tiny_model(tiny_backbone_dir, cross_dim=34)  # k = 16 of the 32-wide tiny backbones
    pool = build_pool(pool_products, model.backbones, str(tmp_path), progress=False)
    n = len(pool.products)
    init_cross_block(model, [(pool.texts, [p.title for p in pool.products], pool.images,
                              [p.image for p in pool.products])], reg=0.1)
    rows = cross_block_rows(model, pool)
    assert set(rows) == {CROSS_ROW} and set(rows[CROSS_ROW]) == {"t2i", "i2t"}
    for s in ("t2i", "i2t"):
        metrics = rows[CROSS_ROW][s]
        assert metrics["recall@10"] > 3 * 10 / n, (s, metrics)  # chance is 10 / n
        assert 0.0 <= metrics["ndcg@10"] <= 1.0
    assert cross_block_rows(make_tiny_model(tiny_backbone_dir), pool) == {}
