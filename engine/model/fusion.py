"""UniECS gated cross-modal fusion encoder (UniECS, CIKM 2025, §3; restated in METHOD.md §1.2–1.3).

Input: projected backbone tokens of each modality plus **per-sample** presence flags.
Output: one L2-normalised vector of width ``d`` per sample.

Missing modalities (METHOD.md §1.3): an absent modality contributes no keys to attention
(key padding mask), is excluded from pooling, and its pooled slot is a learned "absent"
vector. When the *other* modality is absent the cross-attention update is skipped for that
sample (our choice: the spec's ``A`` is undefined with no keys; skipping keeps the token
unchanged instead of letting an untrained gate shrink it). A sample's output never depends
on the other samples of its batch: every mask is per sample and pads are never attended.

What the gates learn: since the cross-attention layers run only on the rows that have both
modalities, the presence inputs ``e_t`` and ``e_v`` of the gate formula are always 1 there;
their weight column acts as a second bias. The gates therefore learn, per token and channel,
how much of the other modality's attended summary ``A`` to mix in, from the token itself and
``A`` — not whether the other modality is present. Presence is handled outside the gates: by
the skip above, the key padding masks and the learned "absent" pooled vectors (METHOD.md §1.3).

Pooled residual (``pooled_residual=True``, our choice, issue 12): the output adds, per present
modality, a linear projection of the *raw* backbone tokens' masked mean (L2-normalised, scaled to
the deep path's norm, times a learned gain initialised to 1). The fused vector then starts as
the sum of its two linear unimodal views plus the deep path, so it keeps the backbones'
robustness (an augmented photo stays close to its clean photo) and an absent modality simply
contributes no residual.

Deep-path gain (``deep_gain``, our choice, issue 12 item 4): a learned scalar multiplies the deep
path (the fusion blocks' LayerNorm output) before the residuals are added. Started at 0, every
view starts as its linear residual views (F = unit(r_t + r_v), the normalised sum of the two
linear unimodal views, as in a CLIP-style linear two-tower) and the deep path enters only as far
as training asks for it. One-modality gains (``solo_gains``, our choice): the rows that have one
modality take their own learned residual gains, so the image-only view's balance between the deep
path and the residual is learned apart from the fused view's text / image balance.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.cross_block import CrossBlock
from engine.model.private_block import PrivateBlock


def _safe_key_mask(valid: torch.Tensor) -> torch.Tensor:
    """``valid bool (B, L)`` → key_padding_mask (True = ignore) that never masks a whole row.

    Rows with no valid key get their first key unmasked so softmax stays finite; callers
    discard the outputs of those rows.
    """
    valid = valid.clone()
    empty = ~valid.any(dim=1)
    if empty.any():
        valid[empty, 0] = True
    return ~valid


class PreLNBlock(nn.Module):
    """Pre-LN Transformer block: x + MHA(LN(x)); x + MLP(LN(x)). Shapes ``(B, L, d)``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x)
        mask = None if valid is None else _safe_key_mask(valid)
        a, _ = self.attn(h, h, h, key_padding_mask=mask, need_weights=False)
        x = x + self.drop(a)
        return x + self.drop(self.mlp(self.norm2(x)))


class GatedCrossLayer(nn.Module):
    """One bidirectional gated cross-attention layer (METHOD.md §1.2).

    ``A_v = MHA(LN(V), LN(T), LN(T))``, ``A_t = MHA(LN(T), LN(V), LN(V))``,
    ``g_v = sigmoid(W_v [V; A_v; e_t])``, ``g_t = sigmoid(W_t [T; A_t; e_v])``,
    ``V ← g_v*A_v + (1-g_v)*V``, ``T ← g_t*A_t + (1-g_t)*T``.

    ``FusionEncoder`` calls it only on rows with both modalities, so ``has_image`` and
    ``has_text`` are all True there and the ``e`` column of ``W_v`` / ``W_t`` works as a bias:
    the gates learn how much cross-modal context to take, not presence (module docstring).
    """

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm_v = nn.LayerNorm(dim)
        self.norm_t = nn.LayerNorm(dim)
        self.attn_v = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.attn_t = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.gate_v = nn.Linear(2 * dim + 1, dim)
        self.gate_t = nn.Linear(2 * dim + 1, dim)

    def forward(self, v: torch.Tensor, v_valid: torch.Tensor, t: torch.Tensor, t_valid: torch.Tensor,
                has_image: torch.Tensor, has_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # v: [B, Li, d], t: [B, Lt, d]; *_valid: [B, L] bool; has_*: [B] bool
        nv, nt = self.norm_v(v), self.norm_t(t)
        a_v, _ = self.attn_v(nv, nt, nt, key_padding_mask=_safe_key_mask(t_valid), need_weights=False)
        a_t, _ = self.attn_t(nt, nv, nv, key_padding_mask=_safe_key_mask(v_valid), need_weights=False)
        e_t = has_text.to(v.dtype)[:, None, None].expand(-1, v.shape[1], 1)  # [B, Li, 1]
        e_v = has_image.to(t.dtype)[:, None, None].expand(-1, t.shape[1], 1)  # [B, Lt, 1]
        g_v = torch.sigmoid(self.gate_v(torch.cat([v, a_v, e_t], dim=-1)))
        g_t = torch.sigmoid(self.gate_t(torch.cat([t, a_t, e_v], dim=-1)))
        new_v = g_v * a_v + (1 - g_v) * v
        new_t = g_t * a_t + (1 - g_t) * t
        # Skip the update where the other modality is absent (see module docstring).
        v = torch.where(has_text[:, None, None], new_v, v)
        t = torch.where(has_image[:, None, None], new_t, t)
        return v, t


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``x (B, L, d)`` over positions where ``valid (B, L)`` is True → ``(B, d)``;
    rows with no valid position give zeros."""
    w = valid.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


def gem_pool(x: torch.Tensor, valid: torch.Tensor, p: float) -> torch.Tensor:
    """Generalised mean ``(mean over valid positions of max(x, 0)^p)^(1/p)`` of ``x (B, L, d)`` →
    float32 ``(B, d)``; p = 1 is the masked mean of the clamped tokens (Radenović, Tolias and
    Chum, "Fine-tuning CNN image retrieval with no human annotation", TPAMI 2019, §3.1)."""
    return masked_mean(x.float().clamp_min(0.0).pow(p), valid).pow(1.0 / p)


class FusionEncoder(nn.Module):
    """Projections + gated cross-modal fusion + pooling + fusion blocks (METHOD.md §1.1–1.2).

    Args:
        text_hidden, image_hidden: backbone widths Ht, Hi.
        dim: output width d (256). heads: attention heads (8).
        cross_layers: gated cross-attention layers L (3). self_layers: pre-LN blocks per
        modality (2). fusion_layers: blocks after concatenation (3). mlp_ratio, dropout: block MLP width
        factor and dropout (our choice: 4.0, 0.1). pooled_residual: add the linear projection of
        the raw mean-pooled backbone tokens to the output (module docstring; default False).
        deep_gain: None, or the initial value of the learned deep-path gain (module docstring).
        solo_gains: None, or the initial (text, image) residual gains of one-modality rows; needs
        pooled_residual (else ValueError).
        private_dim / private_gains: 0 (default), or the width ``p`` and the (text only, image only,
        both) gains of the image-private block appended to the output
        (``engine.model.private_block``); the output is then ``d + p`` wide. private_gem_p: the
        GeM exponent of the photo features that block whitens (``gem_pool``; 1: the masked mean).
        text_private_dim / text_private_gains: the same for the text-private block, appended after
        the image-private one (output ``d + p + q`` wide).
        cross_dim / cross_gains / cross_role / cross_gem_p: 0 (default), or the width ``c`` (even), the
        (text only, photo only, both) gains, the tower ("query" or "item") and the photo features'
        GeM exponent of the cross-modal block (``engine.model.cross_block``), appended last (output
        ``d + p + q + c`` wide).
    """

    def __init__(self, text_hidden: int, image_hidden: int, dim: int = 256, heads: int = 8,
                 cross_layers: int = 3, self_layers: int = 2, fusion_layers: int = 3,
                 mlp_ratio: float = 4.0, dropout: float = 0.1, pooled_residual: bool = False,
                 deep_gain: float | None = None, solo_gains: tuple[float, float] | None = None,
                 private_dim: int = 0, private_gains: tuple[float, float, float] = (1.0, 1.0, 1.0),
                 private_gem_p: float = 1.0, text_private_dim: int = 0, text_private_gains: tuple[float, float, float] = (1.0, 1.0, 1.0),
                 cross_dim: int = 0, cross_gains: tuple[float, float, float] = (1.0, 1.0, 1.0), cross_role: str = "query",
                 cross_gem_p: float = 2.0):
        super().__init__()
        self.text_proj = nn.Linear(text_hidden, dim)
        self.image_proj = nn.Linear(image_hidden, dim)
        self.cross = nn.ModuleList(GatedCrossLayer(dim, heads, dropout) for _ in range(cross_layers))
        self.text_blocks = nn.ModuleList(PreLNBlock(dim, heads, mlp_ratio, dropout) for _ in range(self_layers))
        self.image_blocks = nn.ModuleList(PreLNBlock(dim, heads, mlp_ratio, dropout) for _ in range(self_layers))
        self.text_pool = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.Tanh())
        self.image_pool = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.Tanh())
        self.text_absent = nn.Parameter(torch.zeros(dim))
        self.image_absent = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.text_absent, std=0.02)
        nn.init.normal_(self.image_absent, std=0.02)
        self.merge = nn.Linear(2 * dim, dim)
        self.fusion_blocks = nn.ModuleList(PreLNBlock(dim, heads, mlp_ratio, dropout) for _ in range(fusion_layers))
        self.out_norm = nn.LayerNorm(dim)
        self.pooled_residual = pooled_residual
        if pooled_residual:  # created last: the other parameters draw the same initial values
            self.text_residual = nn.Linear(text_hidden, dim)
            self.image_residual = nn.Linear(image_hidden, dim)
            self.residual_gain = nn.Parameter(torch.ones(2))  # text, image
            if solo_gains is not None:  # rows with one modality: their own gains (text-only, image-only)
                self.solo_gain = nn.Parameter(torch.tensor([float(g) for g in solo_gains]))
        elif solo_gains is not None:
            raise ValueError("solo_gains needs pooled_residual")
        self.solo_gains = solo_gains is not None
        if deep_gain is not None:  # a learned scalar on the deep path, created last (same draws)
            self.deep_gain = nn.Parameter(torch.tensor(float(deep_gain)))
        self.has_deep_gain = deep_gain is not None
        # buffers only (no parameters, no random draws): models without it load unchanged
        self.private = (PrivateBlock(image_hidden, private_dim, private_gains, "image", gem_p=private_gem_p)
                        if private_dim else None)
        self.text_private = (PrivateBlock(text_hidden, text_private_dim, text_private_gains, "text")
                             if text_private_dim else None)
        self.cross_modal = (CrossBlock(text_hidden, image_hidden, cross_dim, cross_gains, cross_role, cross_gem_p)
                            if cross_dim else None)

    @property
    def output_dim(self) -> int:
        """Width of the output vectors: ``d``, plus the widths of the private blocks."""
        return self.merge.out_features + sum(b.dim for b in (self.private, self.text_private, self.cross_modal)
                                             if b is not None)

    def forward(self, text_tokens: torch.Tensor, text_mask: torch.Tensor,
                image_tokens: torch.Tensor, image_mask: torch.Tensor,
                has_text: torch.Tensor, has_image: torch.Tensor, kind: str | None = None) -> torch.Tensor:
        """Fuse one batch.

        Args:
            text_tokens: float (B, Lt, Ht); text_mask: bool (B, Lt), True on real tokens.
            image_tokens: float (B, Li, Hi); image_mask: bool (B, Li).
            has_text, has_image: bool (B,), per-sample presence taken from the raw input.
            kind: None, or "text" | "image" | "text+image" when the caller knows that every row
                has that presence (``has_text`` / ``has_image`` must agree; they are then not
                read): the same output, computed without the per-row selections, which an exported
                graph of one kind of batch would otherwise carry as ~150 small ops
                (``engine.model.tower_graphs``; our choice, issue 11).
        Returns:
            float32 (B, output_dim), L2-normalised.
        Raises:
            ValueError: an unknown ``kind``, or rows whose presence flags disagree with it (checked
                outside tracing).
        """
        if kind not in _UNIFORM:
            raise ValueError(f"kind must be one of {tuple(k for k in _UNIFORM if k)} or None, got {kind!r}")
        every_text, every_image = _UNIFORM[kind]  # None: per row
        has_text = has_text.bool()
        has_image = has_image.bool()
        if kind is not None and not torch.jit.is_tracing() and not (
                bool((has_text == every_text).all()) and bool((has_image == every_image).all())):
            raise ValueError(f"kind {kind!r} says every row has the same modalities, but has_text / has_image differ")
        t_valid = text_mask.bool() if every_text else text_mask.bool() & has_text[:, None]  # [B, Lt]
        v_valid = image_mask.bool() if every_image else image_mask.bool() & has_image[:, None]  # [B, Li]
        dim = self.merge.out_features
        p_t = self.text_absent.expand(has_text.shape[0], dim)
        p_v = self.image_absent.expand(has_image.shape[0], dim)
        # Work only on the rows that have a modality (our choice: pure speed-up; the skipped
        # rows' values would be discarded by the masks anyway, so outputs are identical).
        t = tv = v = vv = None  # a modality no row has (``kind``) is not computed at all
        if every_text is not False:
            t = F.normalize(self.text_proj(_rows(text_tokens, has_text, every_text).float()), dim=-1)  # [Bt, Lt, d]
            tv = _rows(t_valid, has_text, every_text)
        if every_image is not False:
            v = F.normalize(self.image_proj(_rows(image_tokens, has_image, every_image).float()), dim=-1)  # [Bv, Li, d]
            vv = _rows(v_valid, has_image, every_image)
        if every_text and every_image:  # every row has both: cross-attention on all of them
            ones = torch.ones(t.shape[0], dtype=torch.bool, device=t.device)
            for layer in self.cross:
                v, t = layer(v, vv, t, tv, ones, ones)
        elif every_text is None and (has_text & has_image).any():
            both = has_text & has_image
            rows_t = both[has_text]  # rows of t that also have an image
            rows_v = both[has_image]
            ct, cv = t[rows_t], v[rows_v]
            ones = torch.ones(ct.shape[0], dtype=torch.bool, device=ct.device)
            for layer in self.cross:
                cv, ct = layer(cv, vv[rows_v], ct, tv[rows_t], ones, ones)
            t = t.clone()
            v = v.clone()
            t[rows_t] = ct.to(t.dtype)
            v[rows_v] = cv.to(v.dtype)
        if every_text is not False and t.shape[0]:
            for block in self.text_blocks:
                t = block(t, tv)
            p_t = _put_rows(p_t, has_text, every_text, self.text_pool(masked_mean(t, tv)))  # [Bt, d]
        if every_image is not False and v.shape[0]:
            for block in self.image_blocks:
                v = block(v, vv)
            p_v = _put_rows(p_v, has_image, every_image, self.image_pool(masked_mean(v, vv)))  # [Bv, d]
        x = self.merge(torch.cat([p_t, p_v], dim=-1)).unsqueeze(1)  # [B, 1, d]
        for block in self.fusion_blocks:
            x = block(x)
        out = self.out_norm(x.squeeze(1))
        if self.has_deep_gain:
            out = out * self.deep_gain.to(out.dtype)
        # means of the raw tokens, computed once for the residuals and the private blocks
        v_mean = (masked_mean(image_tokens.float(), v_valid)
                  if (self.pooled_residual or self.private is not None) and every_image is not False else None)
        t_mean = (masked_mean(text_tokens.float(), t_valid)
                  if (self.pooled_residual or self.text_private is not None or self.cross_modal is not None)
                  and every_text is not False else None)
        if self.pooled_residual:  # an absent modality's residual is zero: skipped where known
            if every_text is not False:
                out = out + self._residual(t_mean, has_text, has_image, self.text_residual, 0, out.dtype,
                                           every_text, every_image)
            if every_image is not False:
                out = out + self._residual(v_mean, has_image, has_text, self.image_residual, 1, out.dtype,
                                           every_image, every_text)
        out = F.normalize(out, dim=-1)
        v_private = v_mean
        if self.private is not None and self.private.gem_p != 1.0 and every_image is not False:
            v_private = gem_pool(image_tokens, v_valid, self.private.gem_p)
        blocks = [b(m, has_text, has_image, kind=kind)
                  for b, m in ((self.private, v_private), (self.text_private, t_mean)) if b is not None]
        if self.cross_modal is not None:
            v_cross = None
            if every_image is not False:
                v_cross = (v_private if self.private is not None and self.private.gem_p == self.cross_modal.gem_p
                           else gem_pool(image_tokens, v_valid, self.cross_modal.gem_p))
            blocks.append(self.cross_modal(t_mean, v_cross, has_text, has_image, kind=kind))
        if blocks:
            out = F.normalize(torch.cat([out.float(), *blocks], dim=-1), dim=-1)
        return out

    def _residual(self, mean: torch.Tensor, present: torch.Tensor, other: torch.Tensor,
                  proj: nn.Linear, slot: int, dtype: torch.dtype, every: bool | None = None,
                  every_other: bool | None = None) -> torch.Tensor:
        """``(B, d)``: gain * sqrt(d) * unit(proj(mean)), ``mean`` float32 (B, H) the masked mean of
        the raw tokens; zero rows where absent.

        ``other``: bool (B,), the other modality's presence; with ``solo_gains`` the rows without
        it take ``solo_gain[slot]`` instead of ``residual_gain[slot]``. ``every``: True when every
        row has the modality, ``every_other`` True / False when every row has / lacks the other one
        (``forward``'s ``kind``); None: read ``present`` / ``other`` per row."""
        r = F.normalize(proj(mean), dim=-1) * math.sqrt(proj.out_features)
        gain = self.residual_gain[slot]
        if self.solo_gains:
            if every_other is None:
                gain = torch.where(other, gain, self.solo_gain[slot])[:, None]
            elif not every_other:
                gain = self.solo_gain[slot]
        if every is None:
            r = r * present[:, None].to(r.dtype)
        return (r * gain).to(dtype)


# forward's ``kind`` → (every row has text, every row has an image); None: read per row
_UNIFORM = {None: (None, None), "text": (True, False), "image": (False, True), "text+image": (True, True)}


def _rows(x: torch.Tensor, present: torch.Tensor, every: bool | None) -> torch.Tensor:
    """The rows of ``x`` where ``present``: all of them (``every`` True) or selected per row (None)."""
    return x[present] if every is None else x


def _put_rows(base: torch.Tensor, present: torch.Tensor, every: bool | None, rows: torch.Tensor) -> torch.Tensor:
    """``base (B, d)`` with its ``present`` rows replaced by ``rows (Bp, d)``: ``rows`` itself when
    every row is present (``every`` True)."""
    if every:
        return rows.to(base.dtype)
    base = base.clone()
    base[present] = rows.to(base.dtype)
    return base
