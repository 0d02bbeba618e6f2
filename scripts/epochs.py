"""The student's kept epoch against its last one: what choosing the epoch on validation did, per run and pooled.

    python scripts/epochs.py RUN [RUN ...]

The student a run ships is its best epoch on validation (`student/model.safetensors`); `student/checkpoint.pt`
holds the last epoch's weights (for resuming). Both are evaluated on the run's validation and test images, and
the kept epoch is paired with the last on the same images (exact McNemar), per run and pooled over the runs.
Test is reported only: this measures a selection rule, it chooses nothing. On few validation images the best of
many epochs is partly luck; a kept epoch well above the last on validation and below it on test is that luck.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from slimvit import models
from slimvit.config import read_config
from slimvit.data import load_data
from slimvit.evaluate import predict_logits
from slimvit.preprocess import normalize
from slimvit.report.stats import accuracy_text, paired_text

SPLITS = ("val", "test")


def kept_and_last(run: Path) -> dict[str, dict[str, np.ndarray]]:
    """Correct per image of the kept and the last epoch's student, by split: {"val": {"kept", "last"}, ...}."""
    kept, spec = models.load(run / "student")
    state = torch.load(run / "student" / "checkpoint.pt", map_location="cpu", weights_only=True)
    last = models.build(spec)
    last.load_state_dict(state["model"])
    data = load_data(read_config(run / "config.yaml").data, run, progress=False)
    out = {}
    for split in SPLITS:
        images, labels = data.arrays(split)
        x = torch.from_numpy(normalize(images, spec.mean, spec.std))
        out[split] = {
            name: predict_logits(m.eval(), x).argmax(1) == labels
            for name, m in (("kept", kept), ("last", last))
        }
    return out


def table(runs: list[Path], results: list[dict]) -> list[str]:
    lines = [
        "| run | kept epoch | val %: kept | last | kept - last | test %: kept | last | kept - last |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = []
    for run, correct in zip(runs, results, strict=True):
        epoch = json.loads((run / "student" / "train.json").read_text()).get("best_epoch")
        rows.append((str(run), epoch, correct))
    if len(runs) > 1:
        pooled = {
            s: {k: np.concatenate([c[s][k] for c in results]) for k in ("kept", "last")} for s in SPLITS
        }
        rows.append(("pooled", "", pooled))
    for name, epoch, c in rows:
        cells = [
            f"{accuracy_text(c[s]['kept'])} | {accuracy_text(c[s]['last'])} | {paired_text(c[s]['kept'], c[s]['last'])}"
            for s in SPLITS
        ]
        lines.append(f"| {name} | {epoch} | " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders whose student has finished")
    args = ap.parse_args()
    missing = [r for r in args.runs if not (r / "student" / "checkpoint.pt").is_file()]
    if missing:
        raise SystemExit(f"{missing[0]}: no student/checkpoint.pt (the student has not trained there)")
    print("\n".join(table(args.runs, [kept_and_last(r) for r in args.runs])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
