"""`slimvit report`: REPORT.md with tables and PNG plots, read back from a run folder's JSON files.

Nothing here measures anything: every number comes from the files the stages wrote (bench.json,
prune.json, quantize.json, metrics.jsonl, ...), and every sentence of the conclusions is computed
from those numbers, so the report cannot claim what the run did not show.

    load.py         the run folder in one dict, and the look-ups into it (the reference, the deployed row)
    stats.py        the front, paired tests and their verdicts, per-class recall
    plots.py        plots/*.png
    overview.py     the summary line and Conclusions
    compression.py  Stages, Distillation, Pruning, Quantization
    deployment.py   Deployment candidates, Deployed model, Portability
    classes.py      Classes, Wrong test images
    context.py      Environment, Dataset and configuration, Time per stage

A new section is a function `(run) -> list[str]` (markdown lines; [] when it has nothing to say) in
SECTIONS. Percentages and row labels come from `slimvit.labels`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from slimvit import trust
from slimvit.io import atomic_write_text, is_main_process
from slimvit.labels import pct, pct_ci
from slimvit.report import classes, compression, context, deployment, overview
from slimvit.report.load import (
    TRAINED,
    bench_rows,
    class_models,
    deployed_row,
    find_row,
    load_run,
    mistakes,
    ref_row,
)
from slimvit.report.plots import write_plots
from slimvit.report.stats import eval_paired, front, recalls

log = logging.getLogger(__name__)

SECTIONS = (
    overview.conclusions,
    compression.stages,
    compression.distillation,
    compression.pruning,
    compression.quantization,
    deployment.candidates,
    deployment.deployed_model,
    trust.section,
    trust.localisation_section,
    classes.class_recall,
    classes.wrong_images,
    deployment.portability,
    context.environment,
    context.dataset,
    context.timing,
)
"""REPORT.md's sections in order, after the summary line (`overview.head`)."""


def render(run: dict, command: str | None = None) -> str:
    """REPORT.md's text: the summary line, then each of SECTIONS."""
    sections = [overview.head(run, command), *(section(run) for section in SECTIONS)]
    return "\n".join(line for s in sections for line in s)


def run_report(cfg, run_dir: str | Path, data=None, command: str | None = None) -> dict:
    """Write REPORT.md and plots/*.png into the run folder."""
    run_dir = Path(run_dir)
    run = load_run(run_dir, cfg)
    if command is None and Path(sys.argv[0]).name in ("slimvit", "__main__.py"):
        command = " ".join(["slimvit", *sys.argv[1:]])
    written = []
    if is_main_process():
        written = write_plots(run, run_dir / "plots")  # first: the report links mistakes.png only if drawn
        atomic_write_text(run_dir / "REPORT.md", render(run, command))
    log.info("report: %s (%d plots)", run_dir / "REPORT.md", len(written))
    return {"plots": written}


__all__ = [
    "SECTIONS",
    "TRAINED",
    "bench_rows",
    "class_models",
    "deployed_row",
    "eval_paired",
    "find_row",
    "front",
    "load_run",
    "mistakes",
    "pct",
    "pct_ci",
    "recalls",
    "ref_row",
    "render",
    "run_report",
]
