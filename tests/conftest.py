from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
NEU_DET = Path(os.environ.get("SLIMVIT_TEST_DATA", ROOT.parent / "shared" / "datasets" / "NEU-DET"))


@pytest.fixture(autouse=True)
def _torch_threads():
    """Tests run on 2 cores; keep torch from oversubscribing when pytest runs alongside other work."""
    import torch

    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def neu_det() -> Path:
    if not (NEU_DET / "IMAGES").is_dir():
        pytest.skip(f"real NEU-DET copy not found at {NEU_DET}")
    return NEU_DET


def write_image(path: Path, seed: int, size: int = 24, ext: str = ".jpg") -> Path:
    """A small random grayscale-looking RGB image (JPEG, PNG, BMP or WebP by extension)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size, size), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).convert("RGB").save(path)
    return path


def make_imagefolder(root: Path, classes=("a", "b", "c"), per_class: int = 10, size: int = 24) -> Path:
    for ci, c in enumerate(classes):
        for i in range(per_class):
            write_image(root / c / f"{c}_{i}.png", seed=ci * 1000 + i, size=size, ext=".png")
    return root
