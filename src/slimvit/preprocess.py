"""Image preprocessing shared by training, evaluation and the edge `predict` path.

numpy + Pillow only: `slimvit predict` imports this module without importing torch, and the
evaluation images of every stage go through the very same function, so an accuracy measured by
`slimvit bench` and a prediction made by `slimvit predict` see identical pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class ImageDecodeError(Exception):
    """An image file that cannot be decoded."""


def load_rgb(path: str | Path, size: int) -> np.ndarray:
    """Decode `path` and resize it to (size, size) RGB uint8 (H, W, 3) with bilinear filtering."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8).copy()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
        raise ImageDecodeError(f"cannot decode image '{path}': {e}") from None


def normalize(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W), scaled to [0, 1] then standardised."""
    x = images.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
