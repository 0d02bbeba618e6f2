"""What the report reads: a run folder's JSON files in one dict, and the look-ups every section makes in it.

Nothing here measures anything: every number comes from the files the stages wrote.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from slimvit.config import Config, read_config
from slimvit.errors import ConfigError, ModelError
from slimvit.io import read_json, read_jsonl
from slimvit.labels import row_label

log = logging.getLogger(__name__)

TRAINED = (
    ("teacher", "teacher"),
    ("student", "student (distilled)"),
    ("student_nokd", "student (no distillation)"),
    ("pruned", "pruned + fine-tune"),
)


def _maybe(path: Path):
    return read_json(path) if path.exists() else None


def load_run(run_dir: Path, cfg: Config | None = None) -> dict:
    """Everything the report reads; bench.json is required, the rest is used when present.

    `cfg` is the run's typed config; None reads the run folder's config.yaml (scripts reading old runs).
    """
    run_dir = Path(run_dir)
    if cfg is None and (run_dir / "config.yaml").exists():
        try:
            cfg = read_config(run_dir / "config.yaml")
        except ConfigError as e:  # a folder written by an older slimvit (keys since removed)
            log.warning("report: %s; the configuration is left out", e)
    if not (run_dir / "bench.json").exists():
        raise ModelError(f"no '{run_dir / 'bench.json'}'; run `slimvit bench` (or `slimvit run`) first")
    r = {
        "bench": read_json(run_dir / "bench.json"),
        "data": _maybe(run_dir / "data.json"),
        "manifest": _maybe(run_dir / "manifest.json") or {"stages": {}},
        "prune": _maybe(run_dir / "pruned" / "prune.json"),
        "sweep": _maybe(run_dir / "prune_sweep.json"),
        "export": _maybe(run_dir / "onnx" / "export.json"),
        "quantize": _maybe(run_dir / "onnx" / "quantize.json"),
        "config": cfg,
        "run_dir": run_dir,
        "train": {},
        "eval": {},
        "curves": {},
    }
    _apply_deploy(r["bench"], _maybe(run_dir / "deploy" / "deploy.json"))
    for name, _ in TRAINED:
        d = run_dir / name
        if (d / "train.json").exists():
            r["train"][name] = read_json(d / "train.json")
            r["curves"][name] = read_jsonl(d / "metrics.jsonl")
        if (d / "eval.json").exists():
            r["eval"][name] = read_json(d / "eval.json")
    return r


def _apply_deploy(bench: dict, dep: dict | None) -> None:
    """Mark the deployed row and carry the deploy step's record into the bench dict the report reads."""
    key = dep.get("key") if dep and dep.get("deployed") else None
    for r in bench["rows"]:
        r["deployed"] = key is not None and r.get("key") == key
    dep = dep or {}
    bench["deployed_why"] = dep.get("why")
    bench["deploy_error"] = dep.get("error") if dep else "the deploy stage has not run"
    bench["predict_check"] = dep.get("predict_check")
    bench["budgets"] = dep.get("budgets") or {}
    bench["review"] = dep.get("review")


def bench_rows(run: dict) -> list[dict]:
    """Every bench row, in bench.json's order."""
    return run["bench"]["rows"]


def find_row(run: dict, stage: str, runtime: str, precision: str) -> dict | None:
    """The row of one variant, or None when the bench did not measure it."""
    return next(
        (
            r
            for r in bench_rows(run)
            if (r["stage"], r["runtime"], r["precision"]) == (stage, runtime, precision)
        ),
        None,
    )


def ref_row(run: dict) -> dict:
    """The reference row: the unpruned distilled student in eager FP32 PyTorch."""
    return next(r for r in bench_rows(run) if r["reference"])


def deployed_row(run: dict) -> dict | None:
    """The deployed row, or None when no candidate fitted the budgets."""
    return next((r for r in bench_rows(run) if r["deployed"]), None)


def bench_predictions(run: dict, key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(predictions, labels) of one bench row on the test images, as class indices."""
    preds = (run["bench"].get("predictions") or {}).get(key)
    labels = (run["bench"].get("test_images") or {}).get("labels")
    if preds is None or not labels:
        return None
    classes = run["bench"]["classes"]
    return np.array(preds), np.array([classes.index(c) for c in labels])


def class_models(run: dict) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, test predictions, labels) of the models a deployment rests on: teacher, student, pruned,
    the deployed model's own FP32 file, and the deployed model."""
    out = []
    for name in ("teacher", "student", "pruned"):
        ev = run["eval"].get(name)
        if ev and "pred" in ev:
            out.append((dict(TRAINED)[name], np.array(ev["pred"]), np.array(ev["labels"])))
    dep = deployed_row(run)
    if dep:
        fp32 = find_row(run, dep["stage"], "onnxruntime", "fp32")
        if fp32 and fp32["key"] != dep["key"] and (pl := bench_predictions(run, fp32["key"])):
            out.append((f"{dep['stage']} FP32 ONNX (before quantization)", *pl))
        if pl := bench_predictions(run, dep["key"]):
            out.append((f"deployed ({row_label(dep)})", *pl))
    return out


def mistakes(run: dict) -> list[dict]:
    """The deployed model's wrong test images: path (relative to the dataset), true and predicted class,
    and the model's calibrated confidence in its prediction, as `slimvit predict` prints it (None where
    bench kept no logits)."""
    from slimvit.calibrate import softmax
    from slimvit.layout import LOGITS, read_logits

    dep = deployed_row(run)
    b = run["bench"]
    t = b.get("test_images")
    if not dep or not t:
        return []
    key = f"{dep['stage']}/{dep['runtime']}/{dep['precision']}"
    pred = (b.get("predictions") or {}).get(key)
    if pred is None:
        return []
    logits = read_logits(Path(run.get("run_dir", ".")) / LOGITS, "test", key)
    conf = None
    if logits is not None and len(logits) == len(pred):
        temperature = (b.get("calibration") or {}).get(key, {}).get("temperature", 1.0)
        conf = softmax(logits, temperature).max(1)  # as `slimvit predict` prints it
    classes = b["classes"]
    out = []
    for i, (path, label, k) in enumerate(zip(t["paths"], t["labels"], pred, strict=True)):
        if classes[k] != label:
            out.append(
                {
                    "path": path,
                    "true": label,
                    "predicted": classes[k],
                    "confidence": None if conf is None else float(conf[i]),
                }
            )
    return sorted(out, key=lambda m: -(m["confidence"] or 0))
