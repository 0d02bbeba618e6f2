"""The imbalanced-data benchmark: NEU-DET cut to 300/200/120/80/50/30 images per class, the default pipeline
on it, and (with --twin) the same teacher + student trained without class balancing, for a paired test.

    python scripts/imbalanced.py [--balanced runs/neu-det] [--twin] [--seeds 0,1,2] [--counts N1,...]
                                 [--set SECTION.KEY=VALUE ...]

Writes runs/neu-det-imbalanced/IMBALANCED.md: balanced accuracy and the smallest class recall of every
step against its input (exact McNemar on the same test images), beside the balanced run when --balanced
names one, and the sampler's effect when --twin ran. The subset is built once per seed (slimvit subset)
under runs/data/; every run folder is resumable (run the same command again).

With several --seeds, each seed draws another subset (other images in every class, so another split) and
gets a run folder of its own (`--out` for seed 0, `--out`-s<seed> for the others); IMBALANCED.md then also
pools them: one test image of a class with 6 is 17 points of its recall, and three subsets triple the
images each figure rests on. Pooled McNemar pairs each model with its input on the same (subset, image).

--balanced names runs on the whole dataset (comma-separated: several, e.g. three training seeds, are pooled);
IMBALANCED.md then sets every step of the subsets beside the same step there: what having only the subset's
images costs (other test images, so a difference with its 95% interval, no paired test).

--counts draws other class sizes. The control for the imbalance itself is a balanced subset of the same
780 images, `--counts 130,130,130,130,130,130 --out runs/bal130`: against it, the imbalanced subsets
show what the imbalance costs, apart from what having 43% of NEU-DET's images costs (README, "Imbalanced
data").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from slimvit import report
from slimvit.deploy import nothing_deployed
from slimvit.evaluate import balanced_accuracy, balanced_accuracy_diff, balanced_accuracy_se, mcnemar, wilson
from slimvit.io import atomic_write_text

COUNTS = "300,200,120,80,50,30"


def sh(*args: str, ok: tuple[int, ...] = (0,)) -> int:
    print("+", " ".join(args), flush=True)
    rc = subprocess.run(args).returncode
    if rc not in ok:
        raise SystemExit(f"{args[1]} exited {rc}")
    return rc


def finished(rc: int, run: Path) -> None:
    """`slimvit run` exits 2 both for a finished run whose deploy rule found nothing (`nothing_deployed`)
    and for a refusal (a changed config, a bad dataset): stop at the second."""
    if rc == 2 and not nothing_deployed(run):
        raise SystemExit(f"slimvit run --out {run} refused (its error is above); nothing is compared")


def slimvit() -> str:
    return str(Path(sys.executable).with_name("slimvit"))


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def per_class(pred: np.ndarray, y: np.ndarray, classes: list[str]) -> str:
    cells = []
    for name, (k, n) in zip(classes, report.recalls(pred, y, len(classes)), strict=True):
        lo, _ = wilson(k, n)
        cells.append(f"{name} {k}/{n} (>= {100 * lo:.0f}%)")
    return ", ".join(cells)


def summary(run: Path, title: str) -> list[str]:
    """The models a deployment rests on (report.class_models: teacher, student, pruned, the deployed
    model's FP32 file, the deployed model), each after the student against the one before it."""
    r = report.load_run(run)
    classes = r["bench"]["classes"]
    steps = report.class_models(r)
    lines = [
        f"### {title} (`{run}`)",
        "",
        "| model | test balanced accuracy % | accuracy % | smallest class recall % | change vs input (points) | McNemar p |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for i, (name, p, y) in enumerate(steps):
        bal = balanced_accuracy(p, y)
        worst = min(k / n for k, n in report.recalls(p, y, len(classes)) if n)
        change, pv = "", ""
        if i >= 2:  # teacher and student are where the chain starts
            _, pp, yp = steps[i - 1]
            t = mcnemar(p == y, pp == yp)
            change, pv = f"{100 * (bal - balanced_accuracy(pp, yp)):+.2f}", f"{t['p']:.2g}"
        lines.append(
            f"| {name} | {100 * bal:.2f} | {100 * (p == y).mean():.2f} | {100 * worst:.1f} | {change} | {pv} |"
        )
    if report.deployed_row(r):
        what = per_class(steps[-1][1], steps[-1][2], classes)
        lines += ["", f"Deployed, per class (right/test images, 95% lower bound): {what}", ""]
    else:
        lines += ["", f"Nothing deployed: {r['bench'].get('deploy_error')}", ""]
    return lines


STEPS = ("teacher", "student", "pruned r=0.2", "deployed model's FP32 file", "deployed")


def steps_by_role(run: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(predictions, labels) of STEPS in one run; a deployed FP32 file stands for its own FP32 row."""
    steps = report.class_models(report.load_run(run))
    if len(steps) < 4:
        raise SystemExit(f"{run}: no deployed model to pool (run it to the end first)")
    if len(steps) == 4:  # the deployed file is the FP32 one
        steps.insert(3, steps[3])
    return [(p, y) for _, p, y in steps]


def seed_runs(first: Path, seeds: list[int]) -> list[Path]:
    """The folders (runs or subsets) of `seeds` whose seed-0 folder is `first` (`first`-s<seed> for the others)."""
    return [first.with_name(first.name + (f"-s{seed}" if seed else "")) for seed in seeds]


def _pool(per_run: list[list[tuple[np.ndarray, np.ndarray]]], i: int) -> tuple[np.ndarray, np.ndarray]:
    return tuple(np.concatenate([steps[i][k] for steps in per_run]) for k in (0, 1))


def pooled(runs: list[Path], classes: list[str]) -> list[str]:
    """Every step over the test images of all `runs` together (one subset seed each)."""
    per_run = [steps_by_role(r) for r in runs]
    lines = [
        f"### Pooled over {len(runs)} subsets ({', '.join(f'`{r}`' for r in runs)})",
        "",
        "| model | test balanced accuracy % | accuracy % | per class: right/images (95% lower bound) | "
        "change vs input (points) | paired images (lost / gained) | McNemar p |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for i, name in enumerate(STEPS):
        p, y = _pool(per_run, i)
        bal = balanced_accuracy(p, y)
        change, pairs, pv = "", "", ""
        if i >= 2:
            pp, _ = _pool(per_run, i - 1)
            t = mcnemar(pp == y, p == y)
            change = f"{100 * (bal - balanced_accuracy(pp, y)):+.2f}"
            pairs, pv = f"{t['a_only']} / {t['b_only']}", f"{t['p']:.2g}"
        lines.append(
            f"| {name} | {100 * bal:.2f} | {100 * (p == y).mean():.2f} | {per_class(p, y, classes)} | "
            f"{change} | {pairs} | {pv} |"
        )
    return lines + [""]


def _ba(p: np.ndarray, y: np.ndarray) -> str:
    return f"{100 * balanced_accuracy(p, y):.2f} +- {196 * balanced_accuracy_se(p, y):.1f}"


def _diff(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> str:
    d, lo, hi = balanced_accuracy_diff(*a, *b)
    return f"{100 * d:+.2f} ({100 * lo:+.1f} to {100 * hi:+.1f})"


def same_classes(flag: str, folders: list[Path], classes: list[str], first: Path) -> None:
    for r in folders:
        if load(r / "bench.json")["classes"] != classes:
            raise SystemExit(f"{flag}: {r} has other classes than {first}")


def control(
    runs: list[Path],
    ctrl: list[Path],
    classes: list[str],
    fulls: list[Path] = (),
    whole_steps: list | None = None,
) -> list[str]:
    """Every step of `runs` against the same step of `ctrl` (a balanced subset of the same size: what
    having fewer images costs, without the imbalance), and of `ctrl` against `fulls` (runs on the whole
    balanced dataset, pooled; `whole_steps`: their steps_by_role) when given. Other images, so no paired test: each pooled balanced accuracy
    with its standard error, each difference with a 95% interval. The intervals cover the sampling of
    test images only, the trained models held fixed."""
    same_classes("--control", ctrl, classes, runs[0])
    mine, theirs = [steps_by_role(r) for r in runs], [steps_by_role(r) for r in ctrl]
    whole = [_pool(whole_steps, i) for i in range(len(STEPS))] if whole_steps else None
    full = ", ".join(f"`{r}`" for r in fulls)
    lines = [
        f"### Against a balanced subset of the same size ({', '.join(f'`{r}`' for r in ctrl)})",
        "",
        "Pooled test balanced accuracy +- 1.96 standard errors (per class Agresti-Caffo); differences with "
        "their 95% interval (other images: no paired test; test sampling only, the models held fixed).",
        "",
    ]
    head = "| model | imbalanced % | balanced subset % | imbalanced - balanced subset (points) |"
    rule = "|---|---:|---:|---:|"
    if whole:
        head += f" {full} % | balanced subset - full dataset (points) |"
        rule += "---:|---:|"
    lines += [head + " balanced subset per class |", rule + "---|"]
    for i, name in enumerate(STEPS):
        a, b = _pool(mine, i), _pool(theirs, i)
        row = f"| {name} | {_ba(*a)} | {_ba(*b)} | {_diff(a, b)} |"
        if whole:
            row += f" {_ba(*whole[i])} | {_diff(b, whole[i])} |"
        lines.append(row + f" {per_class(*b, classes)} |")
    return lines + [""]


def against_full(
    mine: list[list[tuple[np.ndarray, np.ndarray]]], whole: list[list[tuple[np.ndarray, np.ndarray]]]
) -> list[tuple[str, str, str, str]]:
    """(step, subsets pooled, full dataset pooled, subsets - full) for every step of STEPS: each pooled
    balanced accuracy +- 1.96 standard errors, the difference with its 95% interval (other images)."""
    rows = []
    for i, name in enumerate(STEPS):
        a, b = _pool(mine, i), _pool(whole, i)
        rows.append((name, _ba(*a), _ba(*b), _diff(a, b)))
    return rows


def full_table(runs: list[Path], fulls: list[Path], whole: list) -> list[str]:
    """The subsets' every step against the same step on the whole dataset (`fulls`, e.g. three training
    seeds of `slimvit run` on NEU-DET, pooled; `whole`: their steps_by_role): what having only the
    subset's images costs a user."""
    rows = against_full([steps_by_role(r) for r in runs], whole)
    lines = [
        f"### Against the full dataset ({', '.join(f'`{r}`' for r in fulls)})",
        "",
        "Pooled test balanced accuracy +- 1.96 standard errors (per class Agresti-Caffo); the difference with "
        "its 95% interval (other images: no paired test; test sampling only, the models held fixed).",
        "",
        "| model | subsets % | full dataset % | subsets - full dataset (points) |",
        "|---|---:|---:|---:|",
    ]
    return lines + [f"| {' | '.join(row)} |" for row in rows] + [""]


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
    ap.add_argument(
        "--balanced",
        default=None,
        help="finished runs on the whole balanced dataset to compare with, comma-separated (several, e.g. "
        "three training seeds, are pooled)",
    )
    ap.add_argument(
        "--twin", action="store_true", help="also train teacher + student with train.balance=none"
    )
    ap.add_argument("--seeds", default="0", help="subset seeds, comma-separated: one run each, pooled")
    ap.add_argument(
        "--counts", default=COUNTS, help=f"images per class, sorted class order (default {COUNTS})"
    )
    ap.add_argument(
        "--control",
        default=None,
        help="a finished run of a balanced subset of the same size (its seed-0 folder; the same --seeds), "
        "e.g. runs/bal130 from --counts 130,130,130,130,130,130: what the imbalance costs, apart from size",
    )
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="passed to slimvit run")
    args = ap.parse_args()
    try:
        seeds = [int(x) for x in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"--seeds {args.seeds!r}: give integers separated by commas, e.g. 0,1,2") from None
    counts = args.counts.replace(" ", "")
    # the default subsets keep their folder names (runs/data/NEU-DET-imbalanced[-s<seed>]); others say their counts
    stem = "NEU-DET-imbalanced" if counts == COUNTS else "NEU-DET-" + counts.replace(",", "-")

    sets = [a for s in args.overrides for a in ("--set", s)]
    out = Path(args.out)
    runs, subsets = [], []
    for seed in seeds:
        (subset,) = seed_runs(Path("runs/data") / stem, [seed])
        subsets.append(subset)
        if not (subset / "SUBSET.json").exists():
            subset.parent.mkdir(parents=True, exist_ok=True)
            sh(slimvit(), "subset", args.data, str(subset), "--counts", counts, "--seed", str(seed))
        (run,) = seed_runs(out, [seed])
        # exit 2 with a finished report: no candidate met the deploy rule (the summary says so)
        rc = sh(
            slimvit(),
            "run",
            "--preset",
            "neu-det",
            "--data",
            str(subset),
            "--out",
            str(run),
            *sets,
            ok=(0, 2),
        )
        finished(rc, run)
        runs.append(run)
    lines = [
        "# Imbalanced NEU-DET benchmark" if counts == COUNTS else f"# NEU-DET subset benchmark ({counts})",
        "",
        f"Subset: {counts} images per class (slimvit subset, seed {args.seeds}).",
        "",
    ]
    kind = "Imbalanced subset" if counts == COUNTS else "Subset"
    for seed, run in zip(seeds, runs, strict=True):
        lines += summary(run, f"{kind}, seed {seed}")
    classes = load(runs[0] / "bench.json")["classes"]
    if len(runs) > 1:
        lines += pooled(runs, classes)
    fulls = [Path(f) for f in args.balanced.split(",")] if args.balanced else []
    if missing := [f for f in fulls if not (f / "deploy" / "deploy.json").exists()]:
        print(
            f"note: no finished run in {', '.join(map(str, missing))}; run `make run` first to compare with it"
        )
        fulls = []
    same_classes("--balanced", fulls, classes, runs[0])
    deployed = all((r / "deploy" / "deploy.json").exists() for r in runs)
    whole = [steps_by_role(r) for r in fulls] if fulls and deployed else None  # read once for both tables
    if whole:
        lines += full_table(runs, fulls, whole)
    elif fulls:
        print("note: not every subset run deployed a model; no comparison with --balanced")
    if args.control:
        ctrl = seed_runs(Path(args.control), seeds)
        if deployed and all((r / "deploy" / "deploy.json").exists() for r in ctrl):
            lines += control(runs, ctrl, classes, fulls, whole)
        else:
            print(
                f"note: --control {args.control}: not every run deployed a model ({', '.join(map(str, ctrl))}); "
                "no comparison"
            )
    for full in fulls:
        lines += summary(full, "Balanced NEU-DET")
    if args.twin:
        subset, out = subsets[0], runs[0]
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
        lines += twin(out, nobal)  # the first seed's subset
    atomic_write_text(runs[0] / "IMBALANCED.md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
