"""Private blocks of the output vector: whitened backbone features beside the fused vector
(our choice, issue 12 items 1, 2 and 4). The image-private block carries the photo; the
text-private block (end of this docstring) carries the text.

Why: a photo query meets the item tower's fused vector F, which mixes the title into the photo.
Measured over the 11,882 fashion products (docs/results.md, "Image-private block"), the trained
F of an augmented test photo finds its own product at rank 1 about 6 times in 10, while the
learned whitening of the raw EfficientNet features alone (``engine.training.whitening``) does
it about 9 times in 10: the towers learn what the cross-modal losses reward (type, colour) and,
for products they did not train on, lose the instance detail that tells two photos apart.

What: each tower's output becomes ``unit([F, g * P])``, width ``d + p``:

- ``F`` (``d``): the fusion encoder's unit vector, unchanged;
- ``P`` (``p``): a unit vector. A row with a photo: ``[unit(W pool(raw image tokens) + b), 0]``
  (pool: the masked mean, or GeM for ``ModelConfig.image_private_gem_p`` > 1),
  ``W (p - 1, H)`` the learned whitening fitted in closed form on (clean, augmented) training
  photos after the towers have trained (``engine.training.whitening``), never trained itself;
  a row without a photo: ``e_null``, the last unit axis, which no photo
  vector uses (so an item without a photo keeps the same scale on F as one with a photo);
- ``g``: a fixed gain per presence pattern ``(text only, image only, text + image)``. Item tower:
  ``(b, b, b)``; query tower: ``(0, a_image, a_both)``.

Consequences, exact: a text-only query has ``P = 0``, so its scores are ``F_q . F_i / sqrt(1 + b^2)``
for every item, photo or not: text-query rankings are those of F alone. A query with a photo
adds ``a * b * P_q . P_i`` to the score of every item with a photo (and 0 to items without).

The **text-private block** is the same construction on the other modality: ``P`` is the unit
whitened masked mean of the raw text-backbone tokens (the sentence embedding a
sentence-transformers user computes), ``W`` fitted in closed form on (typed shopper query,
product title) training pairs (``engine.training.whitening.init_text_private``); rows without
text get ``e_null``. Why: training on attribute phrases teaches the text path type and colour and
loses the brand and rare title words (brand + type P@10 of the trained T 53.7 % against 61.1 % for
raw MiniLM titles, docs/results.md "The text-private block"). Query gains ``(a_text, 0, a_both)``:
a photo-only query ranks every item exactly as it did without the block.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


MODALITIES = ("image", "text")


class PrivateBlock(nn.Module):
    """``g * P`` of the module docstring, ``float32 (B, p)``.

    Args:
        hidden: backbone width H of ``modality``. dim: block width ``p`` (≥ 2; the last axis is ``e_null``).
        gains: ``(text only, image only, text + image)`` gains, each ≥ 0.
        modality: "image" (P from the photo; e_null on rows without one) or "text".
        gem_p: the GeM exponent of the pooled features ``forward`` is given (1: the masked mean;
            ``engine.model.fusion.gem_pool``), recorded for the fit (``engine.training.whitening``).
    Raises:
        ValueError: ``dim < 2``, a negative gain, ``gem_p < 1`` or an unknown modality.
    The projection is a pair of buffers, zero until ``set_projection``; it is never trained.
    """

    def __init__(self, hidden: int, dim: int, gains: tuple[float, float, float], modality: str = "image",
                 gem_p: float = 1.0):
        super().__init__()
        if not float(gem_p) >= 1.0:
            raise ValueError(f"{modality}-private gem_p must be >= 1, got {gem_p}")
        self.gem_p = float(gem_p)  # a plain attribute (from ModelConfig), not saved with the weights
        gains = tuple(float(g) for g in gains)
        if modality not in MODALITIES:
            raise ValueError(f"private block modality must be one of {MODALITIES}, got {modality!r}")
        if dim < 2:
            raise ValueError(f"the {modality}-private block needs dim >= 2 (a {modality} part and e_null), got {dim}")
        if len(gains) != 3 or min(gains) < 0:
            raise ValueError(f"{modality}-private gains must be 3 values >= 0 (text only, image only, both), got {gains}")
        self.modality = modality
        self.register_buffer("weight", torch.zeros(dim - 1, hidden))
        self.register_buffer("bias", torch.zeros(dim - 1))
        self.register_buffer("gains", torch.tensor(gains))

    @property
    def dim(self) -> int:
        return self.weight.shape[0] + 1

    @torch.no_grad()
    def set_projection(self, weight, bias) -> None:
        """Set ``W (p - 1, H)`` and ``b (p - 1,)`` (numpy or torch). Raises ValueError on a shape mismatch."""
        weight, bias = torch.as_tensor(weight), torch.as_tensor(bias)
        if tuple(weight.shape) != tuple(self.weight.shape) or tuple(bias.shape) != tuple(self.bias.shape):
            raise ValueError(f"projection must be {tuple(self.weight.shape)} + {tuple(self.bias.shape)}, "
                             f"got {tuple(weight.shape)} + {tuple(bias.shape)}")
        self.weight.copy_(weight.to(self.weight.dtype))
        self.bias.copy_(bias.to(self.bias.dtype))

    def forward(self, mean: torch.Tensor | None, has_text: torch.Tensor, has_image: torch.Tensor,
                kind: str | None = None) -> torch.Tensor:
        """``mean`` float (B, H): masked mean (GeM for ``gem_p`` > 1) of the raw backbone tokens of
        the block's modality (any value on rows without it; None allowed when ``kind`` says no row
        has it); ``has_text`` / ``has_image`` bool (B,). ``kind``: None, or "text" | "image" |
        "text+image" when every row has that presence (as ``FusionEncoder.forward``'s: the same
        output without per-row selections). Returns float32 (B, p).

        Raises:
            ValueError: an unknown ``kind``.
        """
        slot = gain_slot(kind)
        b = has_image.shape[0]
        g = self.gains.float()
        if kind is not None:  # every row alike: its modality present or not, one gain
            present = kind in (self.modality, "text+image")
            p = self._own(mean, b) if present else self._null(b, g.device)
            return p * g[slot]
        present = has_image if self.modality == "image" else has_text
        own = self._own(mean, b)
        p = torch.where(present[:, None], own, self._null(b, own.device).to(own.dtype))
        return p * row_gains(g, has_text, has_image)[:, None]

    def _own(self, mean: torch.Tensor, b: int) -> torch.Tensor:
        """``[unit(W mean + b), 0]``, float32 (B, p)."""
        own = F.normalize(mean.float() @ self.weight.float().T + self.bias.float(), dim=-1)
        return torch.cat([own, torch.zeros(b, 1, dtype=own.dtype, device=own.device)], dim=-1)

    def _null(self, b: int, device) -> torch.Tensor:
        """``e_null`` (the last unit axis) for ``b`` rows, float32 (B, p) (built without an indexed
        write, which an exported graph would carry as a ScatterND)."""
        return torch.cat([torch.zeros(b, self.dim - 1, device=device), torch.ones(b, 1, device=device)], dim=-1)


# a batch kind → the slot of ``gains`` its rows take (text only, image only, both)
_SLOTS = {None: None, "text": 0, "image": 1, "text+image": 2}


def gain_slot(kind: str | None) -> int | None:
    """The index into a fixed block's ``(text only, image only, both)`` gains of a batch ``kind``
    (None: per row). Raises ValueError for an unknown kind."""
    if kind not in _SLOTS:
        raise ValueError(f"kind must be one of {tuple(k for k in _SLOTS if k)} or None, got {kind!r}")
    return _SLOTS[kind]


def row_gains(gains: torch.Tensor, has_text: torch.Tensor, has_image: torch.Tensor) -> torch.Tensor:
    """Each row's gain, float (B,), from ``gains (3,)`` (text only, image only, both) and its presence flags."""
    return torch.where(has_image, torch.where(has_text, gains[2], gains[1]), gains[0])
