"""Augmented photo views: a catalogue photo as a shopper would take it (issue 12, item 1).

One seeded albumentations pipeline (Buslaev et al., "Albumentations", Information 2020), in
this order (parameters in ``AugmentConfig``, all our choice):

1. random resized crop back to the input size (area 60-100 %, aspect 3/4-4/3): a tighter or
   shifted framing;
2. horizontal flip (p 0.5): a mirrored photo;
3. small rotation (±10°, white fill: product photos sit on white);
4. brightness / contrast / saturation jitter (factors 0.7-1.3, p 0.8; hue untouched, colour
   is what shoppers search by);
5. down-scaling (to 40-80 % of the size and back, p 0.5): a low-resolution photo;
6. JPEG re-compression at low quality (25-60, p 0.8).

The same ``(seed, photo name, view index)`` always gives the same pixels (``view_seed``), so
a token cache of augmented views is reproducible. Used for the query side of training only;
the item side keeps the clean catalogue photo.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import PurePath

import numpy as np
from PIL import Image

# Augmented views kept per training photo by the token cache (engine.tokens.augment_cache); our
# choice: 3 views triple the query-side image cache, enough for a new view most epochs.
DEFAULT_AUGMENT_VIEWS = 3


@dataclass(frozen=True)
class AugmentConfig:
    """Parameters of the photo augmentation (our choice; module docstring gives the order).

    crop_scale: area fraction of the random resized crop; crop_ratio: its aspect range.
    flip_p: horizontal flip probability. rotate_deg: rotation limit in degrees (±).
    jitter: brightness / contrast / saturation factor range is ``1 ± jitter``; jitter_p: its probability.
    downscale: size fraction range of down-then-up scaling; downscale_p: its probability.
    jpeg_quality: JPEG quality range of re-compression; jpeg_p: its probability.
    """

    crop_scale: tuple[float, float] = (0.6, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4 / 3)
    flip_p: float = 0.5
    rotate_deg: float = 10.0
    jitter: float = 0.3
    jitter_p: float = 0.8
    downscale: tuple[float, float] = (0.4, 0.8)
    downscale_p: float = 0.5
    jpeg_quality: tuple[int, int] = (25, 60)
    jpeg_p: float = 0.8

    def as_dict(self) -> dict:
        """Plain dict (JSON-able), for cache keys and reports."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def view_seed(seed: int, photo: str, view: int) -> int:
    """Seed of augmented view ``view`` of ``photo``: sha256 of ``(seed, file name, view)`` → int in [0, 2^31).

    The file name, not the full path, so a catalogue moved to another folder gets the same views.
    """
    text = f"{int(seed)}|{PurePath(str(photo)).name}|{int(view)}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") >> 1


def _pipeline(config: AugmentConfig, height: int, width: int, seed: int):
    import albumentations as A  # imported here: serving never needs it
    import cv2

    j = config.jitter
    return A.Compose([
        A.RandomResizedCrop(size=(height, width), scale=config.crop_scale, ratio=config.crop_ratio, p=1.0),
        A.HorizontalFlip(p=config.flip_p),
        A.Rotate(limit=config.rotate_deg, border_mode=cv2.BORDER_CONSTANT, fill=255, p=1.0),
        A.ColorJitter(brightness=(1 - j, 1 + j), contrast=(1 - j, 1 + j), saturation=(1 - j, 1 + j),
                      hue=(0.0, 0.0), p=config.jitter_p),
        A.Downscale(scale_range=config.downscale, p=config.downscale_p),
        A.ImageCompression(compression_type="jpeg", quality_range=config.jpeg_quality, p=config.jpeg_p),
    ], seed=int(seed))


def augment_photo(image: Image.Image, seed: int, config: AugmentConfig | None = None) -> Image.Image:
    """One augmented view of ``image``, a pure function of ``(image, seed, config)``.

    Args:
        image: ``PIL.Image`` (any mode Pillow converts to RGB; ``engine.model.images.load_image``
            gives one).
        seed: view seed (``view_seed``).
        config: ``AugmentConfig``; None: the defaults.
    Returns:
        ``PIL.Image`` mode ``"RGB"``, the same size as ``image``.
    Raises:
        ValueError: an empty image (0 pixels).
    """
    if image.width == 0 or image.height == 0:
        raise ValueError(f"cannot augment an empty image ({image.width}x{image.height})")
    pixels = np.asarray(image.convert("RGB"))  # uint8 (H, W, 3)
    out = _pipeline(config or AugmentConfig(), image.height, image.width, seed)(image=pixels)["image"]
    return Image.fromarray(np.ascontiguousarray(out), mode="RGB")
