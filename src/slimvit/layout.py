"""What a run folder's shared files are called, and the ones written as arrays (torch-free: the deploy
step, the report and the edge path read them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slimvit.io import atomic_path

BENCH = "bench.json"
LOGITS = "bench_logits.npz"
"""Every variant's logits on the validation and test images (float32 arrays named `<split>|<key>`, no
pickle): the report lists the deployed model's mistakes with their confidence from them."""


def write_logits(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


def read_logits(path: Path, split: str, key: str) -> np.ndarray | None:
    """One variant's logits on a split, or None when the file (or that variant) is not there."""
    try:
        with np.load(path, allow_pickle=False) as z:
            name = f"{split}|{key}"
            return z[name] if name in z.files else None
    except (OSError, ValueError):
        return None
