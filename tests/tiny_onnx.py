"""A tiny slimvit-style ONNX classifier built with onnx.helper (no torch), and a few images for it.

Tests use it for the edge path; `.ci/run` runs it as a script to give a fresh core-only venv a model:

    python tests/tiny_onnx.py DIR   # writes DIR/deploy/model.onnx and DIR/imgs/*.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

CLASSES = ["dark", "mid", "bright"]
SIZE = 32


def write_tiny_onnx(
    path: str | Path,
    classes: list[str] = CLASSES,
    size: int = SIZE,
    n_outputs: int | None = None,
    meta: dict | None = None,
    raw_meta: str | None = None,
) -> Path:
    """(N, 3, size, size) -> GlobalAveragePool -> Gemm -> (N, n_outputs) logits.

    The weights make the class follow the mean brightness of the normalised image: with CLASSES, dark
    images are 'dark', bright ones 'bright'. `meta` overrides metadata fields; `raw_meta` replaces the
    whole JSON string.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from slimvit import runtime

    k = n_outputs if n_outputs is not None else len(classes)
    centers = np.linspace(-1.5, 1.5, k, dtype=np.float32)  # logit_j = -(m - c_j)^2 + const, as a Gemm
    w = np.tile((2 * centers / 3)[None, :], (3, 1)).astype(np.float32)  # (3, K): sum over channels / 3
    b = (-(centers**2)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "W", "B"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", k])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    fields = {
        "stage": "pruned",
        "precision": "fp32",
        "name": "tiny",
        "classes": list(classes),
        "input_size": [3, size, size],
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        **(meta or {}),
    }
    runtime.embed_metadata(model, fields)
    if raw_meta is not None:
        model.metadata_props[-1].value = raw_meta
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def write_gray(path: str | Path, level: int, size: int = 40) -> Path:
    """A flat gray PNG (0..255) with a little noise."""
    from PIL import Image

    rng = np.random.default_rng(level)
    arr = np.clip(level + rng.integers(-5, 6, (size, size)), 0, 255).astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def expected_class(level: int) -> str:
    """The class write_tiny_onnx's default model gives a flat image of this gray level."""
    m = (level / 255 - 0.5) / 0.25
    centers = np.linspace(-1.5, 1.5, len(CLASSES))
    return CLASSES[int(np.argmin((m - centers) ** 2))]


if __name__ == "__main__":
    out = Path(sys.argv[1])
    write_tiny_onnx(out / "deploy" / "model.onnx")
    levels = {"dark": 10, "mid": 128, "bright": 245}
    for name, level in levels.items():
        for i in range(4):
            write_gray(out / "imgs" / f"{name}_{i}.png", level + i)
    print(f"wrote {out / 'deploy' / 'model.onnx'} and {4 * len(levels)} images in {out / 'imgs'}")
