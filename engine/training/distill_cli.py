"""``ecsearch distill``: give a trained model folder a distilled text encoder for text-only queries.

``ecsearch train`` already does this after its last step (``--query-text-layers``, default auto);
this command does it for a model folder trained without it (or to try other layers): it reads the
catalogue's products of ``--split``, builds the training job's typed queries with the training
recipe's rates and seed, distils (``engine.training.distill``) and writes a new model folder (the
source folder is left as it was; its linear baseline files are copied along). Prints the summary
as JSON; exit 2 on unusable input. Our choice.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from engine.catalog import CatalogError
from engine.model.errors import ModelFolderError
from engine.training.distill import DistillConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``distill`` options."""
    parser.add_argument("--model", required=True, help="trained model folder to start from (left unchanged)")
    parser.add_argument("--out", required=True, help="model folder to write (must differ from --model)")
    parser.add_argument("--catalog", required=True, help="the catalogue the model was trained on")
    parser.add_argument("--split", default="train", help="products of this split give the texts ('all': every product)")
    parser.add_argument("--limit", type=int, default=None, help="read at most this many catalogue rows")
    parser.add_argument("--query-text-layers", default="auto",
                        help="text backbone layers the student starts from (comma-separated), or auto "
                             "(the first and the last layer of a backbone with 4 or more; default)")
    parser.add_argument("--distill-epochs", default="auto",
                        help="passes over the texts; auto (default): 8 where the CPU runs bf16, else 3")
    parser.add_argument("--distill-max-steps", type=int, default=DistillConfig.max_steps,
                        help="cap on steps of 128 texts (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the typed queries, the split and the batches")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Distil and write ``--out``; returns 0, or 2 on unusable input."""
    import torch

    from engine.model.model_folder import load_model, save_model
    from engine.training.cli import CPU_RECIPE, _distill_epochs, _query_text_layers
    from engine.training.distill import distill_after_training
    from engine.training.job import TrainingDataError, TrainJob, job_pairs, load_products
    from engine.training.linear_baseline import META, WEIGHTS
    from engine.training.trainer import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if Path(args.out).resolve() == Path(args.model).resolve():
            raise ValueError("--out must be a new folder, not --model (model folders are not rewritten in place)")
        choice = _query_text_layers(args.query_text_layers)
        if choice == "none":
            raise ValueError("--query-text-layers none: nothing to distil")
        config = DistillConfig(epochs=_distill_epochs(args.distill_epochs), max_steps=args.distill_max_steps, seed=args.seed)
        model = load_model(args.model)
        products, _ = load_products(args.catalog, None if args.split == "all" else args.split, args.limit)
        rates = {k: CPU_RECIPE[k] for k in ("photo_query_rate", "title_query_rate", "brand_query_rate",
                                            "partial_title_rate", "phrase_query_rate", "composed_rate",
                                            "attribute_photo_rate")}
        job = TrainJob(catalog=args.catalog, out=args.out, split=None if args.split == "all" else args.split,
                       limit=args.limit, train=TrainConfig(seed=args.seed), **rates)
        pairs, _ = job_pairs(job, products)  # the pairs `ecsearch train` draws with its defaults
        model, info = distill_after_training(model, choice, products, pairs, config, progress=not args.quiet)
        if info is None or info.get("layers") is None:
            raise ValueError(f"no student: {(info or {}).get('reason', 'none asked for')}")
    except (CatalogError, TrainingDataError, ModelFolderError, FileNotFoundError, ValueError) as exc:
        print(f"ecsearch distill: error: {exc}", file=sys.stderr)
        return 2
    extra = dict(getattr(model, "extra", None) or {})
    training = dict(extra.get("training", {}))
    training["query_text_student"] = {**info, "distilled": f"by ecsearch distill onto {args.model}"}
    extra["training"] = training
    fingerprint = save_model(model, args.out, extra=extra)
    for name in (WEIGHTS, META):  # the linear baseline does not depend on the student
        if (Path(args.model) / name).is_file():
            shutil.copy2(Path(args.model) / name, Path(args.out) / name)
    print(json.dumps({**info, "fingerprint": fingerprint, "out": str(args.out)}, indent=2))
    return 0
