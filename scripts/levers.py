"""The student lever study: students distilled from one run's teacher under the default recipe and under
each lever, over several training seeds; a lever is judged on pooled validation, test is reported.

    python scripts/levers.py --base runs/neu-det [--seeds 0,1,2] [--out runs/levers]
                             [--lever NAME=KEY=VALUE[,KEY=VALUE...]] ... [--report-only]

Each (lever, seed) trains in OUT/<lever>/s<seed>/: the base run's split.json and teacher/ are copied in
(the teacher is held fixed, so the lever and the seed are all that change), then `train.run_distill` runs
with the base run's config.yaml, the lever's keys and `train.seed`. `default` is the base config itself.
Every folder resumes: one whose student/ holds eval.json and val.json is read, not retrained.

Writes OUT/LEVERS.md: per lever, validation and test accuracy per seed; pooled over the seeds with Wilson
95% intervals; the pooled paired McNemar test against the default recipe on the same (seed, image) pairs,
on validation (what decides) and test (reported); the student against the teacher on test; training time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from slimvit.evaluate import mcnemar, wilson
from slimvit.labels import pct_ci as pct_interval

LEVERS = {
    "ema": "train.ema=true",
    "consistent": "train.mixup=0.8,train.cutmix=1.0",  # the teacher sees the same mixed view (live logits)
}


def parse_lever(text: str) -> tuple[str, list[str]]:
    name, sep, keys = text.partition("=")
    if not sep or not keys or "=" not in keys:
        raise SystemExit(f"--lever {text!r}: expected NAME=KEY=VALUE[,KEY=VALUE...]")
    return name, keys.split(",")


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def train_one(base: Path, folder: Path, overrides: list[str]) -> None:
    """The student of one (lever, seed) in `folder`, from the base run's split and teacher."""
    from slimvit import models
    from slimvit.config import load_config, save_config
    from slimvit.data import load_data
    from slimvit.evaluate import evaluate_model
    from slimvit.io import atomic_write_json
    from slimvit.train import run_distill

    student = folder / "student"
    if (student / "eval.json").exists() and (student / "val.json").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(base / "split.json", folder / "split.json")
    if not (folder / "teacher").exists():
        tmp = folder / ".teacher.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(base / "teacher", tmp, ignore=shutil.ignore_patterns("checkpoint.pt"))
        tmp.rename(folder / "teacher")
    cfg = load_config(config_file=base / "config.yaml", overrides=overrides)
    save_config(cfg, folder / "config.yaml")
    print(f"+ {folder}: {' '.join(overrides)}", flush=True)
    data = load_data(cfg.data, folder)
    if cfg == load_config(config_file=base / "config.yaml") and (base / "student" / "eval.json").exists():
        if not (student / "eval.json").exists():  # the base run's own student: the same recipe and seed
            tmp = folder / ".student.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(base / "student", tmp, ignore=shutil.ignore_patterns("checkpoint.pt"))
            tmp.rename(student)
    else:
        run_distill(cfg, folder, data, resume="auto")
    model, spec = models.load(student)
    atomic_write_json(student / "val.json", evaluate_model(model.eval(), data, spec, "val"))


def outcome(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(correct per image, labels) of the student in `folder` on `split` (val or test)."""
    ev = load(folder / "student" / ("val.json" if split == "val" else "eval.json"))
    pred, labels = np.array(ev["pred"]), np.array(ev["labels"])
    return pred == labels, labels


def pct_ci(correct: np.ndarray) -> str:
    return pct_interval(correct.mean(), wilson(int(correct.sum()), len(correct)), unit="")


def paired(a: np.ndarray, b: np.ndarray) -> str:
    t = mcnemar(a, b)
    return f"{100 * (a.mean() - b.mean()):+.2f} ({t['a_only']}/{t['b_only']}, p={t['p']:.2g})"


def table(out: Path, base: Path, levers: dict[str, list[str]], seeds: list[int]) -> list[str]:
    folders = {n: [out / n / f"s{s}" for s in seeds] for n in levers}
    done = {n: fs for n, fs in folders.items() if all((f / "student" / "val.json").exists() for f in fs)}
    if "default" not in done:
        raise SystemExit(f"the default recipe has not finished every seed under {out}")
    pooled = {
        n: {sp: np.concatenate([outcome(f, sp)[0] for f in fs]) for sp in ("val", "test")}
        for n, fs in done.items()
    }
    teacher = load(base / "teacher" / "eval.json")
    t_right = np.array(teacher["pred"]) == np.array(teacher["labels"])
    lines = [
        f"# Student levers: {len(seeds)} training seeds ({', '.join(map(str, seeds))}), one teacher",
        "",
        f"`python scripts/levers.py --base {base} --seeds {','.join(map(str, seeds))} --out {out}"
        + "".join(
            f" --lever {n}={','.join(k)}"
            for n, k in levers.items()
            if n != "default" and LEVERS.get(n) != ",".join(k)
        )
        + "`",
        "",
        f"Teacher (`{base}/teacher`, fixed): test {pct_ci(t_right)}. Pooled: every seed's images (validation "
        f"{len(pooled['default']['val'])}, test {len(pooled['default']['test'])}); vs default: points, "
        "(only this right / only default right, exact McNemar p) on the same (seed, image) pairs. "
        "Validation decides; test is reported. Student vs teacher: the one teacher's test predictions paired "
        "with each seed's student (the teacher's side repeats, so its p-value is optimistic).",
        "",
        "| lever | keys | val % per seed | test % per seed | pooled val % (95% CI) | vs default, val | "
        "pooled test % (95% CI) | vs default, test | student vs teacher, test | minutes per student |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for n, fs in done.items():
        per = {sp: " / ".join(f"{100 * outcome(f, sp)[0].mean():.2f}" for f in fs) for sp in ("val", "test")}
        p = pooled[n]
        vs = {sp: "" if n == "default" else paired(p[sp], pooled["default"][sp]) for sp in ("val", "test")}
        minutes = np.mean([load(f / "student" / "train.json")["seconds"] / 60 for f in fs])
        vs_teacher = paired(p["test"], np.tile(t_right, len(fs)))
        lines.append(
            f"| {n} | `{','.join(levers[n]) or '(base config)'}` | {per['val']} | {per['test']} | {pct_ci(p['val'])} | "
            f"{vs['val']} | {pct_ci(p['test'])} | {vs['test']} | {vs_teacher} | {minutes:.1f} |"
        )
    missing = [n for n in folders if n not in done]
    if missing:
        lines += ["", f"Not finished: {', '.join(missing)} (run the same command again)."]
    return lines + [""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="a finished run: its split, teacher and config")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", type=Path, default=Path("runs/levers"))
    ap.add_argument(
        "--lever",
        action="append",
        default=[],
        help="NAME=KEY=VALUE[,KEY=VALUE...]; default: " + "; ".join(f"{n}={k}" for n, k in LEVERS.items()),
    )
    ap.add_argument("--report-only", action="store_true", help="write LEVERS.md from finished folders")
    args = ap.parse_args()
    for need in ("config.yaml", "split.json", "teacher/model.safetensors", "teacher/eval.json"):
        if not (args.base / need).exists():
            raise SystemExit(f"--base {args.base}: no {need} (a run whose teacher stage finished)")
    seeds = [int(s) for s in args.seeds.split(",")]
    given = dict(map(parse_lever, args.lever)) if args.lever else {n: k.split(",") for n, k in LEVERS.items()}
    levers = {"default": [], **given}
    if not args.report_only:
        for n, keys in levers.items():
            for s in seeds:
                train_one(args.base, args.out / n / f"s{s}", [*keys, f"train.seed={s}"])
    lines = table(args.out, args.base, levers, seeds)
    (args.out / "LEVERS.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
