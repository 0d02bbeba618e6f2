"""`slimvit predict MODEL PATH...`: classify image files and folders with a deployed ONNX model.

The edge path: onnxruntime + numpy + Pillow (+ rich for the terminal table) only; this module never
imports torch (a test checks `sys.modules`, another runs it where torch cannot be imported). The
classes, input size and normalisation come from the metadata inside the ONNX file, and the pixels go
through the same `preprocess` functions as every accuracy slimvit reports.

MODEL is an ONNX file or a deploy folder (`runs/<name>/deploy/`: the file its `deploy.json` names, else
`model.onnx`). PATH `-` reads file paths from stdin, one a line, so `find ... | slimvit predict DIR -`
works. Images are decoded on `threads` threads while the previous batch runs. An image that cannot be
decoded is reported and skipped; the exit code is then 1 (`EXIT_CODES`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import sys
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slimvit import runtime
from slimvit.errors import DataError, ModelError
from slimvit.io import atomic_write_json, atomic_write_text
from slimvit.layout import DEPLOY_MODEL, DEPLOY_RECORD
from slimvit.preprocess import IMAGE_EXTENSIONS, ImageDecodeError, load_rgb, normalize

log = logging.getLogger(__name__)

BATCH = 32
"""Images per ONNX Runtime call (and decoded ahead of it)."""

EXIT_CODES = {
    0: "every image was classified",
    1: "some images could not be decoded (listed on stderr and in --json); the others were classified",
    2: "bad usage or a bad model (one line on stderr); nothing was classified",
}


@dataclass
class Prediction:
    """The outcome of one `classify` call."""

    results: list[dict] = field(default_factory=list)
    """``{"path", "class", "confidence", "probs"}`` (+ ``"top"`` for top_k > 1) per image, input order."""
    failed: list[dict] = field(default_factory=list)
    """``{"path", "error"}`` per file that could not be decoded."""
    seconds: float = 0.0
    """Decoding, preprocessing and inference of every file (the model load excluded)."""
    load_seconds: float = 0.0
    """Loading the model into ONNX Runtime."""
    notes: list[str] = field(default_factory=list)
    """What the call adapted (a --top-k larger than the classes), for the user."""

    @property
    def images_per_s(self) -> float:
        n = len(self.results) + len(self.failed)
        return n / self.seconds if self.seconds > 0 else 0.0


def resolve_model(path: str | Path) -> Path:
    """An ONNX file as given, or the model of a deploy folder: `deploy.json`'s "file" if it names an
    ONNX file there, else `model.onnx`."""
    p = Path(path)
    if not p.is_dir():
        return p
    name = DEPLOY_MODEL
    info = p / DEPLOY_RECORD
    if info.is_file():
        try:
            named = json.loads(info.read_text()).get("file")
        except (json.JSONDecodeError, OSError, AttributeError):
            raise ModelError(f"'{info}' is not a valid deploy record; run `slimvit bench` again") from None
        if isinstance(named, str) and named.lower().endswith(".onnx"):
            name = named
    model = p / name
    if not model.is_file():
        raise ModelError(
            f"model folder '{p}' has no {name}; pass an ONNX file or a deploy folder "
            "written by `slimvit bench` (runs/<name>/deploy/)"
        )
    return model


def collect(paths: Iterable[str | Path], skipped: list | None = None) -> list[Path]:
    """Image files named directly, plus every image file under named folders (sorted); the other files of
    those folders (not hidden ones) go to `skipped`."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            inside = sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
            found = [q for q in inside if q.suffix.lower() in IMAGE_EXTENSIONS]
            if skipped is not None:
                skipped += [q for q in inside if q.suffix.lower() not in IMAGE_EXTENSIONS]
            if not found:
                raise DataError(f"folder '{p}' has no images ({', '.join(IMAGE_EXTENSIONS)})")
            out += found
        else:  # a file, or a path that does not exist: listed as not decodable, the rest classified
            out.append(p)
    return out


def is_image_name(p: Path) -> bool:
    """In a folder and on stdin a file is an image by its extension; the others are skipped and counted,
    never a decode error (a file named as an argument is always tried)."""
    return p.suffix.lower() in IMAGE_EXTENSIONS


def read_path_lines(lines: Iterable[str]) -> list[Path]:
    """File paths, one a line (stdin of `slimvit predict MODEL -`). Blank lines and folders are
    skipped, so the output of `find DIR` can be piped in as it is; a path that does not exist is kept
    and reported as undecodable, like a corrupt file, so one vanished file does not stop a batch job."""
    out = []
    for line in lines:
        line = line.rstrip("\r\n")
        if line and not Path(line).is_dir():
            out.append(Path(line))
    return out


def gather(paths: list[str], stdin: Iterable[str] | None = None, skipped: list | None = None) -> list[Path]:
    """The files to classify: `collect` of PATH arguments, with `-` replaced by the stdin paths.

    A file named as an argument is always tried (a missing one is listed as not decodable); in a folder and
    on stdin, a file is an image by its name (`is_image_name`), and the others go to `skipped`: one rule
    for a listing and a folder alike."""
    files: list[Path] = []
    for p in paths:
        if p == "-":
            from_stdin = read_path_lines(stdin if stdin is not None else sys.stdin)
            if not from_stdin:
                raise DataError("'-' was given but stdin holds no file paths (one path a line)")
            named = [f for f in from_stdin if is_image_name(f)]
            if skipped is not None:
                skipped += [f for f in from_stdin if not is_image_name(f)]
            files += named
        else:
            files += collect([p], skipped)
    return files


def _decode(path: Path, size: int) -> np.ndarray | str:
    if not path.exists():
        return f"cannot decode image '{path}': it does not exist"
    try:
        return load_rgb(path, size)
    except ImageDecodeError as e:
        return str(e)


def classify(
    model: str | Path, files: list[Path], threads: int = 2, batch: int = BATCH, top_k: int = 1
) -> Prediction:
    """Classify `files` with `model` (file or deploy folder); decoding overlaps the previous batch's run."""
    t0 = time.perf_counter()
    run, meta = runtime.runner(resolve_model(model), threads)  # ONNX Runtime or OpenVINO, as deployed
    classes = list(meta["classes"])
    size = int(meta["input_size"][-1])
    out = Prediction(load_seconds=time.perf_counter() - t0)
    if top_k > len(classes):
        out.notes.append(
            f"--top-k {top_k} is more than the model's {len(classes)} classes; showing all {len(classes)}"
        )
        top_k = len(classes)
    t0 = time.perf_counter()
    chunks = [files[i : i + batch] for i in range(0, len(files), batch)]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:

        def submit(chunk: list[Path]) -> list[Future]:
            return [pool.submit(_decode, f, size) for f in chunk]

        ahead = submit(chunks[0]) if chunks else []
        for i, chunk in enumerate(chunks):
            current, ahead = ahead, (submit(chunks[i + 1]) if i + 1 < len(chunks) else [])
            ok, pixels = [], []
            for f, fut in zip(chunk, current, strict=True):
                got = fut.result()
                if isinstance(got, str):
                    out.failed.append({"path": str(f), "error": got})
                else:
                    ok.append(f)
                    pixels.append(got)
            if ok:
                probs = _probabilities(run, meta, np.stack(pixels))
                threshold = meta.get("review_threshold")
                out.results += [
                    _record(f, p, classes, top_k, threshold) for f, p in zip(ok, probs, strict=True)
                ]
    out.seconds = time.perf_counter() - t0
    return out


def _probabilities(run, meta: dict, pixels: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> class probabilities (N, classes) in one runtime call."""
    x = normalize(pixels, meta["mean"], meta["std"])
    # the calibrated confidence: the deploy step's temperature, fitted on validation (1.0: as the model says)
    probs = runtime.softmax(np.asarray(run(x), dtype=np.float32) / float(meta.get("temperature") or 1.0))
    if probs.shape[1] != len(meta["classes"]):  # a symbolic output width escapes `runtime.metadata`
        raise ModelError(
            f"the ONNX model's slimvit metadata field 'classes' names {len(meta['classes'])} classes "
            f"but the model outputs {probs.shape[1]} scores; re-export the model"
        )
    return probs


def _record(
    path: Path, p: np.ndarray, classes: list[str], top_k: int, threshold: float | None = None
) -> dict:
    """One image's prediction; with the deployed review threshold, `review` says whether it goes to a
    person (its calibrated confidence is below the threshold; the top class is kept all the same)."""
    k = int(p.argmax())
    r = {
        "path": str(path),
        "class": classes[k],
        "confidence": float(p[k]),
        "probs": {c: float(v) for c, v in zip(classes, p, strict=True)},
    }
    if threshold is not None:
        r["review"] = bool(p[k] < threshold)
    if top_k > 1:
        order = np.argsort(-p, kind="stable")[:top_k]
        r["top"] = [{"class": classes[j], "confidence": float(p[j])} for j in order]
    return r


def predict_files(
    model: str | Path, paths: list[str | Path], threads: int = 2
) -> tuple[list[dict], list[dict]]:
    """Predictions for every decodable image under `paths`, and the files that could not be decoded.

    Returns:
        (results, failed): results are ``{"path", "class", "confidence", "probs"}`` in input order;
        failed are ``{"path", "error"}``.
    """
    pred = classify(model, collect(paths), threads)
    return pred.results, pred.failed


def _top(r: dict) -> list[tuple[str, float]]:
    return [(t["class"], t["confidence"]) for t in r.get("top", [])[1:]]


def to_csv(results: list[dict]) -> str:
    """path, class, confidence, then class_2, confidence_2, ... (with --top-k), then p_<class> for all."""
    buf = io.StringIO()
    classes = list(results[0]["probs"]) if results else []
    extra = len(results[0].get("top", [])) if results else 0
    w = csv.writer(buf)
    ranks = [h for j in range(2, extra + 1) for h in (f"class_{j}", f"confidence_{j}")]
    review = (
        [["review"], lambda r: ["yes" if r["review"] else "no"]]
        if results and "review" in results[0]
        else None
    )
    w.writerow(
        ["path", "class", "confidence", *(review[0] if review else []), *ranks, *(f"p_{c}" for c in classes)]
    )
    for r in results:
        tops = [v for c, p in _top(r) for v in (c, f"{p:.6f}")]
        w.writerow(
            [
                r["path"],
                r["class"],
                f"{r['confidence']:.6f}",
                *(review[1](r) if review else []),
                *tops,
                *(f"{r['probs'][c]:.6f}" for c in classes),
            ]
        )
    return buf.getvalue()


def _print_results(results: list[dict]) -> None:
    """A table on a terminal; piped, one tab-separated line per image (path, class, confidence, ...)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    if not console.is_terminal:
        try:
            for r in results:
                tops = "".join(f"\t{c}\t{p:.4f}" for c, p in _top(r))
                flag = ("\treview" if r["review"] else "\tok") if "review" in r else ""
                sys.stdout.write(f"{r['path']}\t{r['class']}\t{r['confidence']:.4f}{tops}{flag}\n")
            sys.stdout.flush()
        except BrokenPipeError:  # the reader stopped early (`| head`): not an error of predict's
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    table = Table("image", "class", "confidence")
    if results and "top" in results[0]:
        table.add_column("next")
    if results and "review" in results[0]:
        table.add_column("review")
    for r in results:
        # Text cells: file and class names are shown as they are, never read as rich markup
        cells = [Text(r["path"]), Text(r["class"]), f"{r['confidence']:.3f}"]
        if "top" in r:
            cells.append(Text(", ".join(f"{c} {p:.3f}" for c, p in _top(r))))
        if "review" in r:
            cells.append(Text("REVIEW", style="bold yellow") if r["review"] else Text("ok"))
        table.add_row(*cells)
    console.print(table)


def summary(pred: Prediction, threads: int, batch: int) -> str:
    n = len(pred.results) + len(pred.failed)
    flagged = sum(1 for r in pred.results if r.get("review"))
    review = (
        f" ({flagged} below the review threshold: send to a person)"
        if any("review" in r for r in pred.results)
        else ""
    )
    return (
        f"{len(pred.results)} images classified{review}, {len(pred.failed)} could not be decoded; "
        f"{pred.images_per_s:.1f} images/s end to end ({n} files decoded, resized and classified in "
        f"{pred.seconds:.2f} s; {threads} threads, batch {batch}; model load {pred.load_seconds:.2f} s)"
    )


def main(
    model: str,
    paths: list[str],
    json_path: str | None = None,
    csv_path: str | None = None,
    threads: int = 2,
    batch: int = BATCH,
    top_k: int = 1,
    stdin: Iterable[str] | None = None,
    explain: str | None = None,
) -> int:
    """`slimvit predict`: outputs first (files, then stdout), failures and the summary on stderr."""
    skipped: list[Path] = []
    files = gather(paths, stdin, skipped)
    pred = classify(model, files, threads, batch, top_k)
    if json_path:
        atomic_write_json(
            json_path,
            {
                "model": str(resolve_model(model)),
                "predictions": pred.results,
                "failed": pred.failed,
                "seconds": pred.seconds,
                "images_per_s": pred.images_per_s,
            },
        )
    if csv_path:
        atomic_write_text(csv_path, to_csv(pred.results))
    _print_results(pred.results)
    for f in pred.failed:
        print(f"error: {f['error']}", file=sys.stderr)
    for note in pred.notes:
        print(f"note: {note}", file=sys.stderr)
    if skipped:
        names = ", ".join(str(f) for f in skipped[:3]) + (" ..." if len(skipped) > 3 else "")
        print(
            f"skipped {len(skipped)} file(s) not named as images ({', '.join(IMAGE_EXTENSIONS)}): {names}",
            file=sys.stderr,
        )
    print(summary(pred, threads, batch), file=sys.stderr)
    if explain:
        from slimvit.explain import explain_files

        ex = explain_files(resolve_model(model), [Path(r["path"]) for r in pred.results], explain, threads)
        print(
            f"heatmaps: {len(ex['written'])} written to {explain} ({ex['ms_per_image']:.1f} ms per image: "
            f"{ex['grid']}x{ex['grid']} occlusion in one batched call, drawing included; {threads} threads)",
            file=sys.stderr,
        )
    return 1 if pred.failed else 0
