"""Running a tower on cached backbone tokens: a batch of cached rows (``TokenBatch``) and
its views F / T / V (``encode_views``), the one place training and evaluation turn cached
tokens into embeddings; ``iter_chunks`` for chunked passes. Our choice."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from engine.tokens.cache import TokenTable


@dataclass
class TokenBatch:
    """Cached tokens of B samples, as the fusion encoder takes them.

    text_tokens ``float32 (B, Lt, Ht)``, text_mask ``bool (B, Lt)``, has_text ``bool (B,)``;
    image_tokens ``float32 (B, Li, Hi)``, image_mask ``bool (B, Li)``, has_image ``bool (B,)``.
    """

    text_tokens: torch.Tensor
    text_mask: torch.Tensor
    has_text: torch.Tensor
    image_tokens: torch.Tensor
    image_mask: torch.Tensor
    has_image: torch.Tensor

    @classmethod
    def gather(cls, texts: TokenTable, images: TokenTable, text_rows: np.ndarray, image_rows: np.ndarray) -> "TokenBatch":
        """Rows of the two tables (``-1``: modality absent for that sample)."""
        tt, tm, ht = texts.gather(text_rows)
        it, im, hi = images.gather(image_rows)
        return cls(tt, tm, ht, it, im, hi)

    def select(self, idx: torch.Tensor) -> "TokenBatch":
        return TokenBatch(self.text_tokens[idx], self.text_mask[idx], self.has_text[idx],
                          self.image_tokens[idx], self.image_mask[idx], self.has_image[idx])


def _run(tower, batch: TokenBatch, idx: torch.Tensor, use_text: bool, use_image: bool) -> torch.Tensor:
    """Tower on the samples ``idx`` with one or both modalities; an unused modality is passed
    as one masked dummy token so it costs nothing (its tokens are never attended)."""
    b = batch.select(idx)
    text = _side(b.text_tokens, b.text_mask, b.has_text, use_text)
    image = _side(b.image_tokens, b.image_mask, b.has_image, use_image)
    return tower.encode_tokens(*text[:2], *image[:2], text[2], image[2])


def _side(tokens: torch.Tensor, mask: torch.Tensor, has: torch.Tensor, use: bool):
    """One modality's ``(tokens, mask, has)``, or a masked dummy token per sample when unused."""
    if use:
        return tokens, mask, has
    n = tokens.shape[0]
    return (tokens.new_zeros((n, 1, tokens.shape[2])), torch.zeros((n, 1), dtype=torch.bool),
            torch.zeros(n, dtype=torch.bool))


def encode_views(tower, batch: TokenBatch, views: Sequence[str] = ("F", "T", "V"),
                 dim: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A tower's views of B cached samples (METHOD.md §1.4): fused F, text-only T, image-only V.

    Returns ``(emb, ok)``: ``emb[view]`` ``float32 (B, d)`` unit rows (zeros where the view
    does not exist), ``ok[view]`` ``bool (B,)``. T exists when the sample has text, V when it
    has an image, F always (a one-modality sample's F equals that modality's view and is
    not recomputed). Differentiable when called under grad.
    """
    has_t, has_i = batch.has_text, batch.has_image
    n = has_t.shape[0]
    emb: dict[str, torch.Tensor] = {}
    ok: dict[str, torch.Tensor] = {}
    need_t = "T" in views or "F" in views
    need_v = "V" in views or "F" in views
    t_idx = torch.nonzero(has_t).flatten()
    v_idx = torch.nonzero(has_i).flatten()
    t_emb = _run(tower, batch, t_idx, True, False) if need_t and len(t_idx) else None
    v_emb = _run(tower, batch, v_idx, False, True) if need_v and len(v_idx) else None
    d = dim or (t_emb.shape[1] if t_emb is not None else v_emb.shape[1] if v_emb is not None else 1)
    proto = t_emb if t_emb is not None else v_emb

    def scatter(rows: torch.Tensor, values: torch.Tensor | None) -> torch.Tensor:
        base = torch.zeros(n, d) if proto is None else proto.new_zeros((n, d))
        if values is None or len(rows) == 0:
            return base
        return base.index_copy(0, rows, values)

    if "T" in views:
        emb["T"], ok["T"] = scatter(t_idx, t_emb), has_t.clone()
    if "V" in views:
        emb["V"], ok["V"] = scatter(v_idx, v_emb), has_i.clone()
    if "F" in views:
        both = torch.nonzero(has_t & has_i).flatten()
        only_t = torch.nonzero(has_t & ~has_i).flatten()
        only_v = torch.nonzero(~has_t & has_i).flatten()
        f = scatter(both, _run(tower, batch, both, True, True) if len(both) else None)
        if len(only_t):
            f = f.index_copy(0, only_t, t_emb[torch.searchsorted(t_idx, only_t)])
        if len(only_v):
            f = f.index_copy(0, only_v, v_emb[torch.searchsorted(v_idx, only_v)])
        emb["F"], ok["F"] = f, has_t | has_i
    return emb, ok


def iter_chunks(n: int, size: int) -> Iterator[np.ndarray]:
    """Consecutive index chunks ``int64 (≤size,)`` covering ``range(n)``."""
    for s in range(0, n, size):
        yield np.arange(s, min(s + size, n))


def mean_pooled(table: TokenTable, rows: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Masked mean of the cached backbone tokens of ``rows``, L2-normalised: ``float32 (n, H)``
    (the raw-backbone features of the baselines; rows without tokens come out zero)."""
    out = []
    for chunk in iter_chunks(len(rows), batch_size):
        tokens, mask, _ = table.gather(rows[chunk])
        w = mask.float().unsqueeze(-1)
        out.append(((tokens * w).sum(1) / w.sum(1).clamp_min(1.0)).numpy())
    if not out:
        return np.zeros((0, table.hidden_size), np.float32)
    x = np.concatenate(out)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
