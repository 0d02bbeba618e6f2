"""The imbalanced-data benchmark: NEU-DET cut to 300/200/120/80/50/30 images per class, the default pipeline
on it, and (with --twin) the same teacher + student trained without class balancing, for a paired test.

    python scripts/imbalanced.py [--balanced runs/neu-det] [--twin] [--set SECTION.KEY=VALUE ...]

Writes runs/neu-det-imbalanced/IMBALANCED.md: balanced accuracy and the smallest class recall of every
step against its input (exact McNemar on the same test images), beside the balanced run when --balanced
names one, and the sampler's effect when --twin ran. The subset is built once (slimvit subset, seed 0)
under runs/data/; every run folder is resumable (run the same command again).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from slimvit.evaluate import balanced_accuracy, mcnemar, wilson

COUNTS = "300,200,120,80,50,30"


def sh(*args: str, ok: tuple[int, ...] = (0,)) -> None:
    print("+", " ".join(args), flush=True)
    rc = subprocess.run(args).returncode
    if rc not in ok:
        raise SystemExit(f"{args[1]} exited {rc}")


def slimvit() -> str:
    return str(Path(sys.executable).with_name("slimvit"))


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def chain(run: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(step, test predictions, labels): student, pruned, the deployed model's FP32 file, the deployed model."""
    out = []
    for name in ("teacher", "student", "pruned"):
        ev = load(run / name / "eval.json")
        out.append((name, np.array(ev["pred"]), np.array(ev["labels"])))
    bench, dep = load(run / "bench.json"), load(run / "deploy" / "deploy.json")
    classes = bench["classes"]
    y = np.array([classes.index(c) for c in bench["test_images"]["labels"]])
    if dep.get("deployed"):
        fp32 = f"{dep['stage']}/onnxruntime/fp32"
        if fp32 != dep["key"] and fp32 in bench["predictions"]:
            out.append((f"{dep['stage']} FP32 ONNX", np.array(bench["predictions"][fp32]), y))
        out.append(
            (f"deployed {dep['runtime']} {dep['precision']}", np.array(bench["predictions"][dep["key"]]), y)
        )
    return out


def per_class(pred: np.ndarray, y: np.ndarray, classes: list[str]) -> str:
    cells = []
    for c, name in enumerate(classes):
        n = int((y == c).sum())
        k = int(((pred == c) & (y == c)).sum())
        lo, _ = wilson(k, n)
        cells.append(f"{name} {k}/{n} (>= {100 * lo:.0f}%)")
    return ", ".join(cells)


def summary(run: Path, title: str) -> list[str]:
    classes = load(run / "bench.json")["classes"]
    steps = chain(run)
    lines = [
        f"### {title} (`{run}`)",
        "",
        "| model | test balanced accuracy % | accuracy % | smallest class recall % | change vs input (points) | McNemar p |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    prev = None
    for name, p, y in steps:
        bal = balanced_accuracy(p, y)
        worst = min(((p == c) & (y == c)).sum() / max(1, (y == c).sum()) for c in range(len(classes)))
        change, pv = "", ""
        if prev is not None and name != "student":
            t = mcnemar(p == y, prev[1] == prev[2])
            change, pv = f"{100 * (bal - balanced_accuracy(prev[1], prev[2])):+.2f}", f"{t['p']:.2g}"
        lines.append(
            f"| {name} | {100 * bal:.2f} | {100 * (p == y).mean():.2f} | {100 * worst:.1f} | {change} | {pv} |"
        )
        if name != "teacher":
            prev = (name, p, y)
    dep = load(run / "deploy" / "deploy.json")
    if dep.get("deployed"):
        what = per_class(steps[-1][1], steps[-1][2], classes)
        lines += ["", f"Deployed, per class (right/test images, 95% lower bound): {what}", ""]
    else:
        lines += ["", f"Nothing deployed: {dep.get('error')}", ""]
    return lines


def twin(run: Path, nobal: Path) -> list[str]:
    classes = load(run / "bench.json")["classes"]
    lines = [
        "### Class-balanced sampling against none (same subset, same split, same seed)",
        "",
        "| model | balance | test balanced accuracy % | accuracy % | per class |",
        "|---|---|---:|---:|---|",
    ]
    for name in ("teacher", "student"):
        pair = []
        for folder in (run, nobal):
            ev, tr = load(folder / name / "eval.json"), load(folder / name / "train.json")
            p, y = np.array(ev["pred"]), np.array(ev["labels"])
            pair.append((p, y))
            lines.append(
                f"| {name} | {tr.get('balance')} | {100 * balanced_accuracy(p, y):.2f} | {100 * (p == y).mean():.2f} | "
                f"{per_class(p, y, classes)} |"
            )
        t = mcnemar(pair[0][0] == pair[0][1], pair[1][0] == pair[1][1])
        lines.append(
            f"| {name}: paired | | | | {t['a_only']} images only the balanced one got right, {t['b_only']} only "
            f"the other; exact McNemar p={t['p']:.2g} |"
        )
    return lines + [""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/datasets/NEU-DET", help="the full NEU-DET")
    ap.add_argument("--out", default="runs/neu-det-imbalanced", help="run folder")
    ap.add_argument("--balanced", default=None, help="a finished balanced NEU-DET run to compare with")
    ap.add_argument(
        "--twin", action="store_true", help="also train teacher + student with train.balance=none"
    )
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="passed to slimvit run")
    args = ap.parse_args()

    subset = Path("runs/data/NEU-DET-imbalanced")
    if not (subset / "SUBSET.json").exists():
        subset.parent.mkdir(parents=True, exist_ok=True)
        sh(slimvit(), "subset", args.data, str(subset), "--counts", COUNTS, "--seed", "0")
    sets = [a for s in args.overrides for a in ("--set", s)]
    out = Path(args.out)
    # exit 2 with a finished report: no candidate met the deploy rule (the summary says so)
    sh(slimvit(), "run", "--preset", "neu-det", "--data", str(subset), "--out", str(out), *sets, ok=(0, 2))
    lines = [
        "# Imbalanced NEU-DET benchmark",
        "",
        f"Subset: {COUNTS} images per class (slimvit subset, seed 0).",
        "",
    ]
    lines += summary(out, "Imbalanced subset")
    if args.balanced and (Path(args.balanced) / "deploy" / "deploy.json").exists():
        lines += summary(Path(args.balanced), "Balanced NEU-DET")
    elif args.balanced:
        print(f"note: no finished run in {args.balanced}; run `make run` first to compare with it")
    if args.twin:
        nobal = out.with_name(out.name + "-nobalance")
        for stage in ("teacher", "distill"):
            sh(
                slimvit(),
                stage,
                "--preset",
                "neu-det",
                "--data",
                str(subset),
                "--out",
                str(nobal),
                *sets,
                "--set",
                "train.balance=none",
            )
        lines += twin(out, nobal)
    (out / "IMBALANCED.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
