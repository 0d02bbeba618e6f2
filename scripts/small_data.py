"""The small-data benchmark: what a user with a few dozen images a class gets from the default pipeline.

    python scripts/small_data.py [--data ../shared/datasets/NEU-DET] [--classes crazing,patches,scratches]
                                 [--per-class 60] [--seeds 0,1,2] [--out runs/small3x60]
                                 [--set SECTION.KEY=VALUE ...]

For each seed, NEU-DET is cut to `--per-class` images of each of `--classes` (seed 0: the files numbered
1..N, as a user who took the first images would; other seeds: a seeded draw), the default pipeline runs on
that folder (`slimvit run`), and every model a deployment rests on (teacher, student, pruned, the deployed
model's FP32 file, the deployed model) is scored on **all of NEU-DET's other images of those classes**: an
external check set the run never sees, far larger than the run's own test split. All scoring goes through
`slimvit predict`'s torch-free path on the ONNX files.

Writes OUT/SMALL.md (per seed and pooled: each step against its input with an exact McNemar test on the
same images; the deployed model against the student; whether the run's own stated test accuracy lies in
the 95% interval of the external figure; batch-1 speed against the student's ONNX FP32 file) and
OUT/small.json. Every run folder resumes (run the same command again); nothing retrains once done.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from imbalanced import finished, sh  # noqa: E402

from slimvit.data import discover  # noqa: E402
from slimvit.evaluate import wilson  # noqa: E402
from slimvit.predict import predict_files  # noqa: E402
from slimvit.report.stats import accuracy_text, paired_text  # noqa: E402

STEPS = ("teacher", "student", "pruned", "deployed FP32 file", "deployed")


def _number(path: str) -> int:
    m = re.search(r"(\d+)(?=\.[^.]+$)", path)
    return int(m.group(1)) if m else 0


def make_folders(src: Path, classes: list[str], n: int, seed: int, root: Path) -> tuple[Path, Path]:
    """The subset (<class>/<file>, `n` a class) and its external check set (every other image of those
    classes), each written to a temporary folder and renamed, so either is complete or absent."""
    name = f"small-{'-'.join(c[:4] for c in classes)}-{n}-s{seed}"
    sub, check = root / name, root / f"{name}-check"
    if sub.exists() and check.exists():
        return sub, check
    index = discover(src)
    missing = [c for c in classes if c not in index.classes]
    if missing:
        raise SystemExit(f"'{src}' has no class {missing[0]!r}; it has {', '.join(index.classes)}")
    rng = np.random.default_rng(seed)
    picked: dict[str, list[str]] = {}
    for c in classes:
        label = index.classes.index(c)
        members = sorted((s.path for s in index.samples if s.label == label), key=_number)
        if n >= len(members):
            raise SystemExit(
                f"class {c!r} has {len(members)} images; --per-class {n} leaves none to check on"
            )
        take = (
            members[:n] if seed == 0 else sorted(rng.choice(members, n, replace=False).tolist(), key=_number)
        )
        picked[c] = take
        for folder, files in ((sub, take), (check, [m for m in members if m not in set(take)])):
            tmp = folder.with_name(f".{folder.name}.tmp") / c
            tmp.mkdir(parents=True, exist_ok=True)
            for rel in files:
                shutil.copyfile(index.root / rel, tmp / Path(rel).name)
    for folder in (sub, check):
        shutil.rmtree(folder, ignore_errors=True)
        tmp = folder.with_name(f".{folder.name}.tmp")
        if folder is sub:
            (tmp / "SUBSET.json").write_text(
                json.dumps({"source": str(src.resolve()), "seed": seed, "files": picked}, indent=1)
            )
        tmp.rename(folder)
    return sub, check


def carve_unlabeled(check: Path, k: int, seed: int) -> tuple[Path, Path]:
    """Split the check set: `k` images a class become an unlabeled folder (files renamed to numbers, one
    folder: no label is left in a path), the rest a smaller check set the run never sees."""
    unl, rest = check.with_name(f"{check.name}-unlabeled{k}"), check.with_name(f"{check.name}-minus{k}")
    if unl.exists() and rest.exists():
        return unl, rest
    rng = np.random.default_rng(1000 + seed)
    tmp_u, tmp_r = unl.with_name(f".{unl.name}.tmp"), rest.with_name(f".{rest.name}.tmp")
    for t in (tmp_u, tmp_r):
        shutil.rmtree(t, ignore_errors=True)
    tmp_u.mkdir(parents=True)
    i = 0
    for cdir in sorted(p for p in check.iterdir() if p.is_dir()):
        files = sorted(cdir.iterdir(), key=lambda p: _number(p.name))
        take = set(rng.choice(len(files), k, replace=False).tolist())
        (tmp_r / cdir.name).mkdir(parents=True)
        for j, f in enumerate(files):
            if j in take:
                shutil.copyfile(f, tmp_u / f"{i:05d}{f.suffix}")
                i += 1
            else:
                shutil.copyfile(f, tmp_r / cdir.name / f.name)
    for t, final in ((tmp_u, unl), (tmp_r, rest)):
        shutil.rmtree(final, ignore_errors=True)
        t.rename(final)
    return unl, rest


def score(model: Path, check: Path) -> tuple[np.ndarray, np.ndarray]:
    """(correct per image, labels) of an ONNX model on the check folder, in a fixed file order."""
    files = sorted(
        p for p in check.rglob("*") if p.is_file() and p.suffix.lower() in (".jpg", ".png", ".bmp")
    )
    results, failed = predict_files(model, files, threads=2)
    if failed:
        raise SystemExit(f"{len(failed)} check images could not be decoded, e.g. {failed[0]}")
    by = {r["path"]: r["class"] for r in results}
    labels = np.array([p.parent.name for p in files])
    return np.array([by[str(p)] == y for p, y in zip(files, labels, strict=True)]), labels


def models_of(run: Path) -> dict[str, Path]:
    exported = json.loads((run / "onnx" / "export.json").read_text())
    dep = json.loads((run / "deploy" / "deploy.json").read_text())
    out = {s: run / exported[s]["file"] for s in ("teacher", "student", "pruned")}
    if dep.get("deployed", True):
        out["deployed FP32 file"] = run / exported[dep["stage"]]["file"]
        out["deployed"] = run / "deploy" / "model.onnx"
    return out


def evaluate_run(run: Path, check: Path) -> dict:
    """Every step's external score, the run's stated figures and the deployed model's speed."""
    cache = run / f"external-{check.name}.json"
    if cache.exists() and cache.stat().st_mtime >= (run / "deploy" / "deploy.json").stat().st_mtime:
        return json.loads(cache.read_text())
    dep = json.loads((run / "deploy" / "deploy.json").read_text())
    bench = json.loads((run / "bench.json").read_text())
    rows = {r["key"]: r for r in bench["rows"]}
    student_onnx = rows.get("student/onnxruntime/fp32")
    out = {"run": str(run), "deploy": {k: dep.get(k) for k in ("key", "accuracy", "accuracy_ci", "why")}}
    out["speedup_vs_student_onnx"] = (
        student_onnx["latency_ms_p50"] / dep["latency_ms_p50"]
        if dep.get("deployed", True) and student_onnx
        else None
    )
    out["steps"] = {}
    for name, path in models_of(run).items():
        correct, labels = score(path, check)
        out["steps"][name] = {"correct": correct.astype(int).tolist()}
    out["labels"] = labels.tolist()
    out["val_images"] = rows.get("student/pytorch/fp32", {}).get("val_n")
    out["test_images"] = rows.get("student/pytorch/fp32", {}).get("n")
    out["deploy"]["agreement"] = dep.get("agreement")
    cache.write_text(json.dumps(out))
    return out


def score_candidates(run: Path, check: Path) -> dict:
    """Every deployment candidate's external score (one scoring per ONNX file: an OpenVINO row is scored
    through ONNX Runtime on the same file) beside what the run knew of it (validation, agreement, KL,
    latency), cached in the run folder: what a choice rule would have got, candidate by candidate."""
    from slimvit.deploy import is_candidate, val_score

    cache = run / f"candidates-{check.name}.json"
    bench_path = run / "bench.json"
    if cache.exists() and cache.stat().st_mtime >= bench_path.stat().st_mtime:
        return json.loads(cache.read_text())
    rows = json.loads(bench_path.read_text())["rows"]
    by_file: dict[str, list] = {}
    out = {}
    for r in rows:
        if not is_candidate(r):  # the student is scored once, by evaluate_run
            continue
        if r["file"] not in by_file:
            by_file[r["file"]] = score(run / r["file"], check)[0].astype(int).tolist()
        out[r["key"]] = {
            "correct": by_file[r["file"]],
            **{k: r.get(k) for k in ("ratio", "depth", "runtime", "precision", "latency_ms_p50", "size_mb")},
            "params": r.get("params"),
            "val": val_score(r),
            "agreement": r.get("agreement"),
            "kl": r.get("agreement_kl"),
        }
    cache.write_text(json.dumps(out))
    return out


def candidates_table(cands: dict, student: np.ndarray, title: str) -> list[str]:
    lines = [
        f"### Every candidate, {title}",
        "",
        "| candidate | params (M) | p50 ms | val % | agreement % | KL | external % | vs student (points, p) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, c in sorted(cands.items(), key=lambda kv: kv[1]["latency_ms_p50"]):
        right = np.array(c["correct"], bool)
        agree = "-" if c["agreement"] is None else f"{100 * c['agreement']:.1f}"
        kl = "-" if c["kl"] is None else f"{c['kl']:.4f}"
        params = "-" if c["params"] is None else f"{c['params'] / 1e6:.2f}"
        lines.append(
            f"| {key} | {params} | {c['latency_ms_p50']:.2f} | {100 * c['val']:.1f} | {agree} | {kl} | "
            f"{100 * right.mean():.2f} | {paired_text(right, student)} |"
        )
    return lines


def table(results: list[dict], title: str) -> list[str]:
    """Each step on the pooled check images: accuracy (95% interval), change vs its input, vs the student."""
    pooled = {}
    for name in STEPS:
        parts = [np.array(r["steps"][name]["correct"], bool) for r in results if name in r["steps"]]
        if len(parts) == len(results):
            pooled[name] = np.concatenate(parts)
    n = len(next(iter(pooled.values())))
    lines = [
        f"### {title} ({n} external check images)",
        "",
        "| model | external accuracy % (95% CI) | vs its input (points; only this / only input right, McNemar p) | vs student |",
        "|---|---:|---:|---:|",
    ]
    prev = None
    for name, c in pooled.items():
        vs_in = (
            paired_text(c, pooled[prev])
            if prev in pooled and name not in ("student",) and prev != "teacher"
            else ""
        )
        vs_st = paired_text(c, pooled["student"]) if name not in ("teacher", "student") else ""
        lines.append(f"| {name} | {accuracy_text(c)} | {vs_in} | {vs_st} |")
        prev = name
    return lines


def per_seed(results: list[dict]) -> list[str]:
    lines = [
        "| run | val / test images | deployed | stated test % (95% CI) | external % | stated inside external CI | "
        "deployed - student (points) | agreement % | speed-up vs student ONNX FP32 |",
        "|---|---:|---|---:|---:|---|---:|---:|---:|",
    ]
    for r in results:
        d = r["deploy"]
        if "deployed" not in r["steps"]:
            lines.append(
                f"| `{r['run']}` | {r['val_images']} / {r['test_images']} | nothing deployed | | | | | | |"
            )
            continue
        c = np.array(r["steps"]["deployed"]["correct"], bool)
        s = np.array(r["steps"]["student"]["correct"], bool)
        lo, hi = wilson(int(c.sum()), len(c))
        ci = d.get("accuracy_ci") or [float("nan")] * 2
        inside = lo - 1e-9 <= d["accuracy"] <= hi + 1e-9
        agree = f"{100 * d['agreement']:.2f}" if d.get("agreement") is not None else "-"
        lines.append(
            f"| `{r['run']}` | {r['val_images']} / {r['test_images']} | {d['key']} | {100 * d['accuracy']:.2f} "
            f"({100 * ci[0]:.1f}-{100 * ci[1]:.1f}) | {100 * c.mean():.2f} | {'yes' if inside else '**no**'} | "
            f"{100 * (c.mean() - s.mean()):+.2f} | {agree} | {r['speedup_vs_student_onnx']:.2f}x |"
        )
    return lines


def stated_vs_external(results: list[dict]) -> list[str]:
    """The runs' own stated test accuracy of the deployed model, pooled over the seeds (weighted by their
    test images), against the pooled external figure's 95% interval."""
    done = [r for r in results if "deployed" in r["steps"]]
    if not done:
        return []
    n = sum(r["test_images"] for r in done)
    stated = sum(r["deploy"]["accuracy"] * r["test_images"] for r in done) / n
    c = np.concatenate([np.array(r["steps"]["deployed"]["correct"], bool) for r in done])
    lo, hi = wilson(int(c.sum()), len(c))
    inside = lo - 1e-9 <= stated <= hi + 1e-9
    return [
        f"Pooled: the runs stated {100 * stated:.2f}% for their deployed models ({n} test images); on the "
        f"{len(c)} external images they got {100 * c.mean():.2f}% (95% CI {100 * lo:.2f}-{100 * hi:.2f}): "
        + ("inside." if inside else "**outside**.")
    ]


def said_of_unlabeled(results: list[dict]) -> list[str]:
    """Each run's Conclusions line on its `--unlabeled` images (report.overview._shift_line)."""
    out = []
    for r in results:
        text = (Path(r["run"]) / "REPORT.md").read_text()
        line = next((x for x in text.splitlines() if x.startswith(("- **Your ", "- On your "))), "- (none)")
        c = np.array(r["steps"].get("deployed", {}).get("correct", []), bool)
        got = f"{100 * c.mean():.2f}% on {len(c)} other check images" if len(c) else "nothing deployed"
        out.append(f"- `{r['run']}` ({got}): {line[2:]}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/datasets/NEU-DET")
    ap.add_argument("--classes", default="crazing,patches,scratches")
    ap.add_argument("--per-class", type=int, default=60)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default=None, help="default runs/small<classes>x<per-class>")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument(
        "--report-only", action="store_true", help="write SMALL.md from finished runs; run nothing"
    )
    ap.add_argument(
        "--unlabeled-per-class",
        type=int,
        default=0,
        metavar="K",
        help="also: K check images a class given to a copy of each run as `--unlabeled` (no labels); both "
        "runs scored on the other check images (paired)",
    )
    ap.add_argument(
        "--candidates",
        action="store_true",
        help="also score every deployment candidate on the check set (what each choice would have got)",
    )
    args = ap.parse_args()
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out or f"runs/small{len(classes)}x{args.per_class}")
    slimvit = str(Path(sys.executable).with_name("slimvit"))
    results, with_unlabeled, without_unlabeled = [], [], []
    extra = [a for kv in args.overrides for a in ("--set", kv)]
    for seed in seeds:
        sub, check = make_folders(Path(args.data), classes, args.per_class, seed, Path("runs/data"))
        run = out / f"s{seed}"
        if not args.report_only:
            finished(sh(slimvit, "run", "--data", str(sub), "--out", str(run), *extra, ok=(0, 2)), run)
        results.append(evaluate_run(run, check))
        if args.candidates:
            results[-1]["candidates"] = score_candidates(run, check)
        if args.unlabeled_per_class:
            unl, rest = carve_unlabeled(check, args.unlabeled_per_class, seed)
            run_u = out / f"s{seed}-unlabeled{args.unlabeled_per_class}"
            if not args.report_only:
                if not run_u.exists():  # the same teacher, student and pruned models: bench onwards redone
                    shutil.copytree(run, run_u)
                cmd = [
                    "run",
                    "--data",
                    str(sub),
                    "--out",
                    str(run_u),
                    "--unlabeled",
                    str(unl),
                    "--force",
                    "bench",
                ]
                finished(sh(slimvit, *cmd, *extra, ok=(0, 2)), run_u)
            without_unlabeled.append(evaluate_run(run, rest))
            with_unlabeled.append(evaluate_run(run_u, rest))
    lines = [
        f"# Small-data benchmark: {len(classes)} classes ({', '.join(classes)}) x {args.per_class} images",
        "",
        f"`python scripts/small_data.py --classes {','.join(classes)} --per-class {args.per_class} "
        f"--seeds {args.seeds} --out {out}`" + "".join(f" --set {kv}" for kv in args.overrides),
        "",
        "External check set: every other NEU-DET image of these classes (never seen by the run).",
        "",
        *per_seed(results),
        "",
        *stated_vs_external(results),
        "",
        *table(results, "pooled over the seeds"),
        "",
    ]
    for r, seed in zip(results, seeds, strict=True):
        lines += [*table([r], f"seed {seed}"), ""]
        if "candidates" in r:
            student = np.array(r["steps"]["student"]["correct"], bool)
            lines += [*candidates_table(r["candidates"], student, f"seed {seed}"), ""]
    if with_unlabeled:
        deployed = [
            np.concatenate([np.array(r["steps"]["deployed"]["correct"], bool) for r in rs])
            for rs in (with_unlabeled, without_unlabeled)
        ]
        lines += [
            f"## With `--unlabeled` ({args.unlabeled_per_class} check images a class given without labels)",
            "",
            "The same runs redone from the bench on, every run scored on the other check images (paired).",
            "",
            *per_seed(with_unlabeled),
            "",
            "What each run's REPORT.md says of its unlabeled images (the deployed model against the teacher, "
            "label-free), beside what they scored:",
            "",
            *said_of_unlabeled(with_unlabeled),
            "",
            *table(with_unlabeled, "pooled, with --unlabeled"),
            "",
            f"Deployed with `--unlabeled` vs without, same images: {paired_text(*deployed)} (points; only with / only "
            "without right, McNemar p).",
            "",
        ]
    (out / "SMALL.md").write_text("\n".join(lines))
    (out / "small.json").write_text(
        json.dumps([{k: v for k, v in r.items() if k not in ("labels", "candidates")} for r in results])
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
