"""Image-private block of the output vector: whitened photo features beside the fused vector
(our choice, issue 12 items 1 and 4).

Why: a photo query meets the item tower's fused vector F, which mixes the title into the photo.
Measured over the 11,882 fashion products (docs/results.md, "Image-private block"), the trained
F of an augmented test photo finds its own product at rank 1 about 6 times in 10, while the
learned whitening of the raw EfficientNet features alone (``engine.training.whitening``) does
it about 9 times in 10: the towers learn what the cross-modal losses reward (type, colour) and,
for products they did not train on, lose the instance detail that tells two photos apart.

What: each tower's output becomes ``unit([F, g * P])``, width ``d + p``:

- ``F`` (``d``): the fusion encoder's unit vector, unchanged;
- ``P`` (``p``): a unit vector. A row with a photo: ``[unit(W mean(raw image tokens) + b), 0]``,
  ``W (p - 1, H)`` the learned whitening fitted in closed form on (clean, augmented) training
  photos after the towers have trained (``engine.training.whitening``), never trained itself;
  a row without a photo: ``e_null``, the last unit axis, which no photo
  vector uses (so an item without a photo keeps the same scale on F as one with a photo);
- ``g``: a fixed gain per presence pattern ``(text only, image only, text + image)``. Item tower:
  ``(b, b, b)``; query tower: ``(0, a_image, a_both)``.

Consequences, exact: a text-only query has ``P = 0``, so its scores are ``F_q . F_i / sqrt(1 + b^2)``
for every item, photo or not: text-query rankings are those of F alone. A query with a photo
adds ``a * b * P_q . P_i`` to the score of every item with a photo (and 0 to items without).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ImagePrivateBlock(nn.Module):
    """``g * P`` of the module docstring, ``float32 (B, p)``.

    Args:
        image_hidden: image backbone width H. dim: block width ``p`` (≥ 2; the last axis is ``e_null``).
        gains: ``(text only, image only, text + image)`` gains, each ≥ 0.
    Raises:
        ValueError: ``dim < 2`` or a negative gain.
    The projection is a pair of buffers, zero until ``set_projection``; it is never trained.
    """

    def __init__(self, image_hidden: int, dim: int, gains: tuple[float, float, float]):
        super().__init__()
        gains = tuple(float(g) for g in gains)
        if dim < 2:
            raise ValueError(f"the image-private block needs dim >= 2 (a photo part and e_null), got {dim}")
        if len(gains) != 3 or min(gains) < 0:
            raise ValueError(f"image-private gains must be 3 values >= 0 (text only, image only, both), got {gains}")
        self.register_buffer("weight", torch.zeros(dim - 1, image_hidden))
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

    def forward(self, image_mean: torch.Tensor, has_text: torch.Tensor, has_image: torch.Tensor) -> torch.Tensor:
        """``image_mean`` float (B, H): masked mean of the raw image-backbone tokens (any value on
        rows without a photo); ``has_text`` / ``has_image`` bool (B,). Returns float32 (B, p)."""
        b = has_image.shape[0]
        photo = F.normalize(image_mean.float() @ self.weight.float().T + self.bias.float(), dim=-1)
        photo = torch.cat([photo, torch.zeros(b, 1, dtype=photo.dtype, device=photo.device)], dim=-1)
        null = torch.zeros_like(photo)
        null[:, -1] = 1.0
        p = torch.where(has_image[:, None], photo, null)
        g = self.gains.float()
        gain = torch.where(has_image, torch.where(has_text, g[2], g[1]), g[0])
        return p * gain[:, None]
