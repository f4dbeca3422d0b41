"""Image decoding and preprocessing on real and synthetic images."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from engine.model.errors import ImageDecodeError, ImageTooLargeError
from engine.model.images import ImagePreprocessor, load_image


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    out = load_image(_encode(image, "JPEG", exif=exif))
    assert out.size == (20, 40)


@pytest.mark.parametrize("mode,fmt", [("RGBA", "PNG"), ("L", "PNG"), ("CMYK", "JPEG"), ("P", "PNG"), ("LA", "PNG")])
def test_modes_are_converted_to_rgb(mode, fmt):
    out = load_image(_encode(Image.new(mode, (8, 8)), fmt))
    assert out.mode == "RGB" and out.size == (8, 8)


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(_encode(image, "PNG")).getpixel((0, 0)) == (255, 255, 255)


def test_real_photo_preprocesses_to_normalised_square(fashion_dir):
    image = load_image(fashion_dir / "images" / "1563.jpg")
    pre = ImagePreprocessor(image_size=224, resize_size=224, mean=(0.5,) * 3, std=(0.5,) * 3)
    pixels = pre(image)
    assert pixels.shape == (3, 224, 224) and pixels.dtype.is_floating_point
    assert -1.0 - 1e-6 <= float(pixels.min()) and float(pixels.max()) <= 1.0 + 1e-6


def test_non_square_photo_is_centre_cropped():
    image = Image.new("RGB", (300, 100), "blue")
    image.paste((255, 0, 0), (0, 0, 100, 100))  # red left third is cropped away
    pixels = ImagePreprocessor(image_size=32, resize_size=32, mean=(0, 0, 0), std=(1, 1, 1))(image)
    assert pixels.shape == (3, 32, 32)
    np.testing.assert_allclose(pixels[:, 16, 16].numpy(), [0, 0, 1], atol=0.02)


@pytest.mark.parametrize("source", [b"", b"\x89PNG garbage", "/definitely/missing.jpg"])
def test_undecodable_sources(source):
    with pytest.raises(ImageDecodeError):
        load_image(source, index=3)


def test_pixel_limit():
    with pytest.raises(ImageTooLargeError, match="over the limit"):
        load_image(_encode(Image.new("L", (200, 200)), "PNG"), max_pixels=100 * 100)


def test_extreme_aspect_ratio_stays_bounded():
    strip = Image.new("RGB", (1, 40_000), "green")
    pixels = ImagePreprocessor(image_size=224, resize_size=224, mean=(0, 0, 0), std=(1, 1, 1))(strip)
    assert pixels.shape == (3, 224, 224)
    np.testing.assert_allclose(pixels[:, 100, 100].numpy(), [0, 128 / 255, 0], atol=0.02)


def test_resize_larger_than_crop_keeps_the_centre():
    image = Image.new("RGB", (256, 256), "black")
    image.paste((255, 255, 255), (16, 16, 240, 240))  # white centre 224 px: the crop of a 256 → 224
    pixels = ImagePreprocessor(image_size=224, resize_size=256, mean=(0, 0, 0), std=(1, 1, 1))(image)
    assert float(pixels[:, 2:-2, 2:-2].min()) > 0.9
