"""``ecsearch train``: train the query and item towers on a catalogue, write a model folder.

Example (the full run on the fashion catalogue's train split)::

    ecsearch train --catalog ../shared/data/fashion-products --out var/model --cache-dir var/cache
"""
from __future__ import annotations

import argparse
import json
import sys

from engine.catalog import CatalogError
from engine.model.backbones import DEFAULT_IMAGE_BACKBONE
from engine.model.errors import ModelFolderError
from engine.training.losses import LOSS_NAMES, STAGE1_LOSS_NAMES, LossConfig
from engine.model.towers import ModelConfig
from engine.training.job import TrainingDataError, TrainJob, train_model
from engine.training.distill import DistillConfig
from engine.training.trainer import TrainConfig

# The CPU recipe measured in docs/results.md (our choice: a fusion encoder slimmed to one
# layer of each kind so cache + training fit 30 minutes on 2 CPU cores, plus the pooled residual
# that keeps the raw backbones' robustness in every view, engine/model/fusion.py).
CPU_MODEL = dict(dim=256, heads=8, cross_layers=1, self_layers=1, fusion_layers=1, mlp_ratio=2.0, dropout=0.0)
CPU_POOLED_RESIDUAL = True
# One fusion encoder for both towers (METHOD.md §1.5's switch; our choice since this session,
# docs/results.md "One fusion encoder for both towers"): the query and item sides of every CMAL
# pair then train the same text and image paths, as a CLIP-style two-tower shares its
# projections. Same recipe otherwise (CMAL weights 1,1,2,3,2): t2i / i2t Recall@10 47.90 / 41.25 ->
# 50.75 / 49.35, m2t Recall@1 85.70 -> 86.75 (= the average of views), m2i 96.40 -> 98.65; the
# private blocks stay per tower (their gains differ). --separate-fusion: one encoder per tower.
CPU_SHARE_FUSION = True
# --flip-average (off by default; our choice, docs/results.md "Mirror-averaged photo features"):
# the image backbone averages each photo's feature map with its mirrored photo's: augmented-photo
# R@1 +1.55 points, but every photo runs the backbone twice, which doubles the latency of photo
# queries (AVX2 image@1 p50 over issue 11's 30 ms) and adds 4.7 minutes to the first AVX2 demo.
FLIP_IMAGE_BACKBONE = {**DEFAULT_IMAGE_BACKBONE, "flip_average": True}
# The image-private block (engine/model/private_block.py, issue 12), fitted after training: 256
# wide (255 whitened photo dimensions + e_null; with the text-private block the served vectors
# are 640 wide); gains query photo-only 6 (3 before the GeM pooling; mean at 3 -> GeM at 6:
# augmented-photo R@1 86.70 -> 87.60 %), query photo + text 0 (at 1 a photo + "in red" returns the photo's own product
# first: composed P@10 42 -> 22), item 1 (our choice, docs/results.md "Image-private block" and
# "Mirror-averaged photo features"). The block whitens the GeM (p = 2) of the photo tokens rather
# than their mean (our choice, same section).
CPU_IMAGE_PRIVATE_DIM = 256
CPU_IMAGE_PRIVATE_GAINS = (6.0, 0.0, 1.0)
CPU_IMAGE_PRIVATE_GEM_P = 2.0
# augmented views of each catalogue photo that the item tower's image-private part reads where an index or
# an evaluation builds item vectors (engine/model/item_views.py; docs/results.md "Item photo views")
CPU_ITEM_PHOTO_VIEWS = 3
# The text-private block (same module), fitted after training on the typed shopper queries
# against their titles: 128 wide (127 whitened MiniLM dimensions + e_null); gains query text-only
# 0.8, query photo + text 0.4, item 0.5 (our choice: the products a * b = 0.4 / 0.2 set every
# exact ranking, brand + type P@10 53.7 -> 64.2 with attribute phrases within half a point; the
# small item gain keeps the item vectors' energy on F and the photo block, which photo queries'
# IVF-PQ search needs; docs/results.md "The text-private block").
CPU_TEXT_PRIVATE_DIM = 128
CPU_TEXT_PRIVATE_GAINS = (0.8, 0.4, 0.5)
# The CPU training recipe (our choice, measured in docs/results.md): no dropout (a few hundred
# steps under-fit, they do not over-fit), fp32 on every CPU (bf16 autocast steps slower, even on
# AMX), photo-only / title-only query pairs, CMAL weights (Tq, Vi) 6, (Vq, Ti) 6, (Tq, Fi) 2,
# (Vq, Fi) 3, (Fq, Fi) 2 (the two unimodal cross pairs at 1 before the shared fusion encoder; at 6
# with it, t2i / i2t Recall@10 50.75 / 49.35 -> 59.00 / 57.50, above the linear two-tower, for
# m2i Recall@1 98.65 -> 97.40, docs/results.md "One fusion encoder for both towers"), shopper-typed and
# composed pairs (issue 12), one augmented view for every training photo (9,882 views, 1.24 GB
# of cache, 94 s to build on AMX; a quarter of them gave augmented-photo R@1 84.50 against 86.70,
# docs/results.md "Augmented views for every training photo"), the image residual started from the
# learned whitening of those views
# (engine/training/whitening.py), 384 steps (the fp32 AVX2 budget).
# The cross-modal block (engine/model/cross_block.py, issue 12), fitted after the private blocks by
# canonical correlation analysis of the raw text and photo features over the training products'
# (title, photo) and (attribute phrase, photo) pairs: 256 wide (two slots of 127 canonical
# variates and a null axis; served vectors 896 wide); gains query text-only 0.6, photo-only 0.3, photo +
# text 0.42, item 1. Items with both modalities carry e_null only, so every ranking over them (the
# catalogue as indexed) is unchanged; text -> photo-only items t2i Recall@1 14.70 -> 25.80 %, photo ->
# title-only items i2t 14.10 -> 20.65 (our choice, docs/results.md "The cross-modal block").
CPU_CROSS_DIM = 256
CPU_CROSS_GAINS = (0.6, 0.3, 0.42, 1.0)
CPU_RECIPE = dict(steps=384, stage1_steps=72, photo_query_rate=0.5, title_query_rate=0.25,
                  cmal_pair_weights="6,6,2,3,2", brand_query_rate=0.25, partial_title_rate=0.15,
                  phrase_query_rate=0.25, composed_rate=0.25, augment_views=1, augment_fraction=1.0,
                  augment_p=0.8, attribute_photo_rate=0.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``train`` options."""
    parser.add_argument("--catalog", required=True, help="catalogue: fashion folder, JSONL or CSV file")
    parser.add_argument("--out", required=True, help="model folder to write (config.json + model.safetensors)")
    parser.add_argument("--split", default="train",
                        help="keep products of this split (fashion split.csv); 'all' for every product")
    parser.add_argument("--pairs", default=None, help="JSONL pairs file: query_text / query_image -> product_id")
    parser.add_argument("--no-catalog-pairs", action="store_true", help="train on the pairs file only")
    parser.add_argument("--limit", type=int, default=None, help="read at most N catalogue rows")
    parser.add_argument("--cache-dir", default="var/cache", help="backbone token cache root")
    parser.add_argument("--init-model", default=None, help="start from this model folder instead of a fresh model")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    m = parser.add_argument_group("model (fresh models only)")
    for name, default in CPU_MODEL.items():
        m.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    m.add_argument("--no-pooled-residual", action="store_true",
                   help="no linear residual of the raw mean-pooled backbone tokens in the output (engine/model/fusion.py)")
    m.add_argument("--deep-gain", type=float, default=None,
                   help="initial value of a learned scalar on the deep path of the output (engine/model/fusion.py; default: none)")
    m.add_argument("--solo-gains", default=None,
                   help="TEXT,IMAGE: initial residual gains of one-modality rows, learned apart (default: shared with fused rows)")
    share = m.add_mutually_exclusive_group()
    share.add_argument("--share-fusion", dest="share_fusion", action="store_true", default=CPU_SHARE_FUSION,
                       help="query and item towers share one trained fusion encoder (the default)")
    share.add_argument("--separate-fusion", dest="share_fusion", action="store_false",
                       help="one fusion encoder per tower (the recipe before shared fusion)")
    m.add_argument("--flip-average", action="store_true",
                   help="image backbone tokens averaged with the mirrored photo's (engine/model/backbones/efficientnet.py): "
                        "photo queries more robust, every photo through the backbone twice (default: off)")
    for modality, width, gains, source, own in (
            ("image", CPU_IMAGE_PRIVATE_DIM, CPU_IMAGE_PRIVATE_GAINS, "augmented views", "QUERY_PHOTO"),
            ("text", CPU_TEXT_PRIVATE_DIM, CPU_TEXT_PRIVATE_GAINS, "typed shopper queries", "QUERY_TEXT")):
        m.add_argument(f"--{modality}-private-dim", default="auto",
                       help=f"width of the {modality}-private block appended to both towers' vectors "
                            f"(engine/model/private_block.py), fitted from the {source} after training; 0: none; "
                            f"auto (default): {width} when there are enough {source}, else none")
        m.add_argument(f"--{modality}-private-gains", default=",".join(f"{g:g}" for g in gains),
                       help=f"{own},QUERY_PHOTO_TEXT,ITEM: the {modality}-private block's fixed gains (default %(default)s)")
    m.add_argument("--cross-modal-dim", default="auto",
                   help="width 2k + 2 of the cross-modal block appended to both towers' vectors "
                        "(engine/model/cross_block.py), fitted by canonical correlation of the raw text and photo "
                        f"features after training; 0: none; auto (default): {CPU_CROSS_DIM} when the products and "
                        "backbones allow it, else none")
    m.add_argument("--cross-modal-gains", default=",".join(f"{g:g}" for g in CPU_CROSS_GAINS),
                   help="QUERY_TEXT,QUERY_PHOTO,QUERY_PHOTO_TEXT,ITEM: the cross-modal block's fixed gains "
                        "(default %(default)s)")
    m.add_argument("--item-photo-views", type=_non_negative, default=CPU_ITEM_PHOTO_VIEWS, metavar="K",
                   help="augmented views of each catalogue photo that the item tower's image-private part also "
                        "reads when an index is built (engine/model/item_views.py; 0: the photo alone; "
                        "default %(default)s)")
    m.add_argument("--image-private-gem-p", type=float, default=CPU_IMAGE_PRIVATE_GEM_P,
                   help="GeM exponent of the photo features the image-private block whitens (1: the mean; "
                        "default %(default)s)")
    d = parser.add_argument_group("query text encoder (engine/model/text_student.py, engine/training/distill.py)")
    d.add_argument("--query-text-layers", default="auto",
                   help="text-only queries run a distilled copy of these text backbone layers (comma-separated "
                        "indices, e.g. 0,5), distilled after training; auto (default): the first and the last layer "
                        "of a backbone with 4 or more; none: the full backbone")
    d.add_argument("--distill-epochs", default="auto",
                   help="passes over the distillation texts; auto (default): 8 where the CPU runs bf16, else 3")
    d.add_argument("--distill-max-steps", type=int, default=DistillConfig.max_steps,
                   help="cap on distillation steps of 128 texts (default %(default)s)")
    t = parser.add_argument_group("training")
    t.add_argument("--steps", type=int, default=CPU_RECIPE["steps"], help="total optimiser steps (both stages)")
    t.add_argument("--stage1-steps", type=int, default=CPU_RECIPE["stage1_steps"],
                   help="steps of stage 1 (unimodal alignment)")
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--gain-lr-scale", type=float, default=1.0,
                   help="learning-rate factor of the fusion output's scalar gains (engine/training/trainer.py)")
    t.add_argument("--logit-scale-lr-scale", type=float, default=1.0,
                   help="learning-rate factor of the learnable logit scale, towers and linear baseline alike "
                        "(engine/training/trainer.py)")
    t.add_argument("--warmup-fraction", type=float, default=0.1)
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--weighting", choices=("uncertainty", "static"), default="uncertainty",
                   help="adaptive (Kendall uncertainty weighting, our choice) or static loss weights")
    t.add_argument("--static-weights", default=None,
                   help="static weights, e.g. cmal=1,clal=0.5,imcl=1 (terms: %s)" % ", ".join(LOSS_NAMES + STAGE1_LOSS_NAMES))
    t.add_argument("--checkpoint-every", type=int, default=50)
    t.add_argument("--stop-after", type=int, default=None, help="stop with a checkpoint at this step (resume later)")
    t.add_argument("--similar-rate", type=float, default=0.35, help="share of products with a 'similar' pair")
    t.add_argument("--attribute-query-rate", type=float, default=0.35,
                   help="share of products with an attribute-phrase query pair")
    t.add_argument("--attribute-photo-rate", type=float, default=CPU_RECIPE["attribute_photo_rate"],
                   help="share of products with an attribute-phrase + photo query pair (the phrase and the "
                        "product's photo -> another product of its group; default %(default)s)")
    t.add_argument("--attribute-photo-text-items", action="store_true",
                   help="present the attribute-phrase + photo pairs' items by their title alone (the m2t form)")
    t.add_argument("--photo-query-rate", type=float, default=CPU_RECIPE["photo_query_rate"],
                   help="share of products with an extra photo-only query pair (photo -> product)")
    t.add_argument("--title-query-rate", type=float, default=CPU_RECIPE["title_query_rate"],
                   help="share of products with an extra title-only query pair (title -> product)")
    for name, what in (("brand-query", "brand + type query pair ('puma sports shoes')"),
                       ("partial-title", "partial-title query pair"),
                       ("phrase-query", "attribute-phrase query pair ('black heels for women')"),
                       ("composed", "composed pair (photo + 'in red' -> same type in red)")):
        key = f"{name.replace('-', '_')}_rate"
        t.add_argument(f"--{name}-rate", type=float, default=CPU_RECIPE[key],
                       help=f"share of products with a {what} (default {CPU_RECIPE[key]})")
    t.add_argument("--augment-views", type=int, default=CPU_RECIPE["augment_views"],
                   help="augmented views cached per query photo (engine/model/augment.py; 0: off; default %(default)s; "
                        "each view costs one image-backbone pass per training photo)")
    t.add_argument("--augment-fraction", type=float, default=CPU_RECIPE["augment_fraction"],
                   help="share of the training photos that get augmented views (default %(default)s)")
    t.add_argument("--augment-p", type=float, default=CPU_RECIPE["augment_p"],
                   help="probability that a query photo is swapped for one of its views (default %(default)s)")
    t.add_argument("--image-residual-init", choices=("auto", "random", "whitening"), default="auto",
                   help="start of the image residual projection: random, or the learned whitening of the augmented "
                        "views (engine/training/whitening.py; needs --augment-views >= 1); auto (default): "
                        "whitening when augmented views of at least --dim photos are cached and the model has a pooled residual, "
                        "else random")
    t.add_argument("--freeze-image-residual", action="store_true",
                   help="with --image-residual-init whitening: keep that projection fixed during training")
    t.add_argument("--image-residual-gain", type=float, default=1.0,
                   help="with the whitening: starting value of the image residual's learned gain (default %(default)s)")
    t.add_argument("--cmal-pair-weights", default=CPU_RECIPE["cmal_pair_weights"],
                   help="CMAL InfoNCE weights, 5 comma-separated numbers for (Tq,Vi),(Vq,Ti),(Tq,Fi),(Vq,Fi),(Fq,Fi) "
                        "(default %(default)s; 1,1,1,1,1 is METHOD.md's plain mean)")
    t.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="bf16: towers' forward under CPU bfloat16 autocast, losses and weights in fp32 (native on "
                        "AVX512-BF16 / AMX, emulated and slow elsewhere); auto (default): fp32 on every CPU, which steps faster than bf16 "
                        "autocast for these 256-wide fusion layers (AMX: 1.18 vs 1.53 s/step; docs/results.md)")
    t.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    t.add_argument("--no-linear-baseline", action="store_true",
                   help="skip the CLIP-style linear two-tower baseline trained after the towers (engine/training/linear_baseline.py)")
    t.add_argument("--linear-baseline-only", action="store_true",
                   help="train only the linear baseline into --out (an existing model folder; same pairs and steps)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _non_negative(text: str) -> int:
    """An integer >= 0 (argparse type); argparse.ArgumentTypeError otherwise."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _parse_weights(text: str | None) -> dict[str, float] | None:
    if not text:
        return None
    known = LOSS_NAMES + STAGE1_LOSS_NAMES
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in known:
            raise ValueError(f"--static-weights: expected name=value with name in {known}, got {part!r}")
        out[name] = float(value)
    return out


def _parse_gains(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        gains = [float(x) for x in text.split(",")]
    except ValueError:
        gains = []
    if len(gains) != 2:
        raise ValueError(f"--solo-gains: expected TEXT,IMAGE (two numbers), got {text!r}")
    return gains


def _private_config(dim: str, gains: str, modality: str = "image") -> dict:
    """``ModelConfig`` fields of ``--{modality}-private-dim`` / ``--{modality}-private-gains``;
    ValueError when malformed. The gains name the query's own-modality pattern first."""
    flag = f"--{modality}-private"
    try:
        width = {"image": CPU_IMAGE_PRIVATE_DIM, "text": CPU_TEXT_PRIVATE_DIM}[modality] if dim == "auto" else int(dim)
        values = [float(x) for x in gains.split(",")]
    except ValueError:
        raise ValueError(f"{flag}-dim: expected a number or auto, and {flag}-gains three numbers; "
                         f"got {dim!r} and {gains!r}") from None
    own = "QUERY_PHOTO" if modality == "image" else "QUERY_TEXT"
    if width < 0 or width == 1 or len(values) != 3:
        raise ValueError(f"{flag}-dim must be 0 or >= 2 and {flag}-gains three numbers "
                         f"{own},QUERY_PHOTO_TEXT,ITEM; got {dim!r} and {gains!r}")
    query = [0.0, values[0], values[1]] if modality == "image" else [values[0], 0.0, values[1]]
    return {f"{modality}_private_dim": width, f"{modality}_private_query_gains": query,
            f"{modality}_private_item_gain": values[2]}


def _cross_config(dim: str, gains: str) -> dict:
    """``ModelConfig`` fields of ``--cross-modal-dim`` / ``--cross-modal-gains``; ValueError when malformed."""
    try:
        width = CPU_CROSS_DIM if dim == "auto" else int(dim)
        values = [float(x) for x in gains.split(",")]
    except ValueError:
        raise ValueError(f"--cross-modal-dim: expected a number or auto, and --cross-modal-gains four numbers; "
                         f"got {dim!r} and {gains!r}") from None
    if width < 0 or (width and (width < 4 or width % 2)) or len(values) != 4 or min(values) < 0:
        raise ValueError("--cross-modal-dim must be 0 or even and >= 4, and --cross-modal-gains four numbers >= 0 "
                         f"QUERY_TEXT,QUERY_PHOTO,QUERY_PHOTO_TEXT,ITEM; got {dim!r} and {gains!r}")
    return {"cross_dim": width, "cross_query_gains": values[:3], "cross_item_gain": values[3]}


def _query_text_layers(text: str) -> str | list[int]:
    """``--query-text-layers``: "auto", "none", or comma-separated layer indices; ValueError otherwise."""
    if text in ("auto", "none"):
        return text
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--query-text-layers: expected auto, none or comma-separated layer indices, "
                         f"got {text!r}") from None


def _distill_epochs(text: str) -> float | None:
    """``--distill-epochs``: "auto" (None: per CPU, ``engine.training.distill``) or a number; ValueError otherwise."""
    if text == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--distill-epochs: expected auto or a number, got {text!r}") from None


def _precision(choice: str) -> str:
    """The training precision of ``--precision``. ``auto`` is fp32 on every CPU (our choice,
    measured: on AMX, batches of 128 pairs through the 256-wide fusion encoders step in 1.18 s
    in fp32 against 1.53 s under bf16 autocast, whose casts cost more than the small matmuls
    gain; docs/results.md "Training precision and the step budget"). ``bf16`` is taken as asked (slow where the CPU
    emulates it).
    """
    return "fp32" if choice == "auto" else choice


def _loss_config(args: argparse.Namespace) -> LossConfig:
    if not args.cmal_pair_weights:
        return LossConfig()
    try:
        weights = tuple(float(x) for x in args.cmal_pair_weights.split(","))
    except ValueError:
        raise ValueError(f"--cmal-pair-weights: expected 5 comma-separated numbers, got {args.cmal_pair_weights!r}")
    return LossConfig(cmal_pair_weights=weights)


def run(args: argparse.Namespace) -> int:
    """Run the training job; prints the summary as JSON. Returns 0, or 2 on unusable input."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        job = TrainJob(
            catalog=args.catalog, out=args.out, split=None if args.split == "all" else args.split,
            pairs_file=args.pairs, catalog_pairs=not args.no_catalog_pairs, limit=args.limit,
            cache_dir=args.cache_dir, init_model=args.init_model, resume=args.resume,
            similar_rate=args.similar_rate, attribute_query_rate=args.attribute_query_rate,
            photo_query_rate=args.photo_query_rate, title_query_rate=args.title_query_rate,
            attribute_photo_rate=args.attribute_photo_rate, attribute_photo_text_items=args.attribute_photo_text_items,
            brand_query_rate=args.brand_query_rate, partial_title_rate=args.partial_title_rate,
            phrase_query_rate=args.phrase_query_rate, composed_rate=args.composed_rate,
            augment_views=args.augment_views, augment_fraction=args.augment_fraction,
            image_residual_init=args.image_residual_init, freeze_image_residual=args.freeze_image_residual,
            image_residual_gain=args.image_residual_gain, image_private_auto=args.image_private_dim == "auto",
            text_private_auto=args.text_private_dim == "auto", cross_auto=args.cross_modal_dim == "auto",
            linear_baseline=not args.no_linear_baseline, linear_only=args.linear_baseline_only, progress=not args.quiet,
            query_text_layers=_query_text_layers(args.query_text_layers),
            distill=DistillConfig(epochs=_distill_epochs(args.distill_epochs), max_steps=args.distill_max_steps, seed=args.seed),
            model=ModelConfig(dim=args.dim, heads=args.heads, cross_layers=args.cross_layers,
                              self_layers=args.self_layers, fusion_layers=args.fusion_layers,
                              mlp_ratio=args.mlp_ratio, dropout=args.dropout, share_fusion=args.share_fusion,
                              deep_gain=args.deep_gain, solo_gains=_parse_gains(args.solo_gains),
                              **_private_config(args.image_private_dim, args.image_private_gains),
                              **_private_config(args.text_private_dim, args.text_private_gains, "text"),
                              **_cross_config(args.cross_modal_dim, args.cross_modal_gains),
                              image_private_gem_p=args.image_private_gem_p, item_photo_views=args.item_photo_views,
                              pooled_residual=CPU_POOLED_RESIDUAL and not args.no_pooled_residual,
                              image_backbone=dict(FLIP_IMAGE_BACKBONE if args.flip_average else DEFAULT_IMAGE_BACKBONE)),
            train=TrainConfig(steps=args.steps, stage1_steps=args.stage1_steps, batch_size=args.batch_size,
                              lr=args.lr, warmup_fraction=args.warmup_fraction, weight_decay=args.weight_decay,
                              grad_clip=args.grad_clip, seed=args.seed, weighting=args.weighting,
                              static_weights=_parse_weights(args.static_weights), loss=_loss_config(args),
                              checkpoint_every=args.checkpoint_every, stop_after=args.stop_after,
                              precision=_precision(args.precision), augment_p=args.augment_p,
                              gain_lr_scale=args.gain_lr_scale, logit_scale_lr_scale=args.logit_scale_lr_scale),
        )
        summary = train_model(job)
        if args.linear_baseline_only:
            print(json.dumps(summary, indent=2))
            return 0
    except (CatalogError, TrainingDataError, ModelFolderError, FileNotFoundError, ValueError) as exc:
        print(f"ecsearch train: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary.get(k) for k in ("products", "pairs", "pairs_by_kind", "rejects", "cache_seconds",
                                                  "train_seconds", "steps", "pairs_per_s", "total_seconds",
                                                  "query_text_student", "fingerprint")}, indent=2))
    if summary["steps"] < job.train.steps:
        print(f"stopped at step {summary['steps']} of {job.train.steps}; resume with --resume", file=sys.stderr)
    return 0
