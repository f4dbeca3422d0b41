"""The cross-modal block of the output vector: canonical correlation analysis of the raw
backbone features, for items that lack a modality (our choice, issue 12 items 4 and 5).

Why: a text query against photo-only items (t2i), a photo query against title-only items
(i2t) and a photo + text query against photo-only items (m2i) meet the other modality only
through the fusion encoder's shared space, trained from scratch for a few hundred steps: t2i /
i2t Recall@1 14.70 / 14.10 % on the 2,000 test products, below the trained linear two-tower
(16.50 / 15.20). Canonical correlation analysis (Hotelling, "Relations between two sets of
variates", Biometrika 1936; regularised as in Vinod, J. Econometrics 1976) of the same frozen
backbone features, fitted in closed form on the training products' (title or attribute
phrase, photo) pairs (``engine.training.cross_fit``), pairs texts with photos far better on its
own (docs/results.md "The cross-modal block").

What: both towers' outputs gain a block of width ``p = 2k + 2``: slot A (``k`` and a null
axis), slot B (``k`` and a null axis); ``e_null`` below is the unit vector with ``1/sqrt(2)`` on
both null axes (``p`` even, so the recipe's 640-wide vectors grow to 896 = 8 x 112 and keep the
index's PQ ``m = d/8``). ``c_t = unit(W_t (unit(mean of the raw text tokens) - mu_t))`` and
``c_v = unit(W_v (GeM(raw photo tokens) - mu_v))`` are the canonical variates (``k`` wide), in
one space where a title and its photo point the same way.

============  ====================  ====================
presence      query tower           item tower
============  ====================  ====================
text only     ``a_t [c_t, 0]``      ``b [0, c_t]``
photo only    ``a_v [0, c_v]``      ``b [c_v, 0]``
text + photo  ``a_m [c_m, c_m]``    ``b e_null``
============  ====================  ====================

(``[A, B]``: the slots' variates; every null axis 0 but in ``e_null``)

with ``c_m = unit(c_t + c_v) / sqrt(2)`` (each row's block has norm of its gain). Consequences, exact:

- an item with both modalities carries ``e_null``, which no query uses: every ranking over such
  items (the fashion catalogue as indexed, the robustness and composed queries, t2m, i2m, m2m)
  is the one without the block; ``e_null`` keeps every item's norm the same;
- slot A pairs text (or text + photo) queries with photo-only items, slot B photo (or text +
  photo) queries with title-only items: a text query against title-only items (t2t) and a photo
  query against photo-only items (i2i) are unchanged too;
- t2i adds ``a_t b c_t . c_v``, i2t ``a_v b c_v . c_t``, m2i ``a_m b c_m . c_v`` and m2t
  ``a_m b c_m . c_t`` to the fused vectors' scores (before the output's normalisation).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.private_block import gain_slot, row_gains

ROLES = ("query", "item")


class CrossBlock(nn.Module):
    """The cross-modal block of the module docstring, ``float32 (B, p)``.

    Args:
        text_hidden / image_hidden: backbone widths Ht / Hi. dim: block width ``p = 2k + 2``
            (even, ≥ 4). gains: ``(text only, photo only, text + photo)``, each ≥ 0; the item tower
            passes one gain three times. role: "query" or "item" (the table above). gem_p: GeM
            exponent of the photo features (``engine.model.fusion.gem_pool``; 1: the masked mean).
    Raises:
        ValueError: an odd or too small ``dim``, a negative gain, an unknown role or ``gem_p < 1``.
    The projections are buffers, zero until ``set_projection``; they are never trained.
    """

    def __init__(self, text_hidden: int, image_hidden: int, dim: int, gains: tuple[float, float, float],
                 role: str, gem_p: float = 2.0):
        super().__init__()
        if role not in ROLES:
            raise ValueError(f"cross block role must be one of {ROLES}, got {role!r}")
        if dim < 4 or dim % 2:
            raise ValueError(f"the cross block needs an even dim >= 4 (two slots of k and a null axis), got {dim}")
        gains = tuple(float(g) for g in gains)
        if len(gains) != 3 or min(gains) < 0:
            raise ValueError(f"cross block gains must be 3 values >= 0 (text only, photo only, both), got {gains}")
        if not float(gem_p) >= 1.0:
            raise ValueError(f"cross block gem_p must be >= 1, got {gem_p}")
        self.role = role
        self.gem_p = float(gem_p)
        k = dim // 2 - 1
        self.register_buffer("text_center", torch.zeros(text_hidden))
        self.register_buffer("text_weight", torch.zeros(k, text_hidden))
        self.register_buffer("image_center", torch.zeros(image_hidden))
        self.register_buffer("image_weight", torch.zeros(k, image_hidden))
        self.register_buffer("gains", torch.tensor(gains))

    @property
    def k(self) -> int:
        """Width of one slot (the canonical variates kept)."""
        return self.text_weight.shape[0]

    @property
    def dim(self) -> int:
        return 2 * self.k + 2

    @torch.no_grad()
    def set_projection(self, text_center, text_weight, image_center, image_weight) -> None:
        """Set ``mu_t (Ht,)``, ``W_t (k, Ht)``, ``mu_v (Hi,)``, ``W_v (k, Hi)`` (numpy or torch).
        Raises ValueError on a shape mismatch."""
        for name, value in (("text_center", text_center), ("text_weight", text_weight),
                            ("image_center", image_center), ("image_weight", image_weight)):
            value = torch.as_tensor(value)
            buf = getattr(self, name)
            if tuple(value.shape) != tuple(buf.shape):
                raise ValueError(f"cross block {name} must be {tuple(buf.shape)}, got {tuple(value.shape)}")
            buf.copy_(value.to(buf.dtype))

    def text_variates(self, text_mean: torch.Tensor) -> torch.Tensor:
        """``c_t``, float32 (B, k), from the masked mean of the raw text tokens, float (B, Ht)."""
        x = F.normalize(text_mean.float(), dim=-1) - self.text_center.float()
        return F.normalize(x @ self.text_weight.float().T, dim=-1)

    def image_variates(self, image_pooled: torch.Tensor) -> torch.Tensor:
        """``c_v``, float32 (B, k), from the GeM-pooled raw photo tokens, float (B, Hi)."""
        x = image_pooled.float() - self.image_center.float()
        return F.normalize(x @ self.image_weight.float().T, dim=-1)

    def forward(self, text_mean: torch.Tensor | None, image_pooled: torch.Tensor | None, has_text: torch.Tensor,
                has_image: torch.Tensor, kind: str | None = None) -> torch.Tensor:
        """``text_mean`` float (B, Ht): masked mean of the raw text tokens; ``image_pooled`` float (B, Hi):
        their GeM (``gem_p``) for the photo tokens (any value on rows without the modality; None
        allowed when ``kind`` says no row has it). ``has_text`` / ``has_image`` bool (B,). ``kind``:
        None, or "text" | "image" | "text+image" when every row has that presence. Returns float32 (B, p).

        Raises:
            ValueError: an unknown ``kind``.
        """
        slot = gain_slot(kind)
        b = has_text.shape[0]
        g = self.gains.float()
        rows = {}
        null_only = kind == "text+image" and self.role == "item"  # e_null alone: no variates to compute
        if kind in (None, "text", "text+image") and not null_only:
            rows["t"] = self.text_variates(text_mean)
        if kind in (None, "image", "text+image") and not null_only:
            rows["v"] = self.image_variates(image_pooled)
        if kind is not None:
            return self._content(kind, rows, b, g.device) * g[slot]
        out = torch.where(has_image[:, None], torch.where(has_text[:, None], self._content("text+image", rows, b, g.device),
                                                          self._content("image", rows, b, g.device)),
                          self._content("text", rows, b, g.device))
        return out * row_gains(g, has_text, has_image)[:, None]

    def _content(self, kind: str, rows: dict, b: int, device) -> torch.Tensor:
        """The unscaled block of ``b`` rows as if all had ``kind``'s presence (the table above)."""
        zero, null = torch.zeros(b, self.k, device=device), torch.zeros(b, 1, device=device)
        if kind == "text+image" and self.role == "item":
            half = torch.full((b, 1), _HALF, device=device)
            return torch.cat([zero, half, zero, half], dim=-1)
        if kind == "text+image":
            mixed = F.normalize(rows["t"] + rows["v"], dim=-1) * _HALF
            a, c = mixed, mixed
        else:
            own = rows["t" if kind == "text" else "v"]
            query_side = (kind == "text") == (self.role == "query")  # slot A: text queries, photo-only items
            a, c = (own, zero) if query_side else (zero, own)
        return torch.cat([a, null, c, null], dim=-1)


_HALF = 0.5 ** 0.5  # c_m in two slots, e_null on two axes: unit norm in all
