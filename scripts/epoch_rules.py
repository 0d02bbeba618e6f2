"""Which epoch a student keeps (`train.select_from`), judged on validation by split halves.

    python scripts/epoch_rules.py --base RUN [--base RUN ...] [--seeds 0,1,2] [--rules 0,0.5,0.75,1]
                                  [--out runs/epoch-rules] [--report-only]

For each (base run, seed) a student trains once in OUT/<base run's name>/s<seed>, from the base run's split,
teacher and config.yaml with `train.seed` set, and every epoch's logits on validation and test are kept
(epochs.npz). A rule changes only which epoch is kept, never the training (no rule stops it: `train.patience`
must be 0), so one training answers every rule.

A rule `f` lets the epochs after the fraction f of them compete for the kept weights, picked as training picks
(validation balanced accuracy, then accuracy, then lower loss; the earliest of ties): 0 is every epoch, 1 the
last. The verdict reads validation only, by split halves: each run's validation images are cut in two halves
(alternately within each class, in a seeded order), a rule picks its epoch on one half and is scored on the
other, and the other way round, so every validation image is scored by an epoch chosen without it. The
accuracy of the epoch chosen on the whole split, scored on that split, is shown too: on few images the best of
many epochs is partly luck, and this is where the luck shows. Test reports the epoch each rule picks on the
whole validation split (what training keeps). Pooled per base run and over all runs, paired against the
first rule on the same images (exact McNemar).

Writes OUT/EPOCH_RULES.md. Resumes: a finished (base run, seed) is read, not trained; an interrupted one
continues from its checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from levers import seed_folder  # noqa: E402  (the benchmark scripts are not a package)

from slimvit.io import atomic_path, atomic_write_text  # noqa: E402
from slimvit.report.stats import accuracy_text, paired_text  # noqa: E402
from slimvit.selection import first_competing_epoch  # noqa: E402

LOGITS = "epochs.npz"
SPLITS = ("val", "test")


def train(base: Path, folder: Path, seed: int) -> None:
    """The student of (base run, seed) in `folder`, every epoch's validation and test logits in
    folder/epochs.npz (written after each epoch, so an interrupted training resumes with them)."""
    import torch

    from slimvit.config import read_config, save_config
    from slimvit.data import load_data
    from slimvit.evaluate import predict_logits
    from slimvit.layout import STUDENT
    from slimvit.preprocess import normalize
    from slimvit.recipe import role_spec
    from slimvit.train import train_role

    if finished(folder):
        return
    cfg = read_config(base / "config.yaml", [f"train.seed={seed}"])
    if cfg.train.patience:
        raise SystemExit(f"{base}: train.patience={cfg.train.patience} stops training by the kept epoch")
    seed_folder(base, folder)
    save_config(cfg, folder / "config.yaml")
    data = load_data(cfg.data, folder)
    spec = role_spec(cfg, STUDENT, data)[0]
    x, labels = {}, {}
    for split in SPLITS:
        images, labels[split] = data.arrays(split)
        x[split] = torch.from_numpy(normalize(images, spec.mean, spec.std))
    logits = read_logits(folder)

    def on_epoch(model, epoch: int) -> None:
        for split in SPLITS:
            logits[split][epoch] = predict_logits(model, x[split])
        write_logits(folder, logits, labels)

    print(f"+ {folder}: train.seed={seed}", flush=True)
    train_role(cfg, folder, STUDENT, data, resume="auto", on_epoch=on_epoch)


def finished(folder: Path) -> bool:
    import json

    train_json = folder / "student" / "train.json"
    if not (train_json.exists() and (folder / LOGITS).exists()):
        return False
    runs = json.loads(train_json.read_text())["epochs_run"]
    return len(read_logits(folder)["val"]) == runs


def read_logits(folder: Path) -> dict[str, dict[int, np.ndarray]]:
    """{split: {epoch: logits}} from folder/epochs.npz ({} per split where there is none)."""
    out: dict[str, dict[int, np.ndarray]] = {s: {} for s in SPLITS}
    if (folder / LOGITS).exists():
        with np.load(folder / LOGITS) as z:
            for s in SPLITS:
                out[s] = dict(zip(z["epochs"].tolist(), z[s], strict=True))
    return out


def write_logits(folder: Path, logits: dict, labels: dict) -> None:
    epochs = sorted(logits["val"])
    arrays = {s: np.stack([logits[s][e] for e in epochs]) for s in SPLITS}
    with atomic_path(folder / LOGITS) as tmp, open(tmp, "wb") as f:
        np.savez(f, epochs=np.array(epochs), **arrays, **{f"{s}_labels": labels[s] for s in SPLITS})


# --------------------------------------------------------------------------- the rules


def pick(logits: np.ndarray, labels: np.ndarray, first: int) -> int:
    """The epoch (1-based) training keeps from `logits` (epochs, images, classes) when the epochs from `first`
    on compete: training's own rule (`selection.improves`) on the metrics `selection.validate` computes."""
    import torch

    from slimvit.distill import cross_entropy
    from slimvit.evaluate import balanced_accuracy
    from slimvit.selection import best_record, improves

    best = {"epoch": -1}  # nothing kept yet: the first competing epoch is
    for e, z in enumerate(logits, start=1):
        pred = z.argmax(1)
        loss = float(cross_entropy(torch.from_numpy(z), torch.from_numpy(labels)))
        v = {"acc": float((pred == labels).mean()), "bal_acc": balanced_accuracy(pred, labels), "loss": loss}
        if improves(v, best, e, first):
            best = best_record(v, e)
    return best["epoch"]


def halves(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """A boolean mask of the first half: each class's images, in a seeded order, dealt alternately."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        mask[idx[::2]] = True
    return mask


def score(z: np.ndarray, val_labels: np.ndarray, test_labels: np.ndarray, f: float) -> dict:
    """One run under rule `f`: the epoch kept, and correct per image on validation scored by the epoch
    chosen on the other half (`val_half`), on the whole validation split by the epoch chosen on it
    (`val_chosen`), and on test (`test`)."""
    val, test = z["val"], z["test"]
    first = first_competing_epoch(f, len(val))
    kept = pick(val, val_labels, first)
    val_half = np.zeros(len(val_labels), dtype=bool)
    a = halves(val_labels)
    for chosen_on in (a, ~a):
        e = pick(val[:, chosen_on], val_labels[chosen_on], first)
        other = ~chosen_on
        val_half[other] = val[e - 1, other].argmax(1) == val_labels[other]
    return {
        "epoch": kept,
        "val_half": val_half,
        "val_chosen": val[kept - 1].argmax(1) == val_labels,
        "test": test[kept - 1].argmax(1) == test_labels,
    }


def load_run(folder: Path) -> dict:
    with np.load(folder / LOGITS) as z:
        return {k: z[k] for k in z.files}


def table(groups: dict[str, list[Path]], rules: list[float]) -> list[str]:
    """EPOCH_RULES.md's rows: per base run (pooled over its seeds) and over all runs, per rule."""
    import json

    results, unlike = {}, []  # (folder, rule) -> score; runs where training kept another epoch
    for folders in groups.values():
        for folder in folders:
            z = load_run(folder)
            kept = json.loads((folder / "student" / "train.json").read_text())["best_epoch"]
            for f in rules:
                results[folder, f] = score(z, z["val_labels"], z["test_labels"], f)
            own = first_competing_epoch(_own_rule(folder), len(z["val"]))
            if (mine := pick(z["val"], z["val_labels"], own)) != kept:  # the rule here is not the training's
                unlike.append(f"{folder}: training kept epoch {kept}, this script's rule picks {mine}")
    rows = [
        "| runs | rule | epochs kept | val: chosen on it % | val: split halves % | vs first rule | "
        "test % | vs first rule |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    everything = [f for fs in groups.values() for f in fs]
    for name, folders in (*groups.items(), *((("all", everything),) if len(groups) > 1 else ())):
        for f in rules:
            cat = {
                k: np.concatenate([results[d, f][k] for d in folders])
                for k in ("val_half", "val_chosen", "test")
            }
            ref = {
                k: np.concatenate([results[d, rules[0]][k] for d in folders]) for k in ("val_half", "test")
            }
            epochs = " / ".join(str(results[d, f]["epoch"]) for d in folders)
            same = f == rules[0]
            rows.append(
                f"| {name} | select_from={f:g} | {epochs} | {accuracy_text(cat['val_chosen'])} | "
                f"{accuracy_text(cat['val_half'])} | {'' if same else paired_text(cat['val_half'], ref['val_half'])} | "
                f"{accuracy_text(cat['test'])} | {'' if same else paired_text(cat['test'], ref['test'])} |"
            )
    return rows + [f"\nNote: {u} (a near-tie of validation loss?)" for u in unlike]


def _own_rule(folder: Path) -> float:
    from slimvit.config import read_config

    return read_config(folder / "config.yaml").train.select_from


def parse_rules(text: str) -> list[float]:
    """`--rules`: comma-separated `select_from` fractions, each in [0, 1]."""
    rules = [float(r) for r in text.split(",")]
    if not all(0 <= r <= 1 for r in rules):
        raise SystemExit(f"--rules {text}: each is a fraction in [0, 1]")
    return rules


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--base", type=Path, action="append", required=True, help="a run whose teacher has finished"
    )
    ap.add_argument("--seeds", default="0,1,2", help="training seeds (comma-separated)")
    ap.add_argument(
        "--rules", default="0,0.5,0.75,1", help="train.select_from values; the first is the reference"
    )
    ap.add_argument("--out", type=Path, default=Path("runs/epoch-rules"))
    ap.add_argument("--report-only", action="store_true", help="write EPOCH_RULES.md from what has finished")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rules = parse_rules(args.rules)
    names = [b.resolve().name for b in args.base]
    if len(set(names)) != len(names):
        raise SystemExit(f"--base: two runs named alike ({', '.join(names)}); their folders would collide")
    for base in args.base:
        if not (base / "teacher" / "eval.json").exists():
            raise SystemExit(f"{base}: no finished teacher (teacher/eval.json)")
    groups = {n: [args.out / n / f"s{s}" for s in seeds] for n in names}
    if not args.report_only:
        for seed in seeds:  # every base run's seed 0 first: a study cut short still covers every dataset
            for base, name in zip(args.base, names, strict=True):
                train(base, args.out / name / f"s{seed}", seed)
    groups = {n: [d for d in fs if finished(d)] for n, fs in groups.items()}
    groups = {n: fs for n, fs in groups.items() if fs}
    if not groups:
        raise SystemExit(f"{args.out}: no finished student yet")
    lines = [
        "# Epoch-selection rules",
        "",
        f"Rules: `train.select_from` in {', '.join(f'{r:g}' for r in rules)}; seeds {args.seeds}. "
        "Validation decides (split halves); test is reported.",
        "",
        *table(groups, rules),
    ]
    atomic_write_text(args.out / "EPOCH_RULES.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
