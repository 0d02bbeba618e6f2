"""Image preprocessing shared by training, evaluation and the edge `predict` path.

numpy + Pillow only: `slimvit predict` imports this module without importing torch, and the
evaluation images of every stage go through the very same function, so an accuracy measured by
`slimvit bench` and a prediction made by `slimvit predict` see identical pixels.

What `load_rgb` does with images that are not plain 8-bit RGB or grayscale:

- **16-bit grayscale** (PNG/TIFF, Pillow modes ``I;16*``; 32-bit integer mode ``I`` holding 0..65535):
  scaled to 8 bits, 0..65535 -> 0..255 (``round(v / 257)``), never clipped.
- **Transparency** (RGBA, LA, palette or colour-key transparency): composited on a white background
  (`BACKGROUND`) before resizing, so fully transparent pixels read as white, not as whatever colour
  they happen to store.
- **Floating-point images** (mode ``F``) and integer images outside 0..65535 have no standard range:
  refused.
- **More than `MAX_PIXELS` pixels**: refused from the header, before anything is decoded (a
  decompression-bomb guard: a 12 KB PNG can hold 10000 x 10000 pixels, 300 MB once decoded).

A refused or unreadable file raises `ImageDecodeError` with one line naming the file and the reason.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from slimvit.errors import first_line

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

MAX_PIXELS = 50_000_000
"""Largest image (width x height) slimvit decodes: about 7000 x 7000, 150 MB as 8-bit RGB. Larger files
are refused before decoding."""

BACKGROUND = (255, 255, 255)
"""RGB colour that transparent images are composited on (white)."""

# Pillow warns from its own, higher limit (89 M pixels) when it opens a large file; every such image
# is over MAX_PIXELS and refused with slimvit's own message, so the warning would only repeat it.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageDecodeError(Exception):
    """An image file that cannot be decoded (or is refused); the message is one line."""


def load_rgb(path: str | Path, size: int) -> np.ndarray:
    """Decode `path` and resize it to (size, size) RGB uint8 (H, W, 3) with bilinear filtering.

    16-bit images are scaled to 8 bits and transparent ones composited on `BACKGROUND` first (see the
    module docstring).
    """
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise ImageDecodeError(_too_large(path, f"{w} x {h} = {w * h:,} pixels"))
            rgb = _to_rgb8(im, path)
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8).copy()
    except Image.DecompressionBombError:
        raise ImageDecodeError(_too_large(path, "larger than that")) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageDecodeError(f"cannot decode image '{path}': {first_line(e)}") from None


def open_rgb(path: str | Path) -> Image.Image:
    """The image at its own size as the model sees it (16-bit scaled, transparency composited, RGB):
    what a heatmap or a thumbnail is drawn over."""
    with Image.open(path) as im:
        return _to_rgb8(im, path)


def _to_rgb8(im: Image.Image, path: str | Path) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB: 16-bit data scaled, transparency composited on BACKGROUND."""
    if im.mode in _SIXTEEN_BIT_MODES or im.mode == "I":
        a = np.asarray(im).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ImageDecodeError(
                f"cannot decode image '{path}': 32-bit integer pixels outside 0..65535; "
                "save it as 8- or 16-bit"
            )
        return Image.fromarray(((a + 128) // 257).astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":
        raise ImageDecodeError(
            f"cannot decode image '{path}': floating-point pixels have no standard range; "
            "save it as 8- or 16-bit"
        )
    if im.has_transparency_data:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _too_large(path: str | Path, what: str) -> str:
    return (
        f"image '{path}' is {what}, over slimvit's limit of {MAX_PIXELS:,} pixels "
        "(a decompression-bomb guard, preprocess.MAX_PIXELS); downscale it"
    )


def normalize(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W), scaled to [0, 1] then standardised."""
    x = images.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
