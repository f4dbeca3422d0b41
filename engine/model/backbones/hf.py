"""Hugging Face backbones from a local folder: a text encoder (``AutoModel`` + tokenizer,
e.g. all-MiniLM-L6-v2) and both towers of a CLIP-family checkpoint (CLIPModel,
ChineseCLIPModel, SiglipModel, ... — anything exposing ``.text_model`` / ``.vision_model``).

Source: METHOD.md §1.1 (token outputs of each side); loading rules are our choice:
``local_files_only=True`` always, so nothing ever reaches a hub.
"""
from __future__ import annotations

import copy
import json
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as transformers_logging

from engine.model.backbones.text_tokens import TextTokens  # noqa: F401 (re-exported)
from engine.model.images import ImagePreprocessor

MAX_TEXT_TOKENS = 64  # METHOD.md §1.1: Lt <= 64

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_hf_model(folder: str, attn_implementation: str | None = None) -> nn.Module:
    """Load (once per process and ``attn_implementation``) a Hugging Face model from a local
    folder, eval mode, frozen. The cached model is shared: callers must not reconfigure it,
    they ask for the attention implementation they need here instead."""
    return _load_cached(str(folder), attn_implementation)


@lru_cache(maxsize=4)
def _load_cached(folder: str, attn_implementation: str | None) -> nn.Module:
    transformers_logging.disable_progress_bar()  # no per-load progress bars in servers / logs
    options = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = AutoModel.from_pretrained(folder, local_files_only=True, **options)
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
        # Plain matmul + softmax ("eager") attention for a text encoder: for texts of <= 64
        # tokens on a CPU it beats the SDPA flash kernel (all-MiniLM-L6-v2, 8 queries of 8
        # tokens, bf16, one thread: query tower 10.9 -> 10.2 ms; 64 titles: 113 -> 105 ms).
        # Same results (cosine 0.99995). Chosen at load time, so the shared cached model is
        # never reconfigured. Our choice.
        model = load_hf_model(folder, attn_implementation=None if clip else "eager")
        self.model = model.text_model if clip else model
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self._tokenizer_lock = threading.Lock()
        config = self.model.config
        limit = getattr(config, "max_position_embeddings", max_length) or max_length
        self.max_length = int(min(max_length, MAX_TEXT_TOKENS, limit))
        self._rust = _rust_tokenizer(self.tokenizer, self.max_length)
        self.hidden_size = int(config.hidden_size)
        self.calls = 0  # number of forward passes run; lets tests prove a backbone was skipped

    def pretokenize(self, text: str) -> TextTokens:
        """Tokenize one text ahead of its batch (truncated to ``max_length``, not padded).
        ``tokenize`` and ``encode`` accept the result in place of the string; the query
        server does this per request, off the tower thread."""
        return self._token_lists([text])[0]

    def tokenize(self, texts: list[str | TextTokens]) -> dict[str, torch.Tensor]:
        """Tokenize with padding to the longest text in ``texts`` and truncation to
        ``max_length``: the ids of ``tokenizer(texts, padding=True, truncation=True, ...)``.
        An element may be a ``TextTokens`` from ``pretokenize``."""
        return self._pad(self._token_lists(texts))

    def token_lengths(self, texts: list[str | TextTokens]) -> list[int]:
        """Number of tokens per text (after truncation), for length-sorted batching."""
        return [len(t.ids) for t in self._token_lists(texts)]

    def _token_lists(self, texts: list[str | TextTokens]) -> list[TextTokens]:
        """Each text's ``TextTokens``; strings are tokenized in one call."""
        strings = [t for t in texts if not isinstance(t, TextTokens)]
        if not strings:
            return list(texts)
        if self._rust is not None:
            fresh = iter([TextTokens(tuple(e.ids), tuple(e.type_ids)) for e in self._rust.encode_batch(strings)])
        else:
            with self._tokenizer_lock:  # a fast tokenizer is not safe to call from two threads
                out = self.tokenizer(strings, truncation=True, max_length=self.max_length)
            types = out.get("token_type_ids") or [[0] * len(ids) for ids in out["input_ids"]]
            fresh = iter([TextTokens(tuple(ids), tuple(t)) for ids, t in zip(out["input_ids"], types)])
        return [t if isinstance(t, TextTokens) else next(fresh) for t in texts]

    def _pad(self, tokens: list[TextTokens]) -> dict[str, torch.Tensor]:
        """Pad token lists as the tokenizer pads (its pad id, pad type id and side)."""
        length = max(len(t.ids) for t in tokens)
        ids = np.full((len(tokens), length), self.tokenizer.pad_token_id or 0, dtype=np.int64)
        types = np.full((len(tokens), length), getattr(self.tokenizer, "pad_token_type_id", 0), dtype=np.int64)
        mask = np.zeros((len(tokens), length), dtype=np.int64)
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        for row, t in enumerate(tokens):
            span = slice(length - len(t.ids), length) if left else slice(0, len(t.ids))
            ids[row, span] = t.ids
            types[row, span] = t.type_ids
            mask[row, span] = 1
        batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        if self._token_types:
            batch["token_type_ids"] = torch.from_numpy(types)
        return batch

    @property
    def _token_types(self) -> bool:
        return "token_type_ids" in self.tokenizer.model_input_names

    def encode(self, texts: list[str], model: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``texts`` (B non-empty strings) → tokens ``(B, L, H)`` float32, mask ``(B, L)`` bool.
        ``model``: run this model in place of ``self.model`` (e.g. the query tower's distilled
        text student, ``engine.model.text_student``), with the same tokenizer."""
        model = self.model if model is None else model
        batch = self.tokenize(texts)
        device = next(model.parameters()).device
        mask = batch["attention_mask"].to(device)
        inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        self.calls += 1
        out = model(**inputs)
        return out.last_hidden_state.float(), mask.bool()


def _rust_tokenizer(tokenizer, max_length: int):
    """The fast tokenizer's Rust ``tokenizers.Tokenizer``, copied and set once to truncate at
    ``max_length`` (no padding: ``HFTextBackbone._pad`` pads), or None for a slow tokenizer.

    Same ids as the Hugging Face call (tests check it on the catalogue's titles) with a
    fraction of its Python overhead, which a query server pays on every batch; and its
    ``encode_batch`` is safe to call from several threads once configured. Our choice.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    rust = copy.deepcopy(backend)
    rust.no_padding()
    rust.enable_truncation(max_length=max_length, direction=getattr(tokenizer, "truncation_side", "right"))
    return rust


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
