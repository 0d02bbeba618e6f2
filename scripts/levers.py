"""The student lever study: students distilled from one run's teacher under the default recipe and under
each lever, over several training seeds; a lever is judged on pooled validation, test is reported.

    python scripts/levers.py --base runs/neu-det [--seeds 0,1,2 | --folds K] [--out runs/levers]
                             [--lever NAME=KEY=VALUE[,KEY=VALUE...] ... | --lever none] [--pipeline]
                             [--report-only]

Each (lever, seed) trains in OUT/<lever>/s<seed>/: the base run's split.json and teacher/ are copied in
(the teacher is held fixed, so the lever and the seed are all that change), then `train.run_distill` runs
with the base run's config.yaml (as that run was made: a key added to slimvit since takes its default, not
today's preset), the lever's keys and `train.seed`. `default` is the base config itself; `--lever none` runs
it alone (the default recipe's seeds, no lever).
Every folder resumes: one whose student/ holds eval.json and val.json is read, not retrained.

A lever of the teacher (a key `model.teacher` or `train.teacher_*`) trains its own teacher once, in
OUT/<lever>/teacher-run (the base run's split, the base config's seed, the lever's keys), and its seeds'
students distil from that one: the recipe is the teacher and its students. LEVERS.md pairs each lever's
students with their own teacher.

Writes OUT/LEVERS.md: per lever, validation and test accuracy per seed; pooled over the seeds with Wilson
95% intervals; the pooled paired McNemar test against the default recipe on the same (seed, image) pairs,
on validation (what decides) and test (reported); the student against the teacher on test; training time.

--pipeline runs the whole pipeline (`slimvit run`) for each (lever, seed) instead of the student alone, from
the same split and teacher (OUT/<lever>/s<seed> is a run folder; the base run stands for the default recipe
at its own seed; a lever's folder starts as a copy of the default recipe's at its seed, so only the stages its
keys make stale run), and LEVERS.md adds the deployed model: per seed and pooled, against the default recipe's
deployed models and the teacher, what each compression step cost (pooled, against its input), and the
pipeline's minutes from the student on. Last, the test images the most models (students, and deployed models
with --pipeline) got wrong, with the teacher's verdict: the errors no lever here shakes.

--folds K (with --pipeline) judges on cross-validation instead of seeds: the base run's train + val images are
cut into K folds (stratified; test unchanged), and each fold is validation once, for every recipe, at the base
config's training seed. 180 validation images decide little at 99%: K folds put all 1,440 of NEU-DET's train +
val images under validation, once each. Every fold trains its own teacher (its validation images were in the
base run's training split), in OUT/default/f<k>, a whole run of the default recipe on that fold; each lever's
OUT/<lever>/f<k> starts as a copy of it, as with seeds. Training uses (K - 1) / K of train + val: with K = 4,
1,080 images instead of 1,260.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from slimvit.io import atomic_path, atomic_write_text
from slimvit.report.stats import accuracy_text, paired_text

TEACHER_KEYS = ("model.teacher=", "train.teacher_")  # the keys that make a lever train its own teacher

LEVERS = {
    "ema": "train.ema=true",
    "consistent": "train.mixup=0.8,train.cutmix=1.0",  # the teacher sees the same mixed view (live logits)
}


def parse_lever(text: str) -> tuple[str, list[str]]:
    name, sep, keys = text.partition("=")
    if not sep or not keys or "=" not in keys:
        raise SystemExit(f"--lever {text!r}: expected NAME=KEY=VALUE[,KEY=VALUE...]")
    return name, keys.split(",")


def given_levers(texts: list[str], builtin: dict[str, str]) -> dict[str, list[str]]:
    """The levers of repeated `--lever` options: NAME=KEY=VALUE[,...] each, `none` alone for none (the default
    recipe alone), nothing for the script's `builtin` ones."""
    if "none" in texts and len(texts) > 1:
        raise SystemExit("--lever none runs the default recipe alone: give it without other levers")
    if texts == ["none"]:
        return {}
    if texts:
        return dict(map(parse_lever, texts))
    return {n: k.split(",") for n, k in builtin.items()}


def load(path: Path) -> dict:
    return json.loads(path.read_text())


@functools.cache
def finished_run(folder: Path) -> dict:
    """A finished run's records (report.load_run), read once for all the tables of one LEVERS.md (table()
    clears it first)."""
    from slimvit import report

    return report.load_run(folder)


def seed_folder(base: Path, folder: Path, teacher: Path | None = None) -> None:
    """The base run's split and the teacher of `teacher` (a folder holding teacher/; the base run by
    default) in `folder`, with their times kept: a pipeline run there takes them for finished
    (manifest.adopt) rather than newer than each other."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("split.json", "data.json"):
        if not (folder / name).exists():
            with atomic_path(folder / name) as tmp:
                shutil.copy2(base / name, tmp)
    if teacher != folder and not (folder / "teacher").exists():
        copy_folder((teacher or base) / "teacher", folder / "teacher")


def own_teacher(keys: list[str]) -> bool:
    """Whether a lever's keys change the teacher: then it trains its own (teacher_home)."""
    return any(k.startswith(TEACHER_KEYS) for k in keys)


def teacher_home(base: Path, out: Path, name: str, keys: list[str]) -> Path:
    """The folder whose teacher/ the lever's students distil from: the base run's, or the lever's own."""
    return out / name / "teacher-run" if own_teacher(keys) else base


def train_teacher(base: Path, home: Path, keys: list[str]) -> None:
    """A teacher lever's teacher in `home`/teacher: the base run's split and config, the lever's keys, the
    base config's seed. Resumes; a finished one (teacher/eval.json) is only read."""
    from slimvit.config import read_config, save_config
    from slimvit.data import load_data
    from slimvit.train import run_teacher

    if (home / "teacher" / "eval.json").exists():
        return
    seed_folder(base, home, teacher=home)
    cfg = read_config(base / "config.yaml", keys)
    save_config(cfg, home / "config.yaml")
    print(f"+ {home}: the teacher of {' '.join(keys)}", flush=True)
    run_teacher(cfg, home, load_data(cfg.data, home), resume="auto")


def copy_folder(src: Path, dst: Path, skip: tuple[str, ...] = ("checkpoint.pt",)) -> None:
    """`src` copied to `dst` whole or not at all (a .tmp sibling, then a rename), file times kept, without
    the files matching `skip` (a training checkpoint is not part of a finished stage)."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(*skip))
    tmp.rename(dst)


def run_pipeline(
    base: Path, folder: Path, overrides: list[str], reuse: Path | None = None, teacher: Path | None = None
) -> None:
    """The whole pipeline of one (lever, seed) in `folder` (run_folder) from the base run's split and the
    teacher of `teacher` (teacher_home; the base run's by default). `reuse`, the default recipe's finished
    run at the same seed, is copied in first (its manifest with it) where the teacher is the same:
    `slimvit run` then redoes exactly the stages the lever's keys make stale, so a lever of the pruning or
    the deploy choice does not train the same student again. Resumes: `slimvit run` only checks a finished
    folder."""
    from slimvit.config import read_config, save_config

    if folder == base:
        return
    same_teacher = teacher in (None, base)
    if (
        same_teacher
        and reuse is not None
        and not folder.exists()
        and (reuse / "deploy" / "deploy.json").exists()
    ):
        # without deploy/: a lever's folder counts as finished (deploy.json) only once its own run got there
        copy_folder(reuse, folder, skip=("checkpoint.pt", ".lock", "*.log", "deploy"))
    seed_folder(base, folder, teacher)
    save_config(read_config(base / "config.yaml", overrides), folder / "config.yaml")
    slimvit_run(folder, overrides)


def slimvit_run(folder: Path, overrides: list[str]) -> None:
    """`slimvit run` on the config.yaml already in `folder`: runs the stages not finished there, only checks
    a finished folder."""
    from slimvit.deploy import nothing_deployed

    print(f"+ {folder}: {' '.join(overrides)}", flush=True)
    slimvit = str(Path(sys.executable).with_name("slimvit"))
    rc = subprocess.run(
        [slimvit, "run", "--config", str(folder / "config.yaml"), "--out", str(folder)]
    ).returncode
    if rc == 2 and nothing_deployed(folder):  # a finished run: the deploy rule's own verdict, kept as one
        print(f"note: {folder}: no candidate met the deploy rule; the study goes on", flush=True)
    elif rc:
        raise SystemExit(f"slimvit run --out {folder} exited {rc} (run the same command again to resume)")


def fold_split(split: dict, index, k: int, fold: int) -> dict:
    """The base run's split.json with its train + val images re-cut into `k` folds, stratified by class:
    fold `fold` is validation, the other k - 1 are training; test is unchanged. Byte-identical files stay
    in one fold (as data.make_split keeps them on one side); each class's groups are shuffled once (the
    same for every fold) and dealt to the fold with the fewest of that class's images."""
    import random

    by_path = {s.path: i for i, s in enumerate(index.samples)}
    try:
        pool = [by_path[p] for p in (*split["train"], *split["val"])]
    except KeyError as e:
        raise SystemExit(f"split.json names {e}, which the dataset at {index.root} does not have") from None
    groups: dict[str, list[int]] = {}
    for i in pool:
        groups.setdefault(index.hashes[i], []).append(i)
    folds: list[list[int]] = [[] for _ in range(k)]
    for label, name in enumerate(index.classes):
        mine = sorted((g for g in groups.values() if index.samples[g[0]].label == label), key=lambda g: g[0])
        random.Random(f"fold:{name}").shuffle(mine)
        filled = [0] * k
        for g in mine:
            f = filled.index(min(filled))
            folds[f] += g
            filled[f] += len(g)
    paths = {
        "train": sorted(index.samples[i].path for f, ids in enumerate(folds) if f != fold for i in ids),
        "val": sorted(index.samples[i].path for i in folds[fold]),
    }
    return {**split, **paths, "fold": {"k": k, "index": fold}}


def run_fold(base: Path, folder: Path, k: int, fold: int) -> None:
    """The default recipe's whole pipeline on fold `fold` of `k` (fold_split of the base run's split), its
    own teacher included: the fold's validation images were in the base run's training split, so the base
    run's teacher may not serve it. The config is the base run's. Resumes like run_pipeline."""
    from slimvit.config import read_config, save_config
    from slimvit.data import describe, discover, load_data
    from slimvit.io import atomic_write_json

    cfg = read_config(base / "config.yaml")
    if (folder / "split.json").exists():
        if load(folder / "split.json").get("fold") != {"k": k, "index": fold}:
            raise SystemExit(f"{folder} holds another split than fold {fold} of {k}: use another --out")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        cut = fold_split(load(base / "split.json"), discover(cfg.data.path), k, fold)
        atomic_write_json(folder / "split.json", cut)
    if not (folder / "data.json").exists():
        # the data stage's two outputs both present: `slimvit run` takes the stage for finished (as with a
        # seed's copied split) instead of redoing it, which would make the config's split again
        atomic_write_json(folder / "data.json", describe(load_data(cfg.data, folder, progress=False)))
    save_config(cfg, folder / "config.yaml")
    slimvit_run(folder, [f"fold {fold} of {k}"])


def train_one(base: Path, folder: Path, overrides: list[str], teacher: Path | None = None) -> None:
    """The student of one (lever, seed) in `folder`, from the base run's split and the teacher of
    `teacher` (teacher_home; the base run's by default)."""
    from slimvit import models
    from slimvit.config import read_config, save_config
    from slimvit.data import load_data
    from slimvit.evaluate import evaluate_model
    from slimvit.io import atomic_write_json
    from slimvit.train import run_distill

    student = folder / "student"
    if (student / "eval.json").exists() and (student / "val.json").exists():
        return
    seed_folder(base, folder, teacher)
    cfg = read_config(base / "config.yaml", overrides)
    save_config(cfg, folder / "config.yaml")
    print(f"+ {folder}: {' '.join(overrides)}", flush=True)
    data = load_data(cfg.data, folder)
    if cfg == read_config(base / "config.yaml") and (base / "student" / "eval.json").exists():
        if not (student / "eval.json").exists():  # the base run's own student: the same recipe and seed
            copy_folder(base / "student", student)
    else:
        run_distill(cfg, folder, data, resume="auto")
    model, spec = models.load(student)
    atomic_write_json(student / "val.json", evaluate_model(model.eval(), data, spec, "val"))


def outcome(folder: Path, split: str) -> np.ndarray:
    """Correct per image of the student in `folder` on `split` (val or test); a pipeline run's student on
    validation from its bench row (the reference), whose logits bench kept."""
    if split == "val" and not (folder / "student" / "val.json").exists():
        from slimvit import report

        r = finished_run(folder)
        return row_correct(folder, r["bench"], report.ref_row(r)["key"], "val")
    ev = load(folder / "student" / ("val.json" if split == "val" else "eval.json"))
    return np.array(ev["pred"]) == np.array(ev["labels"])


def row_correct(run: Path, bench: dict, key: str, split: str) -> np.ndarray:
    """Correct per image of one bench row of a finished run on `split`, from bench's logits."""
    from slimvit.deploy import split_logits

    if (got := split_logits(run, bench, key, split)) is None:
        raise SystemExit(f"{run}: bench kept no {split} logits of {key} (run `slimvit bench --out {run}`)")
    return got[0].argmax(1) == got[1]


def run_folder(base: Path, out: Path, name: str, keys: list[str], seed: int) -> Path:
    """Where the pipeline of (lever, seed) runs: the base run itself for its own recipe and seed."""
    from slimvit.config import read_config

    saved = base / "config.yaml"
    same = read_config(saved, [*keys, f"train.seed={seed}"]) == read_config(saved)
    return base if same else out / name / f"s{seed}"


def deployed(run: Path) -> dict:
    """The deployed model of a finished run: its label, validation and test outcomes (the last step), and
    the test outcomes of each step it rests on (report.class_models: teacher, student, pruned, the deployed
    model's FP32 file, the deployed model; the FP32 file stands for itself when it is the one deployed);
    `compressed` is False where the run deployed its teacher, whose steps are then not its own. A run
    whose deploy rule found no candidate has no outcomes (None): its verdict is kept, not a stand-in; so has
    one that deployed the student's own file because no compression fitted (deploy's fallback): a recipe is
    compared on the compressions it delivers, as when such a run deployed nothing."""
    from slimvit import report
    from slimvit.deploy import is_student, is_teacher, nothing_deployed

    r = finished_run(run)
    stages = r["manifest"].get("stages", {})
    seconds = sum(e.get("seconds", 0.0) for n, e in stages.items() if n not in ("data", "teacher"))
    dep = report.deployed_row(r)
    if (dep is None and nothing_deployed(run)) or (dep is not None and is_student(dep)):
        none = dict.fromkeys(("val", "test", "steps"))
        label = (
            "nothing deployed" if dep is None else "no compression fitted (the student's own file deployed)"
        )
        return {"label": label, **none, "compressed": False, "minutes": seconds / 60}
    if dep is None:
        raise SystemExit(f"{run}: nothing deployed ({r['bench'].get('deploy_error')})")
    steps = [p == y for _, p, y in report.class_models(r)]
    if len(steps) == 4:
        steps.insert(3, steps[3])
    return {
        "label": f"{dep['stage']} {dep['runtime']} {dep['precision']}",
        "val": row_correct(run, r["bench"], dep["key"], "val"),
        "test": steps[-1],
        "steps": steps,
        "compressed": not is_teacher(dep),  # a deployed teacher rests on no compression step
        "minutes": seconds / 60,
    }


def table(
    out: Path,
    base: Path,
    levers: dict[str, list[str]],
    seeds: list[int],
    pipeline: bool = False,
    folds: int = 0,
) -> list[str]:
    finished_run.cache_clear()  # folders finished since the last table are read anew
    unit = "fold" if folds else "seed"
    if folds:  # every fold is a run of its own, its teacher and split in the default recipe's folder
        # the folds every recipe has finished, in order: a study cut short reports whole pairs so far
        finished = 0
        while finished < folds and all(
            (out / n / f"f{finished}" / "deploy" / "deploy.json").exists() for n in levers
        ):
            finished += 1
        if not finished:
            raise SystemExit(f"no fold finished by every recipe under {out} (run the same command again)")
        folders = {n: [out / n / f"f{f}" for f in range(finished)] for n in levers}
    elif pipeline:
        folders = {n: [run_folder(base, out, n, k, s) for s in seeds] for n, k in levers.items()}
    else:
        folders = {n: [out / n / f"s{s}" for s in seeds] for n in levers}
    # where each seed's or fold's teacher and split are: one for every seed, a fold's own run
    homes = folders["default"] if folds else [base] * len(seeds)
    if pipeline:
        done = {
            n: fs for n, fs in folders.items() if all((f / "deploy" / "deploy.json").exists() for f in fs)
        }
    else:
        done = {n: fs for n, fs in folders.items() if all((f / "student" / "val.json").exists() for f in fs)}
    if "default" not in done:
        raise SystemExit(f"the default recipe has not finished every {unit} under {out}")
    right = {n: [{sp: outcome(f, sp) for sp in ("val", "test")} for f in fs] for n, fs in done.items()}
    pooled = {
        n: {sp: np.concatenate([o[sp] for o in os]) for sp in ("val", "test")} for n, os in right.items()
    }
    teachers = [load(h / "teacher" / "eval.json") for h in homes]
    t_rights = [np.array(t["pred"]) == np.array(t["labels"]) for t in teachers]
    t_right = np.concatenate(t_rights)
    # a teacher lever's students are paired with their own teacher (one for every seed)
    own = {
        n: load(teacher_home(base, out, n, k) / "teacher" / "eval.json")
        for n, k in levers.items()
        if n in done and own_teacher(k) and not folds
    }
    own_rights = {n: np.array(t["pred"]) == np.array(t["labels"]) for n, t in own.items()}
    t_rights_of = {n: [own_rights[n]] * len(seeds) if n in own else t_rights for n in done}
    if folds:
        title = f"{folds} folds of train + val, each fold its own teacher; one training seed"
        if finished < folds:
            title += f" ({finished} of the {folds} folds finished so far: validation covers {finished}/{folds} of train + val)"
        teacher = f"Teachers (one per fold, `{out}/default/f*/teacher`): pooled test {accuracy_text(t_right)}"
        replicates = f"--folds {folds}"
    else:
        title = f"{len(seeds)} training seeds ({', '.join(map(str, seeds))}), one teacher" + (
            " (a lever of the teacher: its own)" if own else ""
        )
        teacher = (
            f"Teacher (`{base}/teacher`, fixed): test {accuracy_text(t_right[: len(t_right) // len(seeds)])}"
        ) + "".join(
            f"; {n}'s own (`{home}/teacher`, {load(home / 'teacher' / 'train.json')['seconds'] / 60:.1f} "
            f"minutes to train): test {accuracy_text(r)}"
            for n, r in own_rights.items()
            for home in [teacher_home(base, out, n, levers[n])]
        )
        replicates = f"--seeds {','.join(map(str, seeds))}"
    lines = [
        f"# Student levers: {title}",
        "",
        f"`python scripts/levers.py --base {base} {replicates} --out {out}"
        + (" --pipeline" if pipeline else "")
        + "".join(
            f" --lever {n}={','.join(k)}"
            for n, k in levers.items()
            if n != "default" and LEVERS.get(n) != ",".join(k)
        )
        + "`",
        "",
        f"{teacher}. Pooled: every {unit}'s images (validation "
        f"{len(pooled['default']['val'])}, test {len(pooled['default']['test'])}); vs default: points, "
        f"(only this right / only default right, exact McNemar p) on the same ({unit}, image) pairs. "
        "Validation decides; test is reported. Student vs teacher: "
        + (
            "each fold's teacher paired with the fold's student."
            if folds
            else "the recipe's one teacher's test predictions paired with each seed's student (the teacher's "
            "side repeats, so its p-value is optimistic)."
        ),
        "",
        f"| lever | keys | val % per {unit} | test % per {unit} | pooled val % (95% CI) | vs default, val | "
        "pooled test % (95% CI) | vs default, test | student vs teacher, test | minutes per student |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for n, fs in done.items():
        per = {sp: " / ".join(f"{100 * o[sp].mean():.2f}" for o in right[n]) for sp in ("val", "test")}
        p = pooled[n]
        vs = {
            sp: "" if n == "default" else paired_text(p[sp], pooled["default"][sp]) for sp in ("val", "test")
        }
        minutes = np.mean([load(f / "student" / "train.json")["seconds"] / 60 for f in fs])
        vs_teacher = paired_text(p["test"], np.concatenate(t_rights_of[n]))
        lines.append(
            f"| {n} | `{','.join(levers[n]) or '(base config)'}` | {per['val']} | {per['test']} | {accuracy_text(p['val'])} | "
            f"{vs['val']} | {accuracy_text(p['test'])} | {vs['test']} | {vs_teacher} | {minutes:.1f} |"
        )
    models = {
        model_key(f / "student" / "model.safetensors"): o["test"]
        for n, fs in done.items()
        for f, o in zip(fs, right[n], strict=True)
    }
    if pipeline:
        runs = {n: [deployed(f) for f in fs] for n, fs in done.items()}
        names = list(range(len(homes))) if folds else seeds
        lines += deployed_table(runs, t_rights_of, unit, names) + shapes_table(done, unit)
        models |= {
            model_key(f / "deploy" / "model.onnx"): d["test"]
            for n, fs in done.items()
            for f, d in zip(fs, runs[n], strict=True)
            if d["test"] is not None
        }
    verdicts = teachers if folds else [teachers[0], *own.values()]
    lines += hard_table(models, verdicts, load(base / "split.json")["test"], unit)
    missing = [n for n in folders if n not in done]
    if missing:
        lines += ["", f"Not finished: {', '.join(missing)} (run the same command again)."]
    return lines + [""]


STEP_NAMES = ("pruned r=0.2 vs student", "deployed shape's FP32 file vs pruned", "deployed vs its FP32 file")


def deployed_table(
    runs: dict[str, list[dict]],
    t_rights: dict[str, list[np.ndarray]],
    unit: str = "seed",
    names: list | None = None,
) -> list[str]:
    """The deployed model of every (lever, seed or fold) pipeline (`deployed()` of each, per lever in order):
    per seed, pooled, against the default recipe's and its teacher (`t_rights`: per lever, its teacher's
    test outcomes per seed or fold); each compression step pooled against its input (test, paired). Pooled
    and paired over the seeds where every recipe deployed a model; where one deployed nothing, the table
    says so (`names`: the seeds or folds, in order; their positions by default)."""
    reps = range(len(t_rights["default"]))
    names = list(reps) if names is None else names
    both = [i for i in reps if all(ds[i]["test"] is not None for ds in runs.values())]
    pooled = {
        n: {sp: np.concatenate([ds[i][sp] for i in both]) if both else None for sp in ("val", "test")}
        for n, ds in runs.items()
    }
    t_right = {n: np.concatenate([ts[i] for i in both]) if both else None for n, ts in t_rights.items()}
    lines = [
        "",
        "## The whole pipeline: the deployed model",
        "",
        "Chosen by the default deploy rule on validation. Steps: each compression step's test predictions "
        f"paired with its input's on the same ({unit}, image) pairs, pooled over the {unit}s. Minutes: the "
        "pipeline's stages from the student on"
        + (
            " (each fold trained its own teacher too)."
            if unit == "fold"
            else " (the teacher is the recipe's one, trained once)."
        ),
        "",
        f"| lever | deployed, per {unit} | val % per {unit} | test % per {unit} | pooled val % (95% CI) | vs default, val | "
        "pooled test % (95% CI) | vs default, test | deployed vs teacher, test | "
        + " | ".join(STEP_NAMES)
        + " | minutes from the student on |",
        "|---|---|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(STEP_NAMES) + "---:|",
    ]
    for n, ds in runs.items():
        per = {
            sp: " / ".join("-" if d[sp] is None else f"{100 * d[sp].mean():.2f}" for d in ds)
            for sp in ("val", "test")
        }
        p = pooled[n]
        vs = {
            sp: "" if n == "default" or not both else paired_text(p[sp], pooled["default"][sp])
            for sp in ("val", "test")
        }
        kept = [d for d in ds if d["compressed"]]  # the steps of a deployed teacher are not its own
        some = (
            f" ({len(kept)} of {len(ds)} {unit}s; the others deployed the teacher or nothing)"
            if len(kept) < len(ds)
            else ""
        )
        steps = [
            paired_text(*(np.concatenate([d["steps"][j] for d in kept]) for j in (i + 1, i))) + some
            if kept
            else "- (the teacher or nothing deployed)"
            for i in range(1, 1 + len(STEP_NAMES))
        ]
        lines.append(
            f"| {n} | {' / '.join(d['label'] for d in ds)} | {per['val']} | {per['test']} | {text(p['val'])} | "
            f"{vs['val']} | {text(p['test'])} | {vs['test']} | {'-' if not both else paired_text(p['test'], t_right[n])} | "
            f"{' | '.join(steps)} | {np.mean([d['minutes'] for d in ds]):.1f} |"
        )
    if len(both) < len(reps):
        none = "; ".join(
            f"{n}: {unit} {', '.join(str(names[i]) for i in reps if ds[i]['test'] is None)}"
            for n, ds in runs.items()
            if any(d["test"] is None for d in ds)
        )
        lines += [
            "",
            f"Nothing compressed deployed (no compression met the deploy rule: nothing, or the student's own "
            f"file, was deployed) in {none}. The pooled columns and the paired tests cover the {unit}s where every "
            f"recipe deployed a compression or the teacher"
            + (f" ({', '.join(str(names[i]) for i in both)})." if both else ": none."),
        ]
    return lines


def text(right: np.ndarray | None) -> str:
    return "-" if right is None else accuracy_text(right)


def shapes(run: Path) -> dict[str, dict]:
    """Every compressed shape of a finished run (the pruned model and each sweep point) in its FP32 ONNX
    file: validation and test outcomes, the student's test outcomes on the same images, and the epochs
    its fine-tune ran."""
    from slimvit import report

    r = finished_run(run)
    student = r["eval"]["student"]
    student_right = np.array(student["pred"]) == np.array(student["labels"])
    out = {}
    for row in report.bench_rows(r):
        fp32 = (row["runtime"], row["precision"]) == ("onnxruntime", "fp32")
        if row["stage"] in ("teacher", "student") or not fp32:
            continue
        record = run / row["stage"] / "prune.json"
        out[row["stage"]] = {
            "val": row_correct(run, r["bench"], row["key"], "val"),
            "test": row_correct(run, r["bench"], row["key"], "test"),
            "student": student_right,
            "epochs": load(record).get("finetune", {}).get("epochs_run") if record.exists() else None,
        }
    return out


def shapes_table(done: dict[str, list[Path]], unit: str = "seed") -> list[str]:
    """Each compressed shape's FP32 file per lever, pooled over the seeds (or folds): what the cut and its
    fine-tune cost against the student on the same (seed, image) pairs, whatever the deploy rule then chose."""
    per = {n: [shapes(f) for f in fs] for n, fs in done.items()}
    lines = [
        "",
        "## Every compressed shape (FP32 ONNX), against the student",
        "",
        f"Pooled over the {unit}s; vs student: points on test, (only the shape right / only the student right, "
        f"exact McNemar p) on the same ({unit}, image) pairs. Fine-tune epochs: per {unit}, as run (the stop rule "
        "may end a fine-tune before its cap).",
        "",
        "| lever | shape | pooled val % (95% CI) | vs default's shape, val | pooled test % (95% CI) | "
        f"vs default's shape, test | vs student, test | fine-tune epochs per {unit} |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]

    def pooled(runs: list[dict], name: str) -> dict[str, np.ndarray]:
        return {k: np.concatenate([s[name][k] for s in runs]) for k in ("val", "test", "student")}

    for n, runs in per.items():
        names = sorted(set.intersection(*(set(s) for s in runs)), key=lambda k: (k != "pruned", k))
        for name in names:
            got = pooled(runs, name)
            shared = n != "default" and all(name in s for s in per["default"])
            base = pooled(per["default"], name) if shared else None
            vs = {sp: "" if base is None else paired_text(got[sp], base[sp]) for sp in ("val", "test")}
            epochs = " / ".join("-" if s[name]["epochs"] is None else str(s[name]["epochs"]) for s in runs)
            lines.append(
                f"| {n} | {name} | {accuracy_text(got['val'])} | {vs['val']} | {accuracy_text(got['test'])} | "
                f"{vs['test']} | {paired_text(got['test'], got['student'])} | {epochs} |"
            )
    return lines


def model_key(path: Path) -> str:
    """A model file's content: the same model under two levers (a student that a sweep lever shares with
    the default, a deploy lever's unchanged choice) counts once."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hard_table(
    models: dict[str, np.ndarray], teachers: list[dict], files: list[str], unit: str = "seed", most: int = 12
) -> list[str]:
    """The test images the most models got wrong (each model's correct-per-image array on the base run's
    test split), with the verdict of the teachers (one for the seeds, one per fold): where the errors a
    recipe cannot shake are, and how many test points the images every model got wrong cost each seed."""
    wrong = np.sum([~r for r in models.values()], axis=0)
    order = [int(i) for i in np.argsort(-wrong, kind="stable") if wrong[i] > 0][:most]
    classes, labels = teachers[0]["classes"], teachers[0]["labels"]
    always = int(np.sum(wrong == len(models)))
    lines = [
        "",
        "## The test images most models got wrong",
        "",
        f"Every distinct model above ({len(models)}: the students and, with --pipeline, the deployed models of "
        f"every lever and {unit}, a file shared by levers counted once) on the base run's {len(files)} test "
        f"images. {always} image(s) wrong in every model: {100 * always / len(files):.2f} points of each {unit}'s test accuracy that no recipe here recovered.",
        "",
        "| test image | class | wrong in (of the models) | teacher |",
        "|---|---|---:|---|",
    ]
    for i in order:
        said = [t["pred"][i] for t in teachers if t["pred"][i] != labels[i]]
        verdict = "right" if not said else f"wrong ({', '.join(sorted({classes[c] for c in said}))})"
        if len(teachers) > 1 and said:
            verdict += f" in {len(said)} of {len(teachers)}"
        lines.append(
            f"| {Path(files[i]).name} | {classes[labels[i]]} | {wrong[i]} of {len(models)} | {verdict} |"
        )
    if not order:
        lines.append("| (none) | | | |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="a finished run: its split, teacher and config")
    ap.add_argument("--seeds", default=None, help="training seeds, comma-separated (default 0,1,2)")
    ap.add_argument(
        "--folds",
        type=int,
        default=0,
        help="K: cross-validation instead of seeds (with --pipeline): the base split's train + val cut into K "
        "folds, each fold validation once, each with its own teacher; test unchanged",
    )
    ap.add_argument("--out", type=Path, default=Path("runs/levers"))
    ap.add_argument(
        "--lever",
        action="append",
        default=[],
        help="NAME=KEY=VALUE[,KEY=VALUE...], or `none` for the default recipe alone (its seeds); default: "
        + "; ".join(f"{n}={k}" for n, k in LEVERS.items()),
    )
    ap.add_argument(
        "--pipeline", action="store_true", help="the whole pipeline per (lever, seed), not the student alone"
    )
    ap.add_argument("--report-only", action="store_true", help="write LEVERS.md from finished folders")
    args = ap.parse_args()
    for need in ("config.yaml", "split.json", "teacher/model.safetensors", "teacher/eval.json"):
        if not (args.base / need).exists():
            raise SystemExit(f"--base {args.base}: no {need} (a run whose teacher stage finished)")
    if args.pipeline and not (args.base / "deploy" / "deploy.json").exists():
        raise SystemExit(f"--base {args.base}: nothing deployed yet (--pipeline compares finished runs)")
    if args.folds and not args.pipeline:
        raise SystemExit("--folds trains a teacher per fold: it needs --pipeline")
    if args.folds == 1 or args.folds < 0:
        raise SystemExit(f"--folds {args.folds}: give 2 or more (or leave it out for seeds)")
    if args.folds and args.seeds:
        raise SystemExit("--folds and --seeds: the folds run at the base config's seed; give one of the two")
    seeds = [int(s) for s in (args.seeds or "0,1,2").split(",")]
    given = given_levers(args.lever, LEVERS)
    levers = {"default": [], **given}
    homes = {n: teacher_home(args.base, args.out, n, keys) for n, keys in levers.items()}
    if args.folds and any(h != args.base for h in homes.values()):
        raise SystemExit(
            "a lever of the teacher (model.teacher, train.teacher_*) with --folds: each fold trains "
            "its own teacher already; measure it with --seeds"
        )
    if not args.report_only and args.folds:
        # fold by fold, every lever at a fold before the next: a study cut short has whole pairs
        for f in range(args.folds):
            home = args.out / "default" / f"f{f}"
            run_fold(args.base, home, args.folds, f)
            for n, keys in given.items():
                run_pipeline(home, args.out / n / f"f{f}", keys, reuse=home)
    elif not args.report_only:
        for n, keys in levers.items():  # a teacher lever's teacher, once, before its students
            if homes[n] != args.base:
                train_teacher(args.base, homes[n], keys)
        # seed by seed, every lever at a seed before the next seed: a study cut short has whole pairs
        for s in seeds:
            for n, keys in levers.items():
                overrides = [*keys, f"train.seed={s}"]
                if args.pipeline:
                    folder = run_folder(args.base, args.out, n, keys, s)
                    reuse = run_folder(args.base, args.out, "default", [], s)
                    run_pipeline(args.base, folder, overrides, reuse=reuse, teacher=homes[n])
                else:
                    train_one(args.base, args.out / n / f"s{s}", overrides, teacher=homes[n])
    lines = table(args.out, args.base, levers, seeds, pipeline=args.pipeline, folds=args.folds)
    atomic_write_text(args.out / "LEVERS.md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
