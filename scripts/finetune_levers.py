"""How the pruning fine-tunes should distil and which epoch they should keep, judged on validation.

    python scripts/finetune_levers.py --group NAME=RUN[,RUN ...] [--group ...]
                                      [--lever NAME=KEY=VALUE[,KEY=VALUE] ... | --lever none]
                                      [--rules 0,0.5,1] [--out runs/finetune-levers] [--report-only]

For each base run (its prune stage finished) and each lever (`default` is the base run's config.yaml as that
run was made; a lever adds its keys), the main pruned model (`prune.ratio`) is cut from the base run's student
and fine-tuned as `slimvit prune` does, in OUT/<NAME-k>/<lever>/ (the k-th run of group NAME; its split and
student copied there). The student is trained already, so a lever's `distill.*` and `train.*` keys act on
the fine-tune alone. Every fine-tune runs its whole length (`prune.recover` off) and keeps every epoch's
logits on validation, its flips/rotations and test (epochs.npz): with the same seed the epochs a recovering
fine-tune runs are the same epochs, so each epoch rule (`prune.select_from` in --rules, with the base run's
`prune.recover` stop) is read from one training, never retrained.

Two tables, each pooled per group and over all runs:

- Levers: the model each lever keeps under the base run's own rule, and its last epoch (no choice at all,
  so its validation score is unbiased), against `default` under the same rule on the same images:
  validation accuracy (decides), mean KL(student || pruned) and agreement with the student, test accuracy
  (reported); exact McNemar for accuracy, Wilcoxon signed-rank for the per-image KL.
- Rules: for each lever, each rule scored on validation by split halves (each run's validation images cut
  in two halves per class; the rule stops and picks on one half, from that half's accuracy, loss, KL and
  agreement on its views, and is scored on the other), paired against the first rule; test at the epoch the
  rule keeps on the whole split.

Writes OUT/FINETUNE_LEVERS.md. Resumes: a finished (run, lever) is read, not trained; an interrupted
fine-tune continues from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from epoch_rules import halves, parse_rules  # noqa: E402  (the benchmark scripts are not a package)
from levers import copy_folder, given_levers, seed_folder  # noqa: E402

from slimvit.io import atomic_path, atomic_write_text  # noqa: E402
from slimvit.report.stats import accuracy_text, paired_text  # noqa: E402

LOGITS = "epochs.npz"
SPLITS = ("val", "views", "test")
LEVERS = {
    # function matching: the student's outputs alone (no labels), on the very view the pruned model sees
    "kd": "distill.alpha=1.0,distill.teacher_logits=live",
    # ... and on mixed images too, which widen the inputs the two are matched on (Beyer et al. 2022)
    "match": "distill.alpha=1.0,distill.teacher_logits=live,train.mixup=0.8,train.cutmix=1.0",
    # the student's logits on the pruned model's own view, not averaged over the 8 flips/rotations
    "live": "distill.teacher_logits=live",
    # a gentler fine-tune that stays nearer the student it starts from
    "lr": "prune.finetune_lr=0.0001",
}


# --------------------------------------------------------------------------- training


def _inputs(cfg, base: Path, data) -> tuple[dict, dict]:
    """Normalised validation images, their fidelity views (`selection.Fidelity`'s) and test images; labels."""
    import torch

    from slimvit.preprocess import normalize
    from slimvit.recipe import views
    from slimvit.selection import FIDELITY_VIEWS
    from slimvit.spec import read_spec

    spec = read_spec(base / "student")
    x, labels = {}, {}
    for split in ("val", "test"):
        images, labels[split] = data.arrays(split)
        x[split] = torch.from_numpy(normalize(images, spec.mean, spec.std))
    every = views(x["val"], cfg.train.flips, cfg.train.rot90)
    x["views"] = torch.cat(every[:: max(1, len(every) // FIDELITY_VIEWS)][:FIDELITY_VIEWS])
    labels["views"] = np.tile(labels["val"], len(x["views"]) // len(x["val"]))
    return x, labels


def finetune(base: Path, folder: Path, keys: list[str]) -> None:
    """The main pruned model of `base` fine-tuned with `keys`, all its epochs, in folder/pruned; every epoch's
    logits in folder/epochs.npz and the student's in folder/student.npz. Resumes; a finished one is read."""
    from slimvit import models
    from slimvit.config import read_config, save_config
    from slimvit.data import load_data
    from slimvit.evaluate import predict_logits
    from slimvit.prune import run_prune

    if finished(folder):
        return
    cfg = read_config(base / "config.yaml", [*keys, "prune.recover=false"])
    seed_folder(base, folder, teacher=None if cfg.prune.teacher == "teacher" else folder)  # no copy unused
    if not (folder / "student").exists():
        copy_folder(base / "student", folder / "student")
    save_config(cfg, folder / "config.yaml")
    data = load_data(cfg.data, folder, progress=False)
    x, labels = _inputs(cfg, base, data)
    if not (folder / "student.npz").exists():
        student, _ = models.load(base / "student")
        with atomic_path(folder / "student.npz") as tmp, open(tmp, "wb") as f:
            np.savez(
                f,
                **{s: predict_logits(student, x[s]) for s in SPLITS},
                **{f"{s}_labels": labels[s] for s in SPLITS},
            )
    logits = read_logits(folder)

    def on_epoch(model, epoch: int) -> None:
        for s in SPLITS:
            logits[s][epoch] = predict_logits(model, x[s])
        epochs = sorted(logits["val"])
        with atomic_path(folder / LOGITS) as tmp, open(tmp, "wb") as f:
            np.savez(
                f, epochs=np.array(epochs), **{s: np.stack([logits[s][e] for e in epochs]) for s in SPLITS}
            )

    print(f"+ {folder}: {','.join(keys) or '(the base config)'}", flush=True)
    run_prune(cfg, folder, data, resume="auto", on_epoch=on_epoch)


def finished(folder: Path) -> bool:
    prune = folder / "pruned" / "prune.json"
    if not (prune.exists() and (folder / LOGITS).exists()):
        return False
    return len(read_logits(folder)["val"]) == json.loads(prune.read_text())["finetune"]["epochs_run"]


def read_logits(folder: Path) -> dict[str, dict[int, np.ndarray]]:
    out: dict[str, dict[int, np.ndarray]] = {s: {} for s in SPLITS}
    if (folder / LOGITS).exists():
        with np.load(folder / LOGITS) as z:
            for s in SPLITS:
                out[s] = dict(zip(z["epochs"].tolist(), z[s], strict=True))
    return out


# --------------------------------------------------------------------------- rules


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _kl(ref: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Per row KL(softmax(ref) || softmax(z))."""
    lr, lz = _log_softmax(ref), _log_softmax(z)
    return (np.exp(lr) * (lr - lz)).sum(-1)


class Run:
    """One finished (run, lever): every epoch's logits, the student's, and the base run's stop rule."""

    def __init__(self, base: Path, folder: Path):
        from slimvit.config import read_config
        from slimvit.prune import recovery_target

        with np.load(folder / LOGITS) as z:
            self.z = {s: z[s] for s in SPLITS}
        with np.load(folder / "student.npz") as z:
            self.ref = {s: z[s] for s in SPLITS}
            self.labels = {s: z[f"{s}_labels"] for s in SPLITS}
        cfg = read_config(base / "config.yaml")  # the rule as the base run ran it
        self.epochs = len(self.z["val"])
        self.recover = cfg.prune.recover
        self.own_rule = cfg.prune.select_from
        self.min_epochs = math.ceil(cfg.prune.finetune_floor * self.epochs) if self.recover else 0
        self.agreement = cfg.prune.recover_agreement / 100 if self.recover else None
        self.tolerance = cfg.prune.recover_tolerance / 100
        self.target = recovery_target(cfg, base / "student") if self.recover else None
        self.half = halves(self.labels["val"])

    def metrics(self, epoch: int, mask: np.ndarray) -> dict:
        """`selection.validate`'s record of `epoch` on the validation images in `mask` (and their views)."""
        import torch

        from slimvit.distill import cross_entropy
        from slimvit.evaluate import balanced_accuracy

        z, y = self.z["val"][epoch - 1][mask], self.labels["val"][mask]
        vmask = np.tile(mask, len(self.labels["views"]) // len(mask))
        zv, rv = self.z["views"][epoch - 1][vmask], self.ref["views"][vmask]
        return {
            "acc": float((z.argmax(1) == y).mean()),
            "bal_acc": balanced_accuracy(z.argmax(1), y),
            "loss": float(cross_entropy(torch.from_numpy(z), torch.from_numpy(y))),
            "kl": float(_kl(rv, zv).mean()),
            "agree": float((zv.argmax(1) == rv.argmax(1)).mean()),
        }

    def keep(self, rule: float, mask: np.ndarray | None = None, target: float | None = None) -> int:
        """The epoch a fine-tune keeps under `prune.select_from=rule` with the base run's stop rule, choosing
        on the validation images in `mask` (all by default) against `target` (the recovery target)."""
        from slimvit.selection import best_record, first_competing_epoch, improves, stop_reason

        mask = np.ones(len(self.labels["val"]), dtype=bool) if mask is None else mask
        target = self.target if target is None else target
        first = first_competing_epoch(rule, self.epochs)
        best = {"epoch": -1}
        for e in range(1, self.epochs + 1):
            v = self.metrics(e, mask)
            if improves(v, best, e, first):
                best = best_record(v, e)
            if stop_reason(best, target, 0, e, self.epochs, 1, self.min_epochs, self.agreement):
                break
        return best["epoch"]

    def scored(self, epoch: int) -> dict[str, np.ndarray]:
        """Per image at `epoch`: right (val, test), agrees with the student (val, test), KL to it (val)."""
        out = {}
        for s in ("val", "test"):
            z, r = self.z[s][epoch - 1], self.ref[s]
            out[f"{s}_right"] = z.argmax(1) == self.labels[s]
            out[f"{s}_agree"] = z.argmax(1) == r.argmax(1)
            out[f"{s}_kl"] = _kl(r, z)
        return out

    def split_halves(self, rule: float) -> np.ndarray:
        """Right per validation image, scored by the epoch the rule keeps choosing on the other half (the
        recovery target there: the student's balanced accuracy on that half, less the tolerance)."""
        from slimvit.evaluate import balanced_accuracy

        right = np.zeros(len(self.half), dtype=bool)
        y, student = self.labels["val"], self.ref["val"].argmax(1)
        for on in (self.half, ~self.half):
            target = balanced_accuracy(student[on], y[on]) - self.tolerance if self.recover else None
            e = self.keep(rule, on, target)
            right[~on] = self.z["val"][e - 1][~on].argmax(1) == y[~on]
        return right


# --------------------------------------------------------------------------- tables


def _cat(parts: list[dict], key: str) -> np.ndarray:
    return np.concatenate([p[key] for p in parts])


def kl_text(a: np.ndarray, ref: np.ndarray) -> str:
    from scipy.stats import wilcoxon

    if np.array_equal(a, ref):
        return ""
    lower, p = int((a < ref).sum()), wilcoxon(a, ref).pvalue
    return f"{a.mean() - ref.mean():+.4f} (lower on {lower} of {len(a)}, {'p<1e-10' if p < 1e-10 else f'p={p:.2g}'})"


def lever_table(runs: dict, groups: dict[str, list[str]], levers: list[str]) -> list[str]:
    rows = [
        "| runs | lever | epoch | epochs kept | val % | vs default | val KL | vs default | val agree % | "
        "test % | vs default | test agree % |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for gname, names in all_groups(groups):
        for which in ("own rule", "last"):
            kept = {
                (n, lv): (
                    runs[n, lv].keep(runs[n, lv].own_rule) if which == "own rule" else runs[n, lv].epochs
                )
                for n in names
                for lv in levers
            }
            ref = [runs[n, "default"].scored(kept[n, "default"]) for n in names]
            for lv in levers:
                got = [runs[n, lv].scored(kept[n, lv]) for n in names]
                same = lv == "default"
                v, rv = _cat(got, "val_right"), _cat(ref, "val_right")
                k, rk = _cat(got, "val_kl"), _cat(ref, "val_kl")
                t, rt = _cat(got, "test_right"), _cat(ref, "test_right")
                rows.append(
                    f"| {gname} | {lv} | {which} | {' · '.join(str(kept[n, lv]) for n in names)} | "
                    f"{accuracy_text(v)} | {'' if same else paired_text(v, rv)} | {k.mean():.4f} | "
                    f"{'' if same else kl_text(k, rk)} | {100 * _cat(got, 'val_agree').mean():.2f} | "
                    f"{accuracy_text(t)} | {'' if same else paired_text(t, rt)} | "
                    f"{100 * _cat(got, 'test_agree').mean():.2f} |"
                )
    return rows


def rule_table(runs: dict, groups: dict[str, list[str]], levers: list[str], rules: list[float]) -> list[str]:
    rows = [
        "| runs | lever | rule | epochs kept | val: chosen on it % | val: split halves % | vs first rule | "
        "test % | vs first rule |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for gname, names in all_groups(groups):
        for lv in levers:
            res = {}
            for f in rules:
                kept = [runs[n, lv].keep(f) for n in names]
                res[f] = {
                    "kept": kept,
                    "chosen": np.concatenate(
                        [runs[n, lv].scored(e)["val_right"] for n, e in zip(names, kept, strict=True)]
                    ),
                    "halves": np.concatenate([runs[n, lv].split_halves(f) for n in names]),
                    "test": np.concatenate(
                        [runs[n, lv].scored(e)["test_right"] for n, e in zip(names, kept, strict=True)]
                    ),
                }
            for f in rules:
                r, r0 = res[f], res[rules[0]]
                same = f == rules[0]
                rows.append(
                    f"| {gname} | {lv} | select_from={f:g} | {' · '.join(map(str, r['kept']))} | "
                    f"{accuracy_text(r['chosen'])} | {accuracy_text(r['halves'])} | "
                    f"{'' if same else paired_text(r['halves'], r0['halves'])} | {accuracy_text(r['test'])} | "
                    f"{'' if same else paired_text(r['test'], r0['test'])} |"
                )
    return rows


def all_groups(groups: dict[str, list[str]]) -> list[tuple[str, list[str]]]:
    """The groups, then (with more than one) "all" of their runs pooled."""
    everything = [n for ns in groups.values() for n in ns]
    return [*groups.items(), *((("all", everything),) if len(groups) > 1 else ())]


def parse_groups(given: list[str]) -> tuple[dict[str, list[str]], dict[str, Path]]:
    """`--group NAME=RUN[,RUN...]` options -> ({NAME: [NAME-0, NAME-1, ...]}, {NAME-k: the k-th RUN})."""
    groups: dict[str, list[str]] = {}
    bases: dict[str, Path] = {}
    for g in given:
        gname, _, paths = g.partition("=")
        if not gname or not paths or gname in groups:
            raise SystemExit(f"--group {g}: expected a new NAME=RUN[,RUN...]")
        groups[gname] = [f"{gname}-{k}" for k in range(len(paths.split(",")))]
        bases.update(zip(groups[gname], map(Path, paths.split(",")), strict=True))
    return groups, bases


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--group",
        action="append",
        required=True,
        help="NAME=RUN[,RUN...]: runs whose prune stage finished, pooled together (e.g. one dataset's seeds)",
    )
    ap.add_argument(
        "--lever",
        action="append",
        default=[],
        help="NAME=KEY=VALUE[,KEY=VALUE...], or `none` for the default alone; default: "
        + "; ".join(f"{n}={k}" for n, k in LEVERS.items()),
    )
    ap.add_argument("--rules", default="0,0.5,1", help="prune.select_from values; the first is the reference")
    ap.add_argument("--out", type=Path, default=Path("runs/finetune-levers"))
    ap.add_argument(
        "--report-only", action="store_true", help="write FINETUNE_LEVERS.md from what has finished"
    )
    args = ap.parse_args()
    given = given_levers(args.lever, LEVERS)
    if "default" in given:
        raise SystemExit("--lever default=...: `default` is the base run's own config")
    levers = {"default": [], **given}
    rules = parse_rules(args.rules)
    groups, bases = parse_groups(args.group)
    for base in bases.values():
        if not (base / "pruned" / "prune.json").exists():
            raise SystemExit(f"{base}: no finished prune stage (pruned/prune.json)")
    if not args.report_only:
        for lv, keys in levers.items():  # every run under a lever before the next lever
            for name, base in bases.items():
                finetune(base, args.out / name / lv, keys)
    done = [lv for lv in levers if all(finished(args.out / n / lv) for n in bases)]
    if "default" not in done:
        raise SystemExit(f"{args.out}: the default fine-tunes have not all finished")
    runs = {(n, lv): Run(bases[n], args.out / n / lv) for n in bases for lv in done}
    lines = [
        "# Fine-tune levers and epoch rules",
        "",
        "The main pruned model of each run (groups: "
        + "; ".join(f"{g}: {', '.join(str(bases[n]) for n in ns)}" for g, ns in groups.items())
        + "), fine-tuned under each lever for all its epochs. Validation decides; test is reported. "
        "Paired on the same images: accuracy by exact McNemar (only this right / only the other right, p), "
        "KL(student || pruned) by Wilcoxon signed-rank.",
        "",
        *(f"- `{k}`: `{','.join(v)}`" for k, v in levers.items() if k in done and v),
        "",
        "## Levers",
        "",
        *lever_table(runs, groups, done),
        "",
        "## Epoch rules (`prune.select_from`, with each run's `prune.recover` stop)",
        "",
        *rule_table(runs, groups, done, rules),
    ]
    atomic_write_text(args.out / "FINETUNE_LEVERS.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
