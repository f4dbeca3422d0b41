"""Image decoding and preprocessing with Pillow + numpy (no torchvision).

``load_image`` turns bytes / a path / a PIL image into an RGB ``PIL.Image`` with EXIF
orientation applied, RGBA / LA / P (transparency composited on white), grayscale and CMYK
converted, and a pixel-count limit checked *before* decoding (decompression-bomb guard).
``ImagePreprocessor`` resizes the shorter side, centre-crops and normalises to
``float32 (3, S, S)``. Source: our choice, following the backbones' own preprocessing.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from engine.model.errors import ImageDecodeError, ImageTooLargeError

ImageSource = Union[bytes, bytearray, memoryview, str, Path, Image.Image]

# 40 megapixels: far above any product photo, far below a decompression bomb. Our choice.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000


def load_image(source: ImageSource, *, index: int | None = None,
               max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode ``source`` into an RGB image.

    Args:
        source: encoded image bytes, a file path, or a ``PIL.Image``.
        index: sample index reported in errors.
        max_pixels: width * height limit, checked from the header before decoding.

    Returns:
        ``PIL.Image`` in mode ``"RGB"``, EXIF orientation applied.

    Raises:
        ImageDecodeError: file missing, unreadable, truncated, or not an image.
        ImageTooLargeError: more than ``max_pixels`` pixels.
    """
    if isinstance(source, Image.Image):
        image = source
        _check_pixels(image, index, max_pixels)
    else:
        image = _open(source, index)
        _check_pixels(image, index, max_pixels)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image.load()
        except Image.DecompressionBombError as exc:
            raise ImageTooLargeError(str(exc), index) from exc
        except (OSError, ValueError, SyntaxError) as exc:  # truncated / corrupt data
            raise ImageDecodeError(f"cannot decode image: {exc}", index) from exc
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not lose the photo; our choice
        pass
    return to_rgb(image)


def _open(source: ImageSource, index: int | None) -> Image.Image:
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageDecodeError("image bytes are empty", index)
        stream = io.BytesIO(bytes(source))
        what = f"{len(source)} image bytes"
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ImageDecodeError(f"image file not found: {path}", index)
        stream = path
        what = str(path)
    else:
        raise ImageDecodeError(f"unsupported image type {type(source).__name__}", index)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(stream)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(str(exc), index) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"not a decodable image ({what}): {exc}", index) from exc


def _check_pixels(image: Image.Image, index: int | None, max_pixels: int) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})", index)
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}", index)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; transparency is composited on white (our choice)."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() or 1.0
        image = Image.fromarray((array * (255.0 / peak)).clip(0, 255).astype(np.uint8), "L")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, F


@dataclass(frozen=True)
class ImagePreprocessor:
    """Resize (shorter side) → centre crop → scale to [0, 1] → normalise.

    Attributes:
        image_size: crop side S in pixels.
        resize_size: shorter side after resizing, in pixels (>= image_size).
        mean, std: per-channel normalisation on [0, 1] values.
    """

    image_size: int = 224
    resize_size: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """``PIL.Image`` (RGB) → ``torch.float32 (3, S, S)``.

        The centre square that "resize the shorter side to ``resize_size``, crop ``S``" would
        keep is cut from the original first and then resized, so memory stays bounded by the
        input even for extreme aspect ratios (a 1 x 40,000 strip does not become 224 x 9M).
        """
        image = to_rgb(image)
        width, height = image.size
        side = min(width, height) * self.image_size / self.resize_size  # crop side in source pixels
        left, top = (width - side) / 2, (height - side) / 2
        image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC,
                             box=(left, top, left + side, top + side))
        array = np.asarray(image, dtype=np.float32) / 255.0  # (S, S, 3)
        array = (array - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))

    def as_dict(self) -> dict:
        return {"image_size": self.image_size, "resize_size": self.resize_size,
                "mean": list(self.mean), "std": list(self.std)}
