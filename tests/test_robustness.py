"""engine.evaluation.robustness and ``ecsearch eval --robust`` on a real subset and a tiny random model."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from engine.catalog import read_catalog
from engine.cli import main as cli_main
from engine.evaluation.evaluate import build_pool
from engine.evaluation.hybrid import (CEILING_LABEL, DENSE_LABEL, HYBRID_LABEL, HYBRID_WEIGHTED_LABEL, LEXICAL_LABEL,
                                      lexical_index, retrieval_rows)
from engine.evaluation.robustness import (MIN10_TASKS, P10_MIN_RELEVANT, composed_query_set, evaluate_robustness,
                                          robustness_markdown, set_metrics, shopper_query_sets, text_query_set,
                                          with_min_relevant)
from engine.catalog.shopper_queries import facet_key, product_facets
from tests.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def catalogue(fashion_dir, tiny_backbone_dir, tmp_path_factory):
    model = make_tiny_model(tiny_backbone_dir)
    products = read_catalog(fashion_dir, limit=160).products
    return model, build_pool(products, model.backbones, str(tmp_path_factory.mktemp("cache")), progress=False)


def test_query_sets_mark_exactly_the_matching_candidates(catalogue):
    _, pool = catalogue
    facets = [product_facets(p.attributes, p.title) for p in pool.products]
    queries = pool.products[:60]
    brand = text_query_set(queries, pool, "brand_type")
    assert brand.texts and len(set(brand.texts)) == len(brand.texts)
    for text, key in zip(brand.texts, brand.keys):
        members = np.nonzero(brand.relevant[key])[0]
        assert len(members) >= 1
        keys = {facet_key(facets[j], ("brand", "articleType")) for j in members}
        assert len(keys) == 1 and text == " ".join(keys.pop().lower().split("|"))
    composed = composed_query_set(queries, pool)
    assert composed.texts and (composed.photos >= 0).all()
    for photo, key in zip(composed.photos, composed.keys):
        assert not composed.relevant[key, photo]  # the trigger product lacks the asked facet
        assert composed.relevant[key].any()
    with pytest.raises(ValueError, match="kind"):
        text_query_set(queries, pool, "colour")


def test_set_metrics_on_perfect_and_reversed_embeddings(catalogue):
    _, pool = catalogue
    qs = text_query_set(pool.products[:60], pool, "attribute_phrase")
    cand = qs.relevant.T.astype(np.float32)  # candidate j: one-hot of the keys it matches
    perfect = set_metrics(np.eye(len(qs.texts), dtype=np.float32), cand, qs)
    counts = qs.relevant.sum(axis=1)
    assert perfect["precision@10"] == pytest.approx(np.mean(np.minimum(counts, 10) / 10))
    assert perfect["ndcg@10"] == pytest.approx(1.0)
    assert set_metrics(-np.eye(len(qs.texts), dtype=np.float32), cand, qs)["precision@10"] < perfect["precision@10"]


def test_robustness_rows_and_cli(catalogue, fashion_dir, tiny_model_dir, tmp_path):
    model, pool = catalogue
    result = evaluate_robustness(model, pool.products[:30], pool, str(tmp_path), progress=False)
    assert result["candidates"] == len(pool.products)
    for task in ("augmented_photo", "augmented_photo_mild"):
        photo = result[task]
        assert photo["queries"] == 30
        for values in photo["rows"].values():
            assert 0.0 <= values["recall@1"] <= values["recall@5"] <= values["recall@10"] <= 1.0
    assert result["augment_mild"]["rotate_deg"] == 0.0 and result["augment_mild"] != result["augment"]
    for task in ("brand_type", "attribute_phrase", "composed"):
        assert result[task]["queries"] > 0
        assert all(0.0 <= v <= 1.0 for row in result[task]["rows"].values() for v in row.values())
    composed = result["composed"]["rows"]  # the composed task has its ceiling row too
    qs = composed_query_set(pool.products[:30], pool)
    assert composed[CEILING_LABEL]["precision@10"] == pytest.approx(
        np.mean(np.minimum(qs.relevant.sum(axis=1)[qs.keys], 10) / 10))
    assert all(r["precision@10"] <= composed[CEILING_LABEL]["precision@10"] + 1e-9 for r in composed.values())
    paired = result["composed"]["fused_vs_average"]  # the m-query task pairs its fused row with the average
    assert set(paired) == {"precision@10", "ndcg@10"}
    for m, c in paired.items():
        assert c["queries"] == len(qs.texts) and c["wins"] + c["losses"] <= c["queries"]
        assert c["mean_a"] == pytest.approx(composed["trained (fused)"][m])
        assert c["mean_b"] == pytest.approx(composed["trained, average of T and V"][m])
        assert c["ci_low"] <= c["diff"] <= c["ci_high"]
    for task in MIN10_TASKS:  # each subset: the rows of its task, a ceiling of 1 (P@10 can reach 1 on every query)
        sub = shopper_query_sets(pool.products[:30], pool)[f"{task}_min10"]
        if sub.texts:
            rows = result[f"{task}_min10"]["rows"]
            assert result[f"{task}_min10"]["queries"] == len(sub.texts) and set(rows) == set(result[task]["rows"])
            assert rows[CEILING_LABEL]["precision@10"] == pytest.approx(1.0)
        else:
            assert f"{task}_min10" not in result
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    rc = cli_main(["eval", "--model", str(tiny_model_dir), "--catalog", str(fashion_dir), "--limit", "200",
                   "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--markdown", str(md), "--quiet",
                   "--robust", "15", "--no-ablation"])
    assert rc == 0
    report = json.loads(out.read_text())["robustness"]
    assert report["augmented_photo"]["queries"] <= 15 and report["candidates"] > report["augmented_photo"]["queries"]
    assert "raw MiniLM: mean-pooled titles, exact" in report["brand_type"]["rows"]
    assert {LEXICAL_LABEL, HYBRID_LABEL} <= set(report["brand_type"]["rows"]) & set(report["attribute_phrase"]["rows"])
    assert "**augmented_photo**" in md.read_text() and "**augmented_photo_mild**" in md.read_text()
    assert "fused - average of views, precision@10:" in md.read_text()


def test_dense_lexical_and_hybrid_rows(catalogue):
    _, pool = catalogue
    qs = text_query_set(pool.products[:60], pool, "brand_type")
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((len(qs.texts), 8)).astype(np.float32)
    items = rng.standard_normal((len(pool.products), 8)).astype(np.float32)
    rows = retrieval_rows(qs.texts, queries, items, lexical_index(pool.products), qs.relevant, qs.keys)
    assert rows[DENSE_LABEL] == pytest.approx(set_metrics(queries, items, qs))  # same ranking, same metric
    # brand + type queries name words of the relevant titles: BM25 beats random vectors, and fusing
    # the random ranking in cannot make it worse than random
    assert rows[LEXICAL_LABEL]["precision@10"] > rows[DENSE_LABEL]["precision@10"]
    assert rows[HYBRID_LABEL]["precision@10"] >= rows[DENSE_LABEL]["precision@10"]
    assert HYBRID_WEIGHTED_LABEL in rows
    counts = qs.relevant.sum(axis=1)[qs.keys]
    ceiling = rows[CEILING_LABEL]  # every relevant candidate first
    assert ceiling["precision@10"] == pytest.approx(np.mean(np.minimum(counts, 10) / 10))
    assert ceiling["ndcg@10"] == pytest.approx(1.0)
    assert all(r["precision@10"] <= ceiling["precision@10"] + 1e-9 for r in rows.values())


def test_the_brand_subset_keeps_the_queries_p_at_10_can_reach_1_on(fashion_dir):
    """On the first 1,000 real products (only their attributes are read: no model)."""
    pool = SimpleNamespace(products=read_catalog(fashion_dir, limit=1000).products)
    brand = text_query_set(pool.products, pool, "brand_type")
    counts = brand.relevant.sum(axis=1)[brand.keys]
    for n in (3, P10_MIN_RELEVANT):
        subset = with_min_relevant(brand, n)
        assert subset.texts == [t for t, c in zip(brand.texts, counts) if c >= n]
        assert subset.relevant is brand.relevant and (brand.relevant.sum(axis=1)[subset.keys] >= n).all()
    subset = with_min_relevant(brand, P10_MIN_RELEVANT)
    assert 0 < len(subset.texts) < len(brand.texts)
    rng = np.random.default_rng(0)
    rows = retrieval_rows(subset.texts, rng.standard_normal((len(subset.texts), 8)).astype(np.float32),
                          rng.standard_normal((len(pool.products), 8)).astype(np.float32),
                          lexical_index(pool.products), subset.relevant, subset.keys)
    assert rows[CEILING_LABEL]["precision@10"] == pytest.approx(1.0)  # P@10 can reach 1 on every query
    table = robustness_markdown({"candidates": len(pool.products), "seed": 0,
                                 "brand_type_min10": {"queries": len(subset.texts), "rows": rows}})
    assert f"**brand_type_min10** ({len(subset.texts)} queries, only those with >= 10 relevant products" in table


def test_every_shopper_task_has_a_subset_p_at_10_can_judge(fashion_dir):
    """The brand, phrase and composed subsets keep exactly their task's queries with >= 10
    relevant candidates, same judgements (first 1,000 real products, attributes only)."""
    pool = SimpleNamespace(products=read_catalog(fashion_dir, limit=1000).products)
    sets = shopper_query_sets(pool.products, pool)
    assert set(sets) == {"brand_type", "attribute_phrase", "composed", *(f"{t}_min10" for t in MIN10_TASKS)}
    assert sets["composed"].texts == composed_query_set(pool.products, pool).texts
    for task in MIN10_TASKS:
        full, sub = sets[task], sets[f"{task}_min10"]
        counts = full.relevant.sum(axis=1)[full.keys]
        assert 0 < len(sub.texts) < len(full.texts), task
        assert sub.texts == [t for t, c in zip(full.texts, counts) if c >= P10_MIN_RELEVANT]
        assert (sub.photos == full.photos[counts >= P10_MIN_RELEVANT]).all() and sub.relevant is full.relevant
