"""`slimvit predict MODEL PATH...`: classify image files and folders with a deployed ONNX model.

The edge path: onnxruntime + numpy + Pillow only; this module never imports torch (a test checks
`sys.modules`). The classes, input size and normalisation come from the metadata inside the ONNX
file, and the pixels go through the same `preprocess` functions as every accuracy slimvit reports.
An image that cannot be decoded is reported and skipped; the exit code is then 1.
"""

from __future__ import annotations

import csv
import io
import logging
import sys
from pathlib import Path

import numpy as np

from slimvit import runtime
from slimvit.errors import DataError
from slimvit.io import atomic_write_json, atomic_write_text
from slimvit.preprocess import IMAGE_EXTENSIONS, ImageDecodeError, load_rgb, normalize

log = logging.getLogger(__name__)

BATCH = 32


def collect(paths: list[str | Path]) -> list[Path]:
    """Image files named directly, plus every image file under named folders (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(
                q
                for q in p.rglob("*")
                if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS and not q.name.startswith(".")
            )
            if not found:
                raise DataError(f"folder '{p}' has no images ({', '.join(IMAGE_EXTENSIONS)})")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"'{p}' does not exist")
    return out


def predict_files(
    model: str | Path, paths: list[str | Path], threads: int = 2
) -> tuple[list[dict], list[dict]]:
    """Predictions for every decodable image, and the files that could not be decoded.

    Returns:
        (results, failed): results are ``{"path", "class", "confidence", "probs"}`` in input order;
        failed are ``{"path", "error"}``.
    """
    sess = runtime.session(model, threads)
    meta = runtime.metadata(sess)
    size = int(meta["input_size"][-1])
    classes = list(meta["classes"])
    files = collect(paths)
    results, failed = [], []
    for i in range(0, len(files), BATCH):
        chunk, pixels = [], []
        for f in files[i : i + BATCH]:
            try:
                pixels.append(load_rgb(f, size))
                chunk.append(f)
            except ImageDecodeError as e:
                failed.append({"path": str(f), "error": str(e)})
        if not chunk:
            continue
        probs = runtime.softmax(
            runtime.run_logits(sess, normalize(np.stack(pixels), meta["mean"], meta["std"]))
        )
        for f, p in zip(chunk, probs, strict=True):
            k = int(p.argmax())
            results.append(
                {
                    "path": str(f),
                    "class": classes[k],
                    "confidence": float(p[k]),
                    "probs": {c: float(v) for c, v in zip(classes, p, strict=True)},
                }
            )
    return results, failed


def to_csv(results: list[dict]) -> str:
    buf = io.StringIO()
    classes = list(results[0]["probs"]) if results else []
    w = csv.writer(buf)
    w.writerow(["path", "class", "confidence", *(f"p_{c}" for c in classes)])
    for r in results:
        w.writerow(
            [r["path"], r["class"], f"{r['confidence']:.6f}", *(f"{r['probs'][c]:.6f}" for c in classes)]
        )
    return buf.getvalue()


def main(
    model: str, paths: list[str], json_path: str | None = None, csv_path: str | None = None, threads: int = 2
) -> int:
    from rich.console import Console
    from rich.table import Table

    results, failed = predict_files(model, paths, threads)
    console = Console()
    table = Table("image", "class", "confidence")
    for r in results:
        table.add_row(r["path"], r["class"], f"{r['confidence']:.3f}")
    console.print(table)
    if json_path:
        atomic_write_json(json_path, {"model": str(model), "predictions": results, "failed": failed})
    if csv_path:
        atomic_write_text(csv_path, to_csv(results))
    for f in failed:
        print(f"error: {f['error']}", file=sys.stderr)
    console.print(
        f"{len(results)} images classified" + (f", {len(failed)} could not be decoded" if failed else "")
    )
    return 1 if failed else 0
