"""Every path of a run folder, named once (torch-free: the deploy step, the report and the edge path read
them too).

Paths are relative to the run folder and spelled with `/`, as the stage declarations (stages.py) and the
manifest's digests spell them; `run_dir / EXPORT` is the file itself. A `*` in a folder or model name
makes the glob of every such file (`onnx_file("*", "fp32")` is `onnx/*_fp32.onnx`), which is how a stage
declares the files it writes many of.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from slimvit.io import atomic_path, read_json

# --------------------------------------------------------------------------- the run folder itself

CONFIG = "config.yaml"
"""The resolved config the run was made with (runs.prepare_run_dir)."""
MANIFEST = "manifest.json"
"""Per stage: its status, times, and digests of what it read and wrote (manifest.py)."""
LOCK = ".lock"
"""The flock that keeps one writer per run folder (runs.lock_run_dir)."""

# --------------------------------------------------------------------------- data

SPLIT = "split.json"
"""The train/val/test lists and the dataset's fingerprint: every later stage reads the data through it."""
DATA = "data.json"
"""What the data stage found: classes, counts, image sizes."""

# --------------------------------------------------------------------------- model folders

TEACHER, STUDENT, ABLATION, PRUNED = "teacher", "student", "student_nokd", "pruned"
"""The folders of the trained models; a model's name in bench.json and onnx/ is its folder's name."""

# The files of a model folder (teacher/, student/, ..., sweep/r0.5/), by name:
WEIGHTS = "model.safetensors"
SPEC = "model.json"
"""How to rebuild the model (spec.ModelSpec): architecture, pruned widths, classes, normalisation."""
METRICS = "metrics.jsonl"
"""One line per training epoch."""
TRAIN = "train.json"
"""The training summary, written when training finished."""
EVAL = "eval.json"
"""Metrics on the test split."""
PRUNE = "prune.json"
"""What pruning did (a pruned or sweep model)."""
PRUNING = "pruning.json"
"""The pruned, not yet fine-tuned model's record, in the `init/` folder of a pruned or sweep model."""
PRUNE_INIT = "init"
"""Sub-folder of a pruned or sweep model: the pruned model before fine-tuning (a resume starts there)."""
TEACHER_LOGITS = "teacher_logits.safetensors"
"""In pruned/: the view-averaged logits its fine-tune distilled from, with their key (distill.LogitsMemo):
the sweep's fine-tunes distil from the same model on the same images and read them."""
CHECKPOINT = "checkpoint.pt"
"""A training stage's resumable state."""


def in_dir(folder: str, name: str) -> str:
    """`folder/name`: a file of a model (or deploy) folder, as a run-folder path."""
    return f"{folder}/{name}"


def model_files(folder: str) -> tuple[str, str]:
    """The two files of a saved model (models.save)."""
    return in_dir(folder, WEIGHTS), in_dir(folder, SPEC)


def model_glob(folder: str) -> str:
    """Both files of a saved model, as one glob."""
    return in_dir(folder, "model.*")


# --------------------------------------------------------------------------- the pruning sweep

SWEEP = "sweep"
"""The folder of the sweep's models, one sub-folder per point (`sweep_dir`)."""
SWEEP_MODELS = f"{SWEEP}/*"
"""Every sweep model's folder, as a glob."""
SWEEP_SUMMARY = "prune_sweep.json"
"""This sweep's points: export takes the candidates from it."""
SWEEP_TABLE = "prune_sweep.md"

_SWEEP_NAME = re.compile(rf"{SWEEP}/r(\d*\.?\d+)(?:-d(\d+))?")


def sweep_dir(ratio: float, depth: int | None = None) -> str:
    """`sweep/r<ratio>`, or `sweep/r<ratio>-d<depth>` for that ratio's model cut to `depth` blocks."""
    return f"{SWEEP}/r{ratio:g}" + (f"-d{depth}" if depth is not None else "")


def _sweep_order(name: str) -> tuple:
    """r0.3 before r0.3-d8 before r0.3-d6 before r0.5; unknown names last."""
    m = _SWEEP_NAME.fullmatch(name)
    return (0, float(m[1]), -int(m[2] or 1_000), name) if m else (1, 0.0, 0, name)


def candidates(run_dir: str | Path) -> list[str]:
    """The deployment candidates of a run: the pruned model, then every pruning-sweep model (by ratio).

    Each is exported, quantized in every mode and benchmarked; the deploy step chooses among them.
    """
    run_dir = Path(run_dir)
    summary = run_dir / SWEEP_SUMMARY
    points = read_json(summary).get("points", []) if summary.exists() else []
    if points and all(p.get("model") for p in points):  # the sweep's own list: no folder of an earlier sweep
        names = [p["model"] for p in points if p["model"] != PRUNED]
    else:  # no sweep summary (yet): every sweep folder with a model
        names = [str(p.parent.relative_to(run_dir)) for p in (run_dir / SWEEP).glob(f"r*/{SPEC}")]
    names = [n for n in dict.fromkeys(names) if (run_dir / n / SPEC).exists()]
    return [PRUNED, *sorted(names, key=_sweep_order)]


# --------------------------------------------------------------------------- ONNX

ONNX = "onnx"
EXPORT = f"{ONNX}/export.json"
"""Each exported model's file, size and parity with PyTorch."""
QUANTIZE = f"{ONNX}/quantize.json"
"""Each candidate's variants (fp32 and every quantization mode): files, sizes, accuracies."""
ONNX_ANY = f"{ONNX}/*.onnx"


def onnx_file(model: str, precision: str) -> str:
    """`onnx/<model>_<precision>.onnx`, a sweep model's folder flattened (sweep/r0.5 -> sweep_r0.5)."""
    return f"{ONNX}/{model.replace('/', '_')}_{precision}.onnx"


# --------------------------------------------------------------------------- bench, deploy, report

BENCH = "bench.json"
BENCH_TABLE = "bench.md"
LOGITS = "bench_logits.npz"
"""Every variant's logits on the validation and test images (float32 arrays named `<split>|<key>`, no
pickle): the report lists the deployed model's mistakes with their confidence from them."""

DEPLOY = "deploy"
"""The deployed model's folder, replaced whole when the deploy step runs again."""
# The files of a deploy folder (deploy/, or one `slimvit deploy` writes elsewhere), by name:
DEPLOY_RECORD = "deploy.json"
"""What was chosen, for which budgets, and its measured figures; `slimvit predict` reads it."""
DEPLOY_MODEL = "model.onnx"
DEPLOYED = in_dir(DEPLOY, DEPLOY_RECORD)
DEPLOYED_MODEL = in_dir(DEPLOY, DEPLOY_MODEL)

REPORT = "REPORT.md"
PLOTS = "plots"
LOCALISATION = "localisation.json"
"""The report's cache of where the deployed model looks (trust.py)."""


def plot(name: str) -> str:
    """`plots/<name>`: one of the report's figures."""
    return in_dir(PLOTS, name)


# --------------------------------------------------------------------------- arrays


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
