"""Training pipeline: catalogue → pairs → token cache → two-stage training → model folder.

``train_model(TrainJob)`` is what ``ecsearch train`` runs: read the catalogue with the one
catalogue reader (``engine.catalog``), keep the ``train`` split, make pairs (METHOD.md §3,
``engine.training.pairs``) plus an optional pairs file, cache the frozen backbones' tokens
(``engine.tokens.cache``), train (``engine.training.trainer``) and write a model folder with
``engine.model.model_folder.save_model``. Everything that could not be used is written to
``<out>/rejects.jsonl`` with its reason; training goes on with the rest.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from engine.catalog import CatalogError, FieldMapping, Product, read_catalog, read_split
from engine.model.model_folder import load_model, save_model
from engine.training.distill import DistillConfig, distill_after_training, resolve_layers
from engine.training.linear_baseline import save_linear_baseline, train_linear_baseline
from engine.tokens.augment_cache import augmented_key, cache_augmented_images
from engine.training.pairs import DEFAULT_GROUP_FIELDS, TrainingPair, catalog_pairs, group_key, read_pairs_file, shopper_pairs
from engine.catalog.shopper_queries import facet_key, product_facets
from engine.tokens.cache import TokenTable, cache_images, cache_texts
from engine.training.whitening import attach_private, init_image_private, init_image_residual, init_text_private
from engine.model.towers import ModelConfig, build_model
from engine.training.trainer import TrainConfig, Trainer, TrainingData


class TrainingDataError(ValueError):
    """Nothing usable to train on (empty catalogue, empty split, every pair rejected)."""


@dataclass
class TrainJob:
    """One training run.

    catalog: catalogue path (fashion folder, JSONL, CSV). out: model folder to write.
    split: keep products of this split (fashion ``split.csv``); None: every product.
    pairs_file: optional JSONL pairs file (query → product id) added to the catalogue pairs.
    catalog_pairs: also make pairs from the catalogue itself (METHOD.md §3).
    limit: read at most this many catalogue rows. cache_dir: token cache root.
    model: ``ModelConfig`` for a fresh model; init_model: start from this model folder instead.
    train: ``TrainConfig``. resume: continue from ``<out>/checkpoint.pt`` when present.
    similar_rate / attribute_query_rate / photo_query_rate / title_query_rate / attribute_photo_rate:
    catalogue pair mix, see ``engine.training.pairs.catalog_pairs``; attribute_photo_text_items: those
    pairs' items by their title alone (default False).
    brand_query_rate / partial_title_rate / phrase_query_rate / composed_rate: shopper and
    composed pairs, see ``engine.training.pairs.shopper_pairs`` (default 0: off).
    augment_views: augmented views cached per query photo (``engine.tokens.augment_cache``; 0: off,
    the default, since each view costs one more image-backbone pass per training photo);
    the trainer swaps query photos for them (``TrainConfig.augment_p``). Seeded by ``train.seed``.
    augment_fraction: share of the distinct query photos that get augmented views (a seeded
    choice; 1.0: all). Cache time and disk scale with it (our choice, to keep the CPU budget).
    linear_baseline: after the towers, train the CLIP-style linear two-tower baseline on the
    same pairs and steps (``engine.training.linear_baseline``; seconds) into the model folder.
    linear_only: train only that baseline into ``out`` (an existing model folder is kept).
    query_text_layers / distill: the query tower's distilled text encoder for text-only queries, made
    after the blocks (``engine.training.distill.distill_after_training``; None: none).
    image_residual_init: ``"random"`` or ``"whitening"``: before training, fit the image residual of
    both towers in closed form from the augmented views (``engine.training.whitening``; needs
    ``augment_views > 0``, a fresh model with a pooled residual and at least ``dim`` augmented
    photos); ``"auto"``: whitening where those hold, else random (the reason is in the summary). freeze_image_residual: keep
    that projection fixed during training. image_residual_gain: with the whitening, the starting
    value of the image residual's learned gain.
    image_private_auto: a fresh model whose ``model.image_private_dim`` is set trains without the
    image-private block and gets it after the last step, fitted from the augmented views
    (``engine.training.whitening``); with this flag, too few augmented photos (fewer than
    ``image_private_dim - 1``) save the model without the block (the reason is in the summary)
    instead of raising TrainingDataError before training.
    text_private_auto: the same for ``model.text_private_dim``, the text-private block fitted on the
    text-only pairs whose query differs from the item's title (typed shopper queries, a pairs
    file's queries) against those titles; too few such pairs (fewer than ``text_private_dim - 1``).
    cross_auto: the same for ``model.cross_dim``, the cross-modal block (``engine.model.cross_block``)
    fitted after the private blocks on the training products' (title, photo) and (attribute phrase,
    photo) pairs (``engine.training.cross_fit``); too few pairs (``k`` or fewer) or a backbone
    narrower than ``k`` save the model without it.
    """

    catalog: str
    out: str
    split: str | None = "train"
    pairs_file: str | None = None
    catalog_pairs: bool = True
    limit: int | None = None
    cache_dir: str = "var/cache"
    mapping: FieldMapping | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    init_model: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    resume: bool = False
    similar_rate: float = 0.35
    attribute_query_rate: float = 0.35
    photo_query_rate: float = 0.0
    title_query_rate: float = 0.0
    attribute_photo_rate: float = 0.0
    attribute_photo_text_items: bool = False
    brand_query_rate: float = 0.0
    partial_title_rate: float = 0.0
    phrase_query_rate: float = 0.0
    composed_rate: float = 0.0
    augment_views: int = 0
    augment_fraction: float = 1.0
    image_residual_init: str = "random"
    freeze_image_residual: bool = False
    image_residual_gain: float = 1.0
    image_private_auto: bool = False
    text_private_auto: bool = False
    cross_auto: bool = False
    linear_baseline: bool = True
    linear_only: bool = False
    query_text_layers: str | list | None = None
    distill: DistillConfig = field(default_factory=DistillConfig)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.image_residual_init not in ("random", "whitening", "auto"):
            raise ValueError(f"image_residual_init must be 'random', 'whitening' or 'auto', got "
                             f"{self.image_residual_init!r}")
        if self.image_residual_init == "whitening" and self.augment_views < 1:
            raise ValueError("image_residual_init='whitening' needs augmented views (augment_views >= 1)")
        if not 0.0 < self.augment_fraction <= 1.0:
            raise ValueError(f"augment_fraction must lie in (0, 1], got {self.augment_fraction}")


def load_products(catalog: str, split: str | None, limit: int | None = None,
                  mapping: FieldMapping | None = None) -> tuple[list[Product], list[dict]]:
    """Products of ``split`` (``None``: all) and the catalogue's reject records (JSON dicts).

    The split comes from the fashion layout's ``split.csv``; a catalogue without one has no
    split, and asking for one is an error. Raises CatalogError, TrainingDataError (no product).
    """
    result = read_catalog(catalog, mapping, limit)
    rejects = [{"source": "catalog", **r.to_dict()} for r in result.rejects]
    products = result.products
    if split is not None:
        if result.layout != "fashion":
            raise CatalogError(f"{catalog}: only the fashion layout has a split.csv; pass split=None (--split all)")
        splits = read_split(catalog)
        products = [p for p in products if splits.get(p.product_id) == split]
    for p in products:
        for flag in p.flags:
            rejects.append({"source": "catalog", "row": p.row, "product_id": p.product_id,
                            "reason": p.flag_detail.get(flag, flag), "kept": "text-only"})
    if not products:
        where = f" in split {split!r}" if split is not None else ""
        raise TrainingDataError(f"{catalog}: no usable product{where} ({result.read_count} rows read, "
                                f"{len(result.rejects)} rejected)")
    return products, rejects


def augment_subset(paths: list[str], fraction: float, seed: int) -> list[str]:
    """The distinct ``paths`` (first-seen order) that get augmented views: all when ``fraction``
    is 1, else a seeded ``round(fraction * n)`` of them (at least one when any). Deterministic."""
    unique = list(dict.fromkeys(paths))
    if fraction >= 1.0 or not unique:
        return unique
    keep = max(1, round(fraction * len(unique)))
    chosen = np.random.default_rng([seed, 11]).choice(len(unique), size=keep, replace=False)
    return [unique[i] for i in sorted(chosen)]


def build_training_data(products: list[Product], pairs: list[TrainingPair], texts: TokenTable,
                        images: TokenTable, group_fields=DEFAULT_GROUP_FIELDS,
                        aug_images: TokenTable | None = None) -> tuple[TrainingData, list[dict]]:
    """Resolve pairs to token-table rows. Pairs whose item or query has no usable modality left
    (e.g. its only image failed to decode) are rejected with the reason; a product whose image
    failed keeps its text. ``aug_images``: augmented query photos (``engine.tokens.augment_cache``),
    whose views are attached to every pair with a query photo."""
    index = {p.product_id: i for i, p in enumerate(products)}
    groups: dict[str, int] = {}
    product_group = np.array([groups.setdefault(k, len(groups)) if (k := group_key(p, group_fields)) else -1
                              for p in products], dtype=np.int64)
    p_text = texts.rows([p.title for p in products])
    p_image = images.rows([p.image for p in products])
    rejects: list[dict] = []
    for key, reason in images.errors.items():
        rejects.append({"source": "image", "image": key, "reason": reason,
                        "kept": "text-only where the sample has text"})
    cols: dict[str, list[int]] = {k: [] for k in ("q_text", "q_image", "item_text", "item_image", "item",
                                                  "query_product", "item_group", "query_group")}
    kinds: list[str] = []
    kept: list[TrainingPair] = []
    for pair in pairs:
        i = index[pair.item_id]
        qt = texts.row(pair.query_text) if pair.query_text is not None else -1
        qi = images.row(pair.query_image) if pair.query_image is not None else -1
        if qt < 0 and qi < 0:
            rejects.append({"source": "pairs", "kind": pair.kind, "product_id": pair.item_id,
                            "reason": "query has no usable text or image", "query_text": pair.query_text,
                            "query_image": pair.query_image})
            continue
        if p_text[i] < 0 and p_image[i] < 0:
            rejects.append({"source": "pairs", "kind": pair.kind, "product_id": pair.item_id,
                            "reason": "item product has no usable text or image"})
            continue
        qp = index.get(pair.query_product_id, -1) if pair.query_product_id is not None else -1
        item_image = -1 if pair.item_text_only and p_text[i] >= 0 else p_image[i]
        for name, value in (("q_text", qt), ("q_image", qi), ("item_text", p_text[i]), ("item_image", item_image),
                            ("item", i), ("query_product", qp), ("item_group", product_group[i]),
                            ("query_group", product_group[i] if pair.group is not None and pair.fields is None else -1)):
            cols[name].append(int(value))
        kinds.append(pair.kind)
        kept.append(pair)
    if len(kinds) < 2:
        raise TrainingDataError(f"fewer than 2 usable training pairs ({len(kinds)} of {len(pairs)})")
    arrays = {k: np.asarray(v, dtype=np.int64) for k, v in cols.items()}
    extra = _relevance(products, kept)
    if aug_images is not None:
        views = int(aug_images.meta.get("views", 1))
        extra["aug_images"] = aug_images
        extra["q_image_aug"] = np.array([[aug_images.row(augmented_key(q.query_image, v)) if q.query_image else -1
                                          for v in range(views)] for q in kept], dtype=np.int64).reshape(len(kept), views)
    return TrainingData(texts, images, kinds=np.asarray(kinds), **arrays, **extra), rejects


def _relevance(products: list[Product], pairs: list[TrainingPair]) -> dict:
    """``TrainingData`` relevance arrays of the pairs that name their facet ``fields`` (empty when none)."""
    specs = list(dict.fromkeys(p.fields for p in pairs if p.fields is not None and p.group is not None))
    if not specs:
        return {}
    facets = [product_facets(p.attributes, p.title) for p in products]
    ids: list[dict[str, int]] = [{} for _ in specs]
    keys = np.full((len(specs), len(products)), -1, dtype=np.int64)
    for s, fields in enumerate(specs):
        for n, f in enumerate(facets):
            k = facet_key(f, fields)
            if k is not None:
                keys[s, n] = ids[s].setdefault(k, len(ids[s]))
    spec_of = {fields: s for s, fields in enumerate(specs)}
    query_spec = np.array([spec_of.get(p.fields, -1) if p.group is not None else -1 for p in pairs], dtype=np.int64)
    query_key = np.array([ids[q].get(p.group, -2) if q >= 0 else -1 for p, q in zip(pairs, query_spec)],
                         dtype=np.int64)  # -2: a key no product has (never matches)
    return {"relevance_keys": keys, "query_spec": query_spec, "query_key": query_key}


def job_pairs(job: TrainJob, products: list) -> tuple[list[TrainingPair], list[dict]]:
    """The training pairs ``job`` draws over ``products`` (catalogue, shopper and pairs-file pairs,
    seeded by ``job.train.seed``) and the pairs file's reject records. Raises TrainingDataError when
    there is no pair."""
    pairs: list[TrainingPair] = []
    rejects: list[dict] = []
    if job.catalog_pairs:
        pairs += catalog_pairs(products, job.train.seed, similar_rate=job.similar_rate,
                               attribute_query_rate=job.attribute_query_rate,
                               photo_query_rate=job.photo_query_rate, title_query_rate=job.title_query_rate,
                               attribute_photo_rate=job.attribute_photo_rate,
                               attribute_photo_text_items=job.attribute_photo_text_items)
    shopper = dict(brand_query_rate=job.brand_query_rate, partial_title_rate=job.partial_title_rate,
                   phrase_query_rate=job.phrase_query_rate, composed_rate=job.composed_rate)
    if job.catalog_pairs and any(shopper.values()):
        pairs += shopper_pairs(products, job.train.seed, **shopper)
    if job.pairs_file:
        file_pairs, pair_rejects = read_pairs_file(job.pairs_file, {p.product_id for p in products})
        pairs += file_pairs
        rejects += [{"source": "pairs_file", **r.to_dict()} for r in pair_rejects]
    if not pairs:
        raise TrainingDataError("no training pairs: catalogue pairs are off and the pairs file gave none")
    return pairs, rejects


def train_model(job: TrainJob) -> dict:
    """Run one training job end to end; returns the summary also stored in the model folder.

    Raises CatalogError / TrainingDataError / FileNotFoundError on unusable input.
    """
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    products, rejects = load_products(job.catalog, job.split, job.limit, job.mapping)
    pairs, pair_rejects = job_pairs(job, products)
    rejects += pair_rejects

    # the private blocks are fitted after training (_plan_private): the towers train without them
    model = load_model(job.init_model) if job.init_model else build_model(
        replace(job.model, image_private_dim=0, text_private_dim=0, cross_dim=0), seed=job.train.seed)
    t_cache = time.perf_counter()
    all_texts = [p.title for p in products if p.title] + [q.query_text for q in pairs if q.query_text]
    all_images = [p.image for p in products if p.image] + [q.query_image for q in pairs if q.query_image]
    texts = cache_texts(model.backbones, all_texts, job.cache_dir, progress=job.progress)
    images = cache_images(model.backbones, all_images, job.cache_dir, progress=job.progress)
    augmented = None
    if job.augment_views > 0:
        augmented = cache_augmented_images(model.backbones, augment_subset([q.query_image for q in pairs if q.query_image],
                                                                           job.augment_fraction, job.train.seed),
                                           job.cache_dir, views=job.augment_views, seed=job.train.seed,
                                           progress=job.progress)
    item_views = None
    if job.model.item_photo_views > 0 and job.model.image_private_dim > 0:
        # made here, where the training views' rows are reused, so the index build finds them cached
        item_views = cache_augmented_images(model.backbones, [p.image for p in products if p.image], job.cache_dir,
                                            views=job.model.item_photo_views, seed=job.model.item_photo_views_seed,
                                            progress=job.progress)
    cache_seconds = time.perf_counter() - t_cache

    data, data_rejects = build_training_data(products, pairs, texts, images, aug_images=augmented)
    rejects += data_rejects
    if job.linear_only:
        return {"products": len(products), "pairs": len(data), "rejects": len(rejects), "cache_seconds": cache_seconds,
                "linear_baseline": _train_linear(data, job, out, model.config.dim), "total_seconds": time.perf_counter() - t_start}
    _write_jsonl(out / "rejects.jsonl", rejects)
    private_init = _plan_private(job, model, augmented)
    text_private_init = _plan_text_private(job, model, pairs, products)
    cross_init = _plan_cross(job, model, products, images)
    resolve_layers(job.query_text_layers, model.backbones.text.model)  # bad layers fail before training
    residual_init = _init_residual(job, model, images, augmented)
    trainer = Trainer(model, data, job.train, out, progress=job.progress)
    if job.resume and (out / "checkpoint.pt").is_file():
        trainer.load_checkpoint()
    result = trainer.run()
    kinds, counts = np.unique(data.kinds, return_counts=True)
    summary = {
        "catalog": str(job.catalog), "split": job.split, "products": len(products),
        "pairs": len(data), "pairs_by_kind": {str(k): int(c) for k, c in zip(kinds, counts)},
        "rejects": len(rejects), "cache_seconds": cache_seconds,
        "text_cache": {"folder": str(texts.folder), "build_seconds": texts.meta.get("build_seconds"),
                       "items": len(texts.keys)},
        "image_cache": {"folder": str(images.folder), "build_seconds": images.meta.get("build_seconds"),
                        "items": len(images.keys), "errors": len(images.errors)},
        "item_photo_views_cache": None if item_views is None else {
            "folder": str(item_views.folder), "views": item_views.meta.get("views"),
            "reused": item_views.meta.get("reused"), "build_seconds": item_views.meta.get("build_seconds")},
        "augmented_image_cache": None if augmented is None else {
            "folder": str(augmented.folder), "views": augmented.meta.get("views"),
            "build_seconds": augmented.meta.get("build_seconds"), "items": len(augmented.keys),
            "bytes": int((Path(augmented.folder) / "tokens.npy").stat().st_size)},
        "image_residual_init": residual_init, "image_private_block": private_init,
        "text_private_block": None if text_private_init is None else
        {k: v for k, v in text_private_init.items() if k not in ("queries", "titles")},
        "train": job.train.to_dict(), **{k: v for k, v in result.items() if k != "final"},
        "final_step": result["final"], "total_seconds": time.perf_counter() - t_start,
    }
    if result["steps"] >= job.train.steps:  # a finished run publishes the model folder
        image_block, text_block = bool(private_init and private_init.get("photos")), bool(
            text_private_init and text_private_init.get("queries"))
        cross_block = bool(cross_init and cross_init.get("titles"))
        if image_block or text_block or cross_block:
            model = attach_private(model, replace(job.model, image_private_dim=job.model.image_private_dim * image_block,
                                                  text_private_dim=job.model.text_private_dim * text_block,
                                                  cross_dim=job.model.cross_dim * cross_block))
        if image_block:
            summary["image_private_block"] = {**init_image_private(model, images, augmented, private_init["photos"],
                                                                   job.augment_views), "fitted": "after training"}
        if text_block:
            summary["text_private_block"] = {**init_text_private(model, texts, text_private_init["queries"],
                                                                 text_private_init["titles"]), "fitted": "after training"}
        summary["cross_block"] = cross_init if not cross_block else {
            **_fit_cross(model, cross_init, texts, images, job), "fitted": "after training"}
        model, summary["query_text_student"] = distill_after_training(model, job.query_text_layers, products, pairs,
                                                                      job.distill, job.progress)
        summary["total_seconds"] = time.perf_counter() - t_start  # the blocks and the distillation included
        summary["fingerprint"] = save_model(model, out, extra={"training": _jsonable(summary)})
        if job.linear_baseline:
            summary["linear_baseline"] = _train_linear(data, job, out, model.config.dim)
    (out / "training.json").write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
    return summary


def _init_residual(job: TrainJob, model, images: TokenTable, augmented: TokenTable | None) -> dict | None:
    """``job.image_residual_init`` applied to the fresh ``model``; returns what was done (or why not, for auto)."""
    if job.image_residual_init == "random" or job.init_model:
        return None
    photos = _augmented_photos(augmented) if augmented is not None else []
    fusion = model.item_tower.fusion
    why = ("the model has no pooled residual" if not getattr(fusion, "pooled_residual", False) else
           f"{len(photos)} augmented photos, fewer than the {model.config.dim} dimensions to fit"
           if len(photos) < model.config.dim else None)
    if why is not None and job.image_residual_init == "auto":
        return {"init": "random", "reason": why}
    if why is not None:
        raise TrainingDataError(f"image_residual_init='whitening': {why}")
    return {"init": "whitening", **init_image_residual(model, images, augmented, photos, job.augment_views,
                                                      freeze=job.freeze_image_residual, gain=job.image_residual_gain)}


def _plan_private(job: TrainJob, model, augmented: TokenTable | None) -> dict | None:
    """Whether the image-private block of ``job.model`` can be fitted after training:
    ``{"dim": p, "photos": [...]}``, ``{"dim": 0, "reason": ...}`` when auto falls back
    (``TrainJob.image_private_auto``), or None (no block asked for, or an ``init_model`` run).
    Raises TrainingDataError when it cannot and auto is off."""
    dim = job.model.image_private_dim
    if job.init_model or not dim:
        return None
    photos = _augmented_photos(augmented) if augmented is not None else []
    return _block_plan("image", dim, f"{len(photos)} augmented photos", len(photos),
                       "more photos, more augmented views, or image_private_dim 0", model.backbones.image.hidden_size,
                       job.image_private_auto, {"dim": dim, "photos": photos})


def _plan_text_private(job: TrainJob, model, pairs: list, products: list) -> dict | None:
    """Whether the text-private block of ``job.model`` can be fitted after training:
    ``{"dim": q, "queries": [...], "titles": [...]}`` (text-only pairs whose query differs from the
    item's title), ``{"dim": 0, "reason": ...}`` when auto falls back (``TrainJob.text_private_auto``),
    or None (no block asked for, or an ``init_model`` run). Raises TrainingDataError when it cannot
    and auto is off."""
    dim = job.model.text_private_dim
    if job.init_model or not dim:
        return None
    titles = {p.product_id: p.title for p in products if p.title}
    chosen = [(q.query_text, titles[q.item_id]) for q in pairs
              if q.query_text and not q.query_image and titles.get(q.item_id) not in (None, q.query_text)]
    return _block_plan("text", dim, f"{len(chosen)} typed text queries", len(chosen),
                       "shopper query rates > 0, a pairs file, or text_private_dim 0", model.backbones.text.hidden_size,
                       job.text_private_auto, {"dim": dim, "queries": [q for q, _ in chosen],
                                               "titles": [t for _, t in chosen]})


def _plan_cross(job: TrainJob, model, products: list, images: TokenTable) -> dict | None:
    """Whether the cross-modal block of ``job.model`` can be fitted after training:
    ``{"dim": c, "titles": [(title, photo)], "phrases": [(phrase, photo)]}`` (products whose photo
    has tokens), ``{"dim": 0, "reason": ...}`` when auto falls back (``TrainJob.cross_auto``), or None
    (no block asked for, or an ``init_model`` run). Raises TrainingDataError when it cannot and
    auto is off."""
    from engine.training.cross_fit import product_pairs

    dim = job.model.cross_dim
    if job.init_model or not dim:
        return None
    titles, phrases = product_pairs([p for p in products if p.image and images.row(p.image) >= 0])
    k = dim // 2 - 1
    narrow = min(model.backbones.text.hidden_size, model.backbones.image.hidden_size)
    why = (f"{len(titles) + len(phrases)} (text, photo) pairs, not more than the {k} canonical directions of the "
           "cross-modal block (more products with a title and a photo, or cross_dim 0)"
           if len(titles) + len(phrases) <= k else
           f"a backbone has {narrow} features, fewer than the {k} canonical directions of the cross-modal block"
           if narrow < k else None)
    if why is None:
        return {"dim": dim, "titles": titles, "phrases": phrases}
    if not job.cross_auto:
        raise TrainingDataError(f"cross_dim={dim}: {why}")
    return {"dim": 0, "reason": why}


def _fit_cross(model, plan: dict, texts: TokenTable, images: TokenTable, job: TrainJob) -> dict:
    """``engine.training.cross_fit.init_cross_block`` on the planned pairs; the phrases get a token
    table of their own (the training cache's key stays that of its texts)."""
    from engine.training.cross_fit import init_cross_block

    segments = [(texts, [t for t, _ in plan["titles"]], images, [v for _, v in plan["titles"]])]
    if plan["phrases"]:
        phrase_table = cache_texts(model.backbones, [t for t, _ in plan["phrases"]], job.cache_dir,
                                   progress=job.progress)
        segments.append((phrase_table, [t for t, _ in plan["phrases"]], images, [v for _, v in plan["phrases"]]))
    return init_cross_block(model, segments)


def _block_plan(modality: str, dim: int, samples: str, n: int, remedy: str, hidden: int, auto: bool,
                plan: dict) -> dict:
    """``plan`` when ``n`` samples and a ``hidden``-wide backbone can fit a ``dim``-wide private
    block (``dim - 1`` fitted dimensions), else ``{"dim": 0, "reason": ...}`` with ``auto``, else
    TrainingDataError naming the shortfall and the ``remedy``."""
    why = (f"{samples}, fewer than the {dim - 1} dimensions of the {modality}-private block to fit ({remedy})"
           if n < dim - 1 else
           f"the {modality} backbone has {hidden} features, fewer than the {dim - 1} dimensions of the "
           f"{modality}-private block" if hidden < dim - 1 else None)
    if why is None:
        return plan
    if not auto:
        raise TrainingDataError(f"{modality}_private_dim={dim}: {why}")
    return {"dim": 0, "reason": why}


def _augmented_photos(augmented: TokenTable) -> list[str]:
    """The photo paths of an augmented cache, in key order (keys are ``augmented_key(path, v)``)."""
    return sorted({k.rsplit("#aug", 1)[0] for k in augmented.keys})


def _train_linear(data: TrainingData, job: TrainJob, out: Path, dim: int) -> dict:
    linear, info = train_linear_baseline(data, job.train, dim=dim)
    save_linear_baseline(linear, out, info)
    return info


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)))


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
