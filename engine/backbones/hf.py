"""Hugging Face backbones from a local folder: a text encoder (``AutoModel`` + tokenizer,
e.g. all-MiniLM-L6-v2) and both towers of a CLIP-family checkpoint (CLIPModel,
ChineseCLIPModel, SiglipModel, ... — anything exposing ``.text_model`` / ``.vision_model``).

Source: METHOD.md §1.1 (token outputs of each side); loading rules are our choice:
``local_files_only=True`` always, so nothing ever reaches a hub.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as transformers_logging

from engine.images import ImagePreprocessor

MAX_TEXT_TOKENS = 64  # METHOD.md §1.1: Lt <= 64

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@lru_cache(maxsize=4)
def load_hf_model(folder: str) -> nn.Module:
    """Load (once per process) a Hugging Face model from a local folder, eval mode, frozen."""
    transformers_logging.disable_progress_bar()  # no per-load progress bars in servers / logs
    model = AutoModel.from_pretrained(folder, local_files_only=True)
    model.eval()
    model.requires_grad_(False)
    return model


class HFTextBackbone(nn.Module):
    """Text → ``(tokens float32 (B, L, H), mask bool (B, L))`` with L ≤ 64.

    Args:
        folder: local folder with config, weights and tokenizer files.
        clip: take ``.text_model`` of a CLIP-family model instead of the model itself.
        max_length: token limit (≤ 64, and ≤ the model's position table).
    """

    def __init__(self, folder: str, clip: bool = False, max_length: int = MAX_TEXT_TOKENS):
        super().__init__()
        model = load_hf_model(folder)
        self.model = model.text_model if clip else model
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        config = self.model.config
        limit = getattr(config, "max_position_embeddings", max_length) or max_length
        self.max_length = int(min(max_length, MAX_TEXT_TOKENS, limit))
        self.hidden_size = int(config.hidden_size)
        self.calls = 0  # number of forward passes run; lets tests prove a backbone was skipped

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenize with padding to the longest text in ``texts`` and truncation to ``max_length``."""
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt")

    def token_lengths(self, texts: list[str]) -> list[int]:
        """Number of tokens per text (after truncation), for length-sorted batching."""
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        return [len(x) for x in ids]

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``texts`` (B non-empty strings) → tokens ``(B, L, H)`` float32, mask ``(B, L)`` bool."""
        batch = self.tokenize(texts)
        device = next(self.model.parameters()).device
        mask = batch["attention_mask"].to(device)
        inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        self.calls += 1
        out = self.model(**inputs)
        return out.last_hidden_state.float(), mask.bool()


class HFVisionBackbone(nn.Module):
    """Pixels → ``(tokens float32 (B, L, H), mask bool (B, L))`` from a CLIP-family vision tower
    (ViT patches + CLS for CLIP; patches for SigLIP)."""

    def __init__(self, folder: str):
        super().__init__()
        self.model = load_hf_model(folder).vision_model
        config = self.model.config
        self.hidden_size = int(config.hidden_size)
        self.preprocess = _clip_preprocessor(Path(folder), int(config.image_size))
        self.calls = 0

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``pixels float32 (B, 3, S, S)`` → tokens ``(B, L, H)``, mask ``(B, L)`` (all True)."""
        device = next(self.model.parameters()).device
        self.calls += 1
        tokens = self.model(pixel_values=pixels.to(device)).last_hidden_state.float()
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=device)


def _clip_preprocessor(folder: Path, image_size: int) -> ImagePreprocessor:
    """Mean/std/size from ``preprocessor_config.json`` when present, CLIP's otherwise."""
    mean, std, resize = CLIP_MEAN, CLIP_STD, image_size
    path = folder / "preprocessor_config.json"
    if path.is_file():
        cfg = json.loads(path.read_text())
        mean = tuple(cfg.get("image_mean", mean))
        std = tuple(cfg.get("image_std", std))
        size = cfg.get("size", {})
        if isinstance(size, dict):
            resize = int(size.get("shortest_edge", size.get("height", resize)))
        elif isinstance(size, int):
            resize = size
    return ImagePreprocessor(image_size=image_size, resize_size=max(resize, image_size), mean=mean, std=std)
