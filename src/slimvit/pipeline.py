"""Runs the stages in order and skips what is done."""

from __future__ import annotations

import sys

STAGES = ("data", "teacher", "distill", "prune", "export", "quantize", "bench", "report")


def run_single(stage: str, cfg, run_dir, args) -> int:
    print(f"error: `slimvit {stage}` is not implemented yet", file=sys.stderr)
    return 2


def run_pipeline(cfg, run_dir, force=None) -> int:
    print("error: `slimvit run` is not implemented yet; `slimvit data` works", file=sys.stderr)
    return 2
