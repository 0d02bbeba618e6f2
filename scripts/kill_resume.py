"""kill -9 at a random moment of a small `slimvit run`, then a clean resume: same results, no temp files left.

    .venv/bin/python scripts/kill_resume.py [--rounds 10] [--seed 0] [WORK_DIR]

Runs the `smoke` preset (more epochs per training stage than the preset's one, so that kills land
inside training as well as between stages) once without interruption on a generated 3-class dataset. Then, for each round, starts
the same run in a fresh folder, sends SIGKILL to its whole process group at a moment drawn uniformly
over the uninterrupted run's duration, and runs `slimvit run` again on that folder until it finishes.
Each round must end with:

- the same test accuracy, for every stage and every benchmarked model, as the uninterrupted run;
- no temporary file (`.<name>.<random>.tmp`) left in the run folder, and its lock released.

It also says whether the trained weights came out bit-identical (training resumes from the last
finished epoch with its RNG states, so on one machine they normally do). Exit status 0 when every
round passed. About 10 minutes for 10 rounds on 2 idle cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from slimvit.io import is_temp_name

SETTINGS = [
    "--preset", "smoke",
    "--set", "distill.ablation=false",
    "--set", "quantize.modes=[int8-dynamic]",
    "--set", "train.teacher_epochs=8",
    "--set", "train.epochs=20",
    "--set", "train.batch_size=32",
    "--set", "data.img_size=64",
    "--set", "prune.finetune_epochs=5",
    "--set", "prune.recover=false",
]  # fmt: skip
WEIGHTS = ("teacher", "student", "pruned")


def make_dataset(root: Path, per_class: int = 150, size: int = 64) -> None:
    """Three classes whose brightness ranges overlap, so that accuracy is not trivially 100%."""
    for ci, c in enumerate("abc"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng = np.random.default_rng(ci * 1000 + i)
            shift = int(rng.integers(0, 50))  # per image: the class means (20 apart) overlap
            arr = rng.integers(0, 80, (size, size), dtype=np.uint8) + 20 * ci + shift
            Image.fromarray(arr).convert("RGB").save(root / c / f"{c}_{i}.png")


def command(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "slimvit", "run", "--data", str(data), "--out", str(out), *SETTINGS]


def finish(data: Path, out: Path, log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "a") as f:
        rc = subprocess.run(command(data, out), stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"`slimvit run` exited {rc} on {out}; see {log}")
    return time.perf_counter() - t0


def accuracies(out: Path) -> dict[str, float]:
    """What must not depend on the interruption: the test accuracy of every stage and benchmarked model.
    (Not the deployed model: the choice reads latencies, which differ from run to run.)"""
    acc = {s: json.loads((out / s / "eval.json").read_text())["accuracy"] for s in WEIGHTS}
    for row in json.loads((out / "bench.json").read_text())["rows"]:
        acc[row["key"]] = row["accuracy"]
    return acc


def weights(out: Path) -> dict[str, str]:
    return {s: hashlib.sha256((out / s / "model.safetensors").read_bytes()).hexdigest() for s in WEIGHTS}


def leftovers(out: Path) -> list[str]:
    """Temporary files, and a lock still naming a holder (a released lock is an empty `.lock`)."""
    return sorted(
        str(p.relative_to(out))
        for p in out.rglob("*")
        if is_temp_name(p.name) or (p.name == ".lock" and p.stat().st_size > 0)
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", nargs="?", type=Path, help="working folder (default: a temporary one)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="slimvit-kill-"))
    data = work / "data"
    if not data.exists():
        make_dataset(data)
    for old in [work / "uninterrupted", *work.glob("round*")]:  # a work folder used before: start over
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    ref = work / "uninterrupted"
    duration = finish(data, ref, work / "uninterrupted.log")
    expected, ref_weights = accuracies(ref), weights(ref)
    print(f"uninterrupted run: {duration:.0f} s; test accuracy {expected}", flush=True)
    rng = random.Random(args.seed)
    failed = 0
    for i in range(1, args.rounds + 1):
        out, log = work / f"round{i}", work / f"round{i}.log"
        at = rng.uniform(0.0, duration)
        with open(log, "w") as f:
            proc = subprocess.Popen(
                command(data, out), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                proc.wait(timeout=at)
                killed = "finished before the kill"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                killed = "killed"
        stage = next(
            (line.split("]")[1].split(":")[0].strip() for line in reversed(log.read_text().splitlines())
             if line.startswith("[") and ": running" in line),
            "start-up",
        )  # fmt: skip
        resumed = finish(data, out, log)
        got = accuracies(out)
        problems = []
        if got != expected:
            diff = {
                k: (expected.get(k), got.get(k))
                for k in expected.keys() | got.keys()
                if got.get(k) != expected.get(k)
            }
            problems.append(f"test accuracy differs (uninterrupted, resumed): {diff}")
        if left := leftovers(out):
            problems.append(f"left behind: {', '.join(left)}")
        same = [s for s, h in weights(out).items() if ref_weights[s] == h]
        print(
            f"{'ok  ' if not problems else 'FAIL'} round {i}: {killed} at {at:.0f} s (in {stage}), resumed in "
            f"{resumed:.0f} s; weights bit-identical: {', '.join(same) or 'none'}"
            + "".join(f"\n     {p}" for p in problems),
            flush=True,
        )
        failed += bool(problems)
    print(f"{args.rounds - failed} of {args.rounds} rounds passed (work folder: {work})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
