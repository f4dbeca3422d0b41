"""Nine-scenario evaluation (the M-BEER protocol on our data; METHOD.md §4).

Query form ∈ {t: text, i: image, m: text+image} × candidate form ∈ {t, i, m}: t2t, t2i, t2m,
i2t, i2i, i2m, m2t, m2i, m2m. Exact (flat) inner-product search over the whole pool, never
in-batch.

- **Instance level**: every pool product is a query, its own candidate row is the one
  relevant item ("the same product across forms"). Recall@1/5/10 and MRR.
- **Attribute level**: one query per attribute group (gender + baseColour + articleType, all
  three present) with at least two pool products. The query's text is the attribute phrase
  ("women black heels"); its image is the photo of one group member (the representative,
  drawn with a seeded generator), which is left out of that query's ranking. Relevant =
  every other pool product with the same three attributes. nDCG@10 and Precision@10.

Embeddings per form: the model uses its views (t → text-only view T, i → image-only view
V, m → fused view F), query tower for queries, item tower for candidates; the m form can be
replaced by the text-only view (``text``), the image-only view (``image``) or the normalised
average of the two unit vectors (``average``: the trained average-of-views baseline, issue 12
item 5c). ``fused+instance`` is the fused form with photo-only queries (i2t, i2i, i2m) ranked as
the server ranks them, in two stages (``engine.retrieval.instance_first``). Other baselines:
``raw_backbone_rows`` (no training) and ``linear_rows`` (trained linear two-tower). Every embedding is computed
from the backbone token cache.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from engine.catalog import Product
from engine.evaluation.ranking_metrics import (attribute_metrics, attribute_per_query, attribute_per_query_of_top,
                                              instance_metrics, instance_per_query, mean_per_metric, rank_of_targets,
                                              ranks_from_scores, top_k_from_scores)
from engine.retrieval.instance_first import INSTANCE_FIRST, instance_columns, instance_first_scores, without_instance
from engine.training.pairs import DEFAULT_GROUP_FIELDS, attribute_phrase, group_key
from engine.tokens.cache import TokenTable, cache_images, cache_texts
from engine.training.linear_baseline import LINEAR_ROW, linear_embeddings
from engine.tokens.views import TokenBatch, encode_views, iter_chunks, mean_pooled

SCENARIOS: tuple[str, ...] = ("t2t", "t2i", "t2m", "i2t", "i2i", "i2m", "m2t", "m2i", "m2m")
FORM_VIEW = {"t": "T", "i": "V", "m": "F"}
SERVED_FORM = "fused+instance"  # the fused form, photo-only queries in two stages (as served)
INSTANCE_METRICS = ("recall@1", "recall@5", "recall@10", "mrr")
ATTRIBUTE_METRICS = ("ndcg@10", "precision@10")


@dataclass
class EvalPool:
    """The evaluation pool and its attribute queries, resolved to token-table rows.

    products: pool products (each has a title and a usable image). text_rows / image_rows:
    ``int64 (n,)``. groups: ``int64 (n,)`` attribute group (``-1`` none). queries: attribute
    queries as ``(phrase, group id, representative pool index)``; query_text_rows ``int64 (a,)``.
    excluded: ``{product_id: reason}`` for products left out of the pool.
    """

    products: list[Product]
    texts: TokenTable
    images: TokenTable
    text_rows: np.ndarray
    image_rows: np.ndarray
    groups: np.ndarray
    query_phrases: list[str]
    query_groups: np.ndarray
    query_reps: np.ndarray
    query_text_rows: np.ndarray
    excluded: dict[str, str] = field(default_factory=dict)
    cache_seconds: float = 0.0


def build_pool(products: Sequence[Product], backbones, cache_dir: str, seed: int = 0,
               group_fields: Sequence[str] = DEFAULT_GROUP_FIELDS, progress: bool = True) -> EvalPool:
    """Cache the tokens of ``products`` and their attribute phrases; keep the products with both
    a title and a usable image (the others are listed in ``excluded`` with the reason).

    Raises ValueError when fewer than two products are usable.
    """
    start = time.perf_counter()
    phrases_all = [attribute_phrase(p.attributes, group_fields) for p in products]
    texts = cache_texts(backbones, [p.title for p in products if p.title] + [x for x in phrases_all if x],
                        cache_dir, progress=progress)
    images = cache_images(backbones, [p.image for p in products if p.image], cache_dir, progress=progress)
    excluded: dict[str, str] = {}
    keep: list[Product] = []
    for p in products:
        if p.title is None:
            excluded[p.product_id] = "no title"
        elif p.image is None:
            excluded[p.product_id] = p.flag_detail.get("image_missing", "no image")
        elif images.row(p.image) < 0:
            excluded[p.product_id] = images.errors.get(p.image, "image produced no tokens")
        else:
            keep.append(p)
    if len(keep) < 2:
        raise ValueError(f"evaluation pool needs at least 2 products with title and image, got {len(keep)}")
    key_ids: dict[str, int] = {}
    groups = np.array([key_ids.setdefault(k, len(key_ids)) if (k := group_key(p, group_fields)) else -1
                       for p in keep], dtype=np.int64)
    rng = np.random.default_rng(seed)
    phrases, q_groups, reps = [], [], []
    for key, gid in key_ids.items():
        members = np.nonzero(groups == gid)[0]
        if len(members) < 2:
            continue
        rep = int(members[rng.integers(len(members))])
        phrases.append(attribute_phrase(keep[rep].attributes, group_fields))
        q_groups.append(gid)
        reps.append(rep)
    return EvalPool(keep, texts, images, texts.rows([p.title for p in keep]), images.rows([p.image for p in keep]),
                    groups, phrases, np.asarray(q_groups, dtype=np.int64), np.asarray(reps, dtype=np.int64),
                    texts.rows(phrases), excluded, time.perf_counter() - start)


@torch.inference_mode()
def tower_views(tower, texts: TokenTable, images: TokenTable, text_rows: np.ndarray, image_rows: np.ndarray,
                batch_size: int = 256, views: Sequence[str] = ("F", "T", "V")) -> dict[str, np.ndarray]:
    """``{view: float32 (n, d)}`` of ``tower`` over cached rows (eval mode, batched).

    A query tower with a distilled text encoder (``tower.text_student``) does not run the cached
    full-backbone tokens for text alone: its T view, and the F view of the rows without a photo,
    come from ``tower.encode`` on the texts themselves (the table's keys), as served."""
    out: dict[str, list[np.ndarray]] = {v: [] for v in views}
    for chunk in iter_chunks(len(text_rows), batch_size):
        batch = TokenBatch.gather(texts, images, text_rows[chunk], image_rows[chunk])
        emb, _ = encode_views(tower, batch, views)
        for v in views:
            out[v].append(emb[v].float().numpy())
    result = {v: np.concatenate(parts) for v, parts in out.items()}
    if getattr(tower, "text_student", None) is not None and {"T", "F"} & set(views):
        rows = np.flatnonzero(text_rows >= 0)
        solo = tower.encode([texts.keys[r] for r in text_rows[rows]], None, view="text", batch_size=batch_size)
        if "T" in views:
            result["T"][rows] = solo
        if "F" in views:
            alone = image_rows[rows] < 0
            result["F"][rows[alone]] = solo[alone]
    return result


def item_views(model, pool: "EvalPool", views: dict[str, np.ndarray], cache_dir: str | None = None,
               progress: bool = False) -> dict[str, np.ndarray]:
    """The item tower's ``views`` (``tower_views``' dict) of ``pool``'s products with the model's item
    photo views (``engine.model.item_views``, as the indexer builds them) on the F and V vectors of the
    products with a photo; unchanged for a model without them. ``cache_dir``: token cache root of the
    views (default: the pool's image cache root)."""
    if not int(getattr(model.config, "item_photo_views", 0) or 0):
        return views
    from engine.tokens.item_views import apply_item_views

    photos = [p.image if r >= 0 else None for p, r in zip(pool.products, pool.image_rows)]
    root = cache_dir or str(Path(pool.images.folder).parent)
    names = [v for v in ("F", "V") if v in views]
    if not names:
        return views
    # both views in one call: each photo's views are read and pooled once
    refined, _ = apply_item_views(model, np.concatenate([views[v] for v in names]), photos * len(names), root,
                                  progress=progress)
    out = dict(views)
    for i, v in enumerate(names):
        out[v] = refined[i * len(photos):(i + 1) * len(photos)]
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class Embeddings:
    """One model's embeddings of the pool: query side and item side, per view (``float32 (n, d)``),
    plus the attribute queries' text-only (T) and fused (F, phrase + representative photo) vectors."""

    query: dict[str, np.ndarray]
    item: dict[str, np.ndarray]
    attr_query: dict[str, np.ndarray]
    instance: tuple[int, int] | None = None  # the query's image-private columns (``engine.retrieval.instance_first``)


def embed_pool(model, pool: EvalPool, batch_size: int = 256) -> Embeddings:
    """Encode the pool with ``model``'s query and item towers (views F, T, V) from the cache."""
    model.eval()
    q = tower_views(model.query_tower, pool.texts, pool.images, pool.text_rows, pool.image_rows, batch_size)
    i = item_views(model, pool, tower_views(model.item_tower, pool.texts, pool.images, pool.text_rows,
                                            pool.image_rows, batch_size))
    rep_images = pool.image_rows[pool.query_reps]
    a = tower_views(model.query_tower, pool.texts, pool.images, pool.query_text_rows, rep_images, batch_size,
                    views=("F", "T"))
    return Embeddings(q, i, a, instance_columns(model))


def forms(emb: Embeddings, m_form: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Query / candidate / attribute-query vectors per form (t, i, m) for one way of making the m form.

    m_form: ``"fused"`` (the model's F view), ``"text"`` (T), ``"image"`` (V), ``"average"``
    (normalised mean of the T and V unit vectors).
    """
    def m_of(views: dict[str, np.ndarray], t_only: np.ndarray | None = None, v_only: np.ndarray | None = None):
        t = views["T"] if t_only is None else t_only
        v = views["V"] if v_only is None else v_only
        return {"fused": views.get("F"), "text": t, "image": v, "average": _unit(t + v)}[m_form]

    q = {"t": emb.query["T"], "i": emb.query["V"], "m": m_of(emb.query)}
    c = {"t": emb.item["T"], "i": emb.item["V"], "m": m_of(emb.item)}
    # attribute queries: t = phrase (T), i = representative photo (query V of that product),
    # m = phrase + photo (F; the baselines combine the phrase's T with the photo's V)
    return q, c, {"t": emb.attr_query["T"], "m_fused": emb.attr_query["F"]}


PerQuery = dict[str, dict[str, np.ndarray]]  # {scenario: {metric: float64 (n,)}}


def score_per_query(emb: Embeddings, pool: EvalPool, m_form: str) -> PerQuery:
    """All nine scenarios for one embedding set, per query: ``{scenario: {metric: float64 (n,)}}``.

    Instance metrics have one value per pool product, attribute metrics one per attribute query
    (``engine.evaluation.ranking_metrics.instance_per_query`` / ``attribute_per_query``); ``score``
    is their mean, ``engine.evaluation.significance`` pairs them between two rows.
    """
    two_stage = m_form == SERVED_FORM and emb.instance is not None
    q, c, a = forms(emb, "fused" if m_form == SERVED_FORM else m_form)
    n = len(pool.products)
    targets = np.arange(n)
    rep_v = emb.query["V"][pool.query_reps]
    attr_q = {"t": a["t"], "i": rep_v,
              "m": a["m_fused"] if m_form in ("fused", SERVED_FORM) else
              {"text": a["t"], "image": rep_v, "average": _unit(a["t"] + rep_v)}[m_form]}
    out: PerQuery = {}
    for s in SCENARIOS:
        qf, cf = s[0], s[2]
        if two_stage and qf == "i":
            out[s] = instance_first_per_query(q[qf], attr_q[qf], c[cf], pool, emb.instance)
            continue
        res = instance_per_query(*rank_of_targets(q[qf], c[cf], targets, with_ties=True))
        if len(pool.query_groups):
            res.update(attribute_per_query(attr_q[qf], c[cf], pool.query_groups, pool.groups,
                                           exclude=pool.query_reps, k=10))
        out[s] = res
    return out


def instance_first_score_matrix(queries: np.ndarray, candidates: np.ndarray, columns: tuple[int, int],
                                n: int = INSTANCE_FIRST) -> np.ndarray:
    """``float64 (q, m)`` scores whose order is the two-stage ranking of ``queries`` ``float32 (q, D)``
    over ``candidates`` ``float32 (m, D)`` (``engine.retrieval.instance_first.instance_first_scores``)."""
    return instance_first_scores(queries @ candidates.T, without_instance(queries, columns) @ candidates.T, n)


def instance_first_ranks(queries: np.ndarray, candidates: np.ndarray, targets: np.ndarray, columns: tuple[int, int],
                         n: int = INSTANCE_FIRST, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """``rank_of_targets(..., with_ties=True)`` under the two-stage ranking: ``(ranks int64 (q,),
    tied int64 (q,))``, in chunks of ``chunk`` queries."""
    parts = [ranks_from_scores(instance_first_score_matrix(queries[i:i + chunk], candidates, columns, n),
                               targets[i:i + chunk]) for i in range(0, len(queries), chunk)]
    return np.concatenate([r for r, _ in parts]), np.concatenate([t for _, t in parts])


def instance_first_per_query(queries: np.ndarray, attr_queries: np.ndarray, candidates: np.ndarray, pool: EvalPool,
                             columns: tuple[int, int], n: int = INSTANCE_FIRST) -> dict[str, np.ndarray]:
    """One photo-query scenario ranked in two stages (``engine.retrieval.instance_first``: the ``n``
    best by the whole vector, then the ranking without the image-private block), exact: the metrics
    ``score_per_query`` gives a scenario.

    queries ``float32 (n_pool, D)`` (row i: pool product i's photo), attr_queries ``float32 (a, D)``
    (the attribute queries' representative photos), candidates ``float32 (n_pool, D)``; ``columns``:
    the image-private block's (``engine.retrieval.instance_first.instance_columns``).
    Returns ``{metric: float64 (queries,)}``.
    """
    out = instance_per_query(*instance_first_ranks(queries, candidates, np.arange(len(queries)), columns, n))
    if len(pool.query_groups):
        top = top_k_from_scores(instance_first_score_matrix(attr_queries, candidates, columns, n), 10, pool.query_reps)
        out.update(attribute_per_query_of_top(top, pool.query_groups, pool.groups, pool.query_reps, k=10))
    return out


def means(per_query: PerQuery) -> dict[str, dict[str, float]]:
    """``{scenario: {metric: mean over its queries}}`` of a ``score_per_query`` result."""
    return {s: mean_per_metric(metrics) for s, metrics in per_query.items()}


def score(emb: Embeddings, pool: EvalPool, m_form: str) -> dict[str, dict[str, float]]:
    """All nine scenarios for one embedding set: ``{scenario: {metric: value}}``."""
    return means(score_per_query(emb, pool, m_form))


def evaluate_models(models: dict[str, object], pool: EvalPool,
                    m_forms: dict[str, tuple[str, str]] | None = None) -> dict:
    """Score named models on the pool.

    models: ``{name: TwoTowerModel}``. m_forms: ``{row label: (model name, m form)}``; by
    default every model with the fused form. Returns ``{"rows": {label: {scenario: {metric:
    value}}}, "per_query": {label: {scenario: {metric: float64 (n,)}}}, "seconds": {...}}``
    (``per_query``: the values behind each mean, for ``engine.evaluation.significance``; not JSON).
    """
    m_forms = m_forms or {name: (name, "fused") for name in models}
    seconds: dict[str, float] = {}
    embs: dict[str, Embeddings] = {}
    for name, model in models.items():
        t = time.perf_counter()
        embs[name] = embed_pool(model, pool)
        seconds[f"embed:{name}"] = time.perf_counter() - t
    per_query: dict[str, PerQuery] = {}
    t = time.perf_counter()
    for label, (name, m_form) in m_forms.items():
        per_query[label] = score_per_query(embs[name], pool, m_form)
    seconds["scoring"] = time.perf_counter() - t
    return {"rows": {label: means(values) for label, values in per_query.items()}, "per_query": per_query,
            "seconds": seconds}


def own_photo_ranks(model, pool: EvalPool, batch_size: int = 256) -> np.ndarray:
    """Rank of each pool product when its own photo is the query (our choice: the product
    promise "a catalogue photo returns its product at rank 1").

    Query = the product's photo alone through the query tower (image-only view V);
    candidates = every pool product's fused item vector (item tower, F). Returns ``int64 (n,)``
    1-based ranks (ties count against the product, ``engine.evaluation.ranking_metrics.rank_of_targets``).
    """
    model.eval()
    absent = np.full(len(pool.image_rows), -1, dtype=np.int64)
    q = tower_views(model.query_tower, pool.texts, pool.images, absent, pool.image_rows, batch_size, views=("V",))
    c = item_views(model, pool, tower_views(model.item_tower, pool.texts, pool.images, pool.text_rows,
                                            pool.image_rows, batch_size, views=("F",)))
    return rank_of_targets(q["V"], c["F"], np.arange(len(pool.products)))


RAW_ROWS = ("raw backbone: text-only (MiniLM mean-pooled)", "raw backbone: image-only (mean of tokens)",
            "raw backbones: concatenation [t; v]")


def raw_backbone_rows(pool: EvalPool) -> dict[str, dict[str, dict[str, float]]]:
    """Baseline rows with no training (issue 12 item 5a/5d; our choice): the pretrained backbones'
    own pooled features, exact search.

    Text = mean-pooled text tokens (sentence-transformers pooling for MiniLM), image = mean of
    the image tokens (global average pooling). Rows: text-only (t2t), image-only (i2i), and the
    naive concatenation ``[t; v] / √2`` (METHOD.md §4) for every scenario with an m side; a
    one-modality side of a concatenation scenario fills the other half with zeros (so t2m ranks
    by the text half). Text and image features share no space: t2i and i2t have no row.
    Returns ``{label: {scenario: {metric: value}}}``, labels ``RAW_ROWS``.
    """
    t, v = mean_pooled(pool.texts, pool.text_rows), mean_pooled(pool.images, pool.image_rows)
    at, av = mean_pooled(pool.texts, pool.query_text_rows), v[pool.query_reps]

    def cat(a: np.ndarray | None, b: np.ndarray | None, n: int) -> np.ndarray:
        a = np.zeros((n, t.shape[1]), np.float32) if a is None else a
        b = np.zeros((n, v.shape[1]), np.float32) if b is None else b
        return np.concatenate([a, b], axis=1) / np.sqrt(2.0)

    n, na = len(pool.products), len(pool.query_reps)
    pad = {"t": (cat(t, None, n), cat(at, None, na)), "i": (cat(None, v, n), cat(None, av, na)),
           "m": (cat(t, v, n), cat(at, av, na))}
    plans = {RAW_ROWS[0]: {"t2t": ((t, at), t)}, RAW_ROWS[1]: {"i2i": ((v, av), v)},
             RAW_ROWS[2]: {s: (pad[s[0]], pad[s[2]][0]) for s in SCENARIOS if "m" in (s[0], s[2])}}
    targets = np.arange(n)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for label, plan in plans.items():
        out[label] = {}
        for s, ((query, attr), cand) in plan.items():
            res = instance_metrics(*rank_of_targets(query, cand, targets, with_ties=True))
            if len(pool.query_groups):
                res.update(attribute_metrics(attr, cand, pool.query_groups, pool.groups, exclude=pool.query_reps, k=10))
            out[label][s] = res
    return out


CROSS_ROW = "baseline: closed-form CCA of the raw features (the cross-modal block alone)"


def cross_block_rows(model, pool: EvalPool) -> dict[str, dict[str, dict[str, float]]]:
    """The t2i and i2t scenarios ranked by the canonical variates of ``model``'s cross-modal block
    alone (``engine.model.cross_block``; our choice): what the closed-form fit does without the
    trained towers, beside the model that adds it to them. Text = the full text backbone's tokens,
    photo = the image backbone's. ``{CROSS_ROW: {"t2i": {...}, "i2t": {...}}}``, or ``{}`` when the
    model has no such block."""
    from engine.training.cross_fit import text_features
    from engine.training.whitening import pooled_means

    block = model.query_tower.fusion.cross_modal
    if block is None:
        return {}
    with torch.no_grad():
        c_t, a_t = (block.text_variates(torch.from_numpy(text_features(pool.texts, rows))).numpy()
                    for rows in (pool.text_rows, pool.query_text_rows))
        c_v = block.image_variates(torch.from_numpy(pooled_means(pool.images, pool.image_rows, gem_p=block.gem_p))).numpy()
    targets = np.arange(len(pool.products))
    out: dict[str, dict[str, float]] = {}
    for s, (query, attr, cand) in {"t2i": (c_t, a_t, c_v), "i2t": (c_v, c_v[pool.query_reps], c_t)}.items():
        res = instance_metrics(*rank_of_targets(query, cand, targets, with_ties=True))
        if len(pool.query_groups):
            res.update(attribute_metrics(attr, cand, pool.query_groups, pool.groups, exclude=pool.query_reps, k=10))
        out[s] = res
    return {CROSS_ROW: out}


def markdown_tables(rows: dict[str, dict[str, dict[str, float]]]) -> str:
    """One markdown table per metric: rows = models, columns = the nine scenarios (values in %)."""
    parts = []
    for title, metrics in (("Instance level", INSTANCE_METRICS), ("Attribute level", ATTRIBUTE_METRICS)):
        for metric in metrics:
            if not any(metric in r.get(s, {}) for r in rows.values() for s in SCENARIOS):
                continue
            parts.append(f"**{title}, {metric}** (%)\n")
            parts.append("| model | " + " | ".join(SCENARIOS) + " |")
            parts.append("|---|" + "---:|" * len(SCENARIOS))
            for label, r in rows.items():
                cells = [f"{100 * r[s][metric]:.2f}" if metric in r.get(s, {}) else "–" for s in SCENARIOS]
                parts.append(f"| {label} | " + " | ".join(cells) + " |")
            parts.append("")
    return "\n".join(parts)


def linear_per_query(model, pool: "EvalPool") -> PerQuery:
    """The nine scenarios of ``pool`` for the linear baseline (``engine.training.linear_baseline.LinearTwoTower``),
    per query (``score_per_query``); queries and items share the projections, the m form is
    unit(T + V), the attribute queries' m form is the phrase's T plus the photo's V."""
    emb = linear_embeddings(model, pool.texts, pool.images, pool.text_rows, pool.image_rows)
    attr_t = model.embed_text(mean_pooled(pool.texts, pool.query_text_rows))
    attr_f = attr_t + emb["V"][pool.query_reps]
    attr_f /= np.maximum(np.linalg.norm(attr_f, axis=1, keepdims=True), 1e-12)
    return score_per_query(Embeddings(emb, emb, {"T": attr_t, "F": attr_f}), pool, "fused")


def linear_rows(model, pool: "EvalPool") -> dict[str, dict[str, dict[str, float]]]:
    """``{LINEAR_ROW: {scenario: {metric: value}}}``: the means of ``linear_per_query``."""
    return {LINEAR_ROW: means(linear_per_query(model, pool))}
