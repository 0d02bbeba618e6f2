"""The sections on classes: Classes (per-class recall of every model a deployment rests on, each step's
paired test, the class balance and how coarse validation is), Wrong test images, and the weakest class
sentence of the conclusions."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slimvit.evaluate import balanced_accuracy, mcnemar, wilson
from slimvit.report.load import bench_predictions, class_models, deployed_row, mistakes
from slimvit.report.stats import recalls, weakest


def _balance_text(run: dict) -> str:
    """How the training batches were balanced across classes, as each train.json recorded it."""
    tr = run["train"]
    used = {name: tr[name].get("balance") for name in ("teacher", "student", "pruned") if name in tr}
    if not any(used.values()):
        return "Class balance: not recorded (a run of an older version)."
    modes = sorted({m for m in used.values() if m})
    if modes == ["none"]:
        what = "every training image once per epoch (`train.balance` found the classes balanced)"
    elif modes == ["sampler"]:
        what = (
            "class-balanced sampling: each epoch draws as many images as the training split has, with "
            "replacement, every class equally often (teacher, student and fine-tunes)"
        )
    elif modes == ["logit"]:
        what = (
            "logit-adjusted cross-entropy (every training image once per epoch; the label term sees the "
            "logits plus the log of the training class prior, so the model's own logits are class-balanced; "
            "teacher, student and fine-tunes)"
        )
    else:
        what = ", ".join(f"{k}: {v}" for k, v in used.items())
    return f"Class balance of the training batches: {what}."


VAL_GRAIN_WARN = 2.0
"""Points of validation balanced accuracy one image of the rarest class is worth, above which the report
says the choices made on validation are coarse."""


def _validation_grain(d: dict) -> list[str]:
    """A warning when one validation image of the rarest class moves balanced accuracy by more than
    VAL_GRAIN_WARN points: every choice read from validation (best epoch, a fine-tune's stop, the deploy
    candidate) then rests on a handful of images."""
    val = (d.get("split_per_class") or {}).get("val") or {}
    if not val:
        return []
    empty = [c for c, n in val.items() if n == 0]
    if empty:
        names = ", ".join(empty)
        return [
            f"**Validation has no image of {names}**: validation balanced accuracy averages the other "
            f"{len(val) - len(empty)} classes, so nothing chosen on it sees {names}. A larger validation "
            "fraction (`--set data.split=[0.6,0.2,0.2]`) gives it some."
        ]
    name, k = min(val.items(), key=lambda kv: kv[1])
    grain = 100 / (len(val) * k)
    if grain <= VAL_GRAIN_WARN:
        return []
    return [
        f"**Validation is coarse here**: {sum(val.values())} images, {k} of {name}, so one image of {name} "
        f"moves validation balanced accuracy by {grain:.1f} points; best epochs, stops and the deploy choice "
        "that differ by less are chance. A larger validation fraction (`--set data.split=[0.6,0.2,0.2]`: "
        "about twice the validation images, the same test images, a seventh fewer training images) halves "
        'that grain; on the imbalanced NEU-DET subsets it did not pay for the training images (README, "Imbalanced data").'
    ]


def class_recall(run: dict) -> list[str]:
    """Per-class recall with intervals, the weakest class, and each step's balanced accuracy."""
    classes = run["bench"].get("classes") or []
    models_ = class_models(run)
    if not classes or not models_:
        return []
    d = run["data"] or {}
    train_counts = (d.get("split_per_class") or {}).get("train") or {}
    out = ["## Classes", ""]
    if train_counts:
        counts = list(train_counts.values())
        out.append(
            "Training images per class: "
            + ", ".join(f"{c} {n}" for c, n in train_counts.items())
            + (f" (largest/smallest {max(counts) / min(counts):.1f}x)." if min(counts) else ".")
        )
    out += [
        _balance_text(run),
        "Best epochs, the fine-tunes' stopping point and the deploy choice read validation balanced "
        "accuracy (mean per-class recall); accuracy is still reported.",
        *_validation_grain(d),
        "",
        "Test recall per class, % with 95% Wilson interval:",
        "",
        "| class | test images | " + " | ".join(n for n, _, _ in models_) + " |",
        "|---|---:|" + "---:|" * len(models_),
    ]
    per = [recalls(p, y, len(classes)) for _, p, y in models_]
    for c, name in enumerate(classes):
        cells = []
        for r in per:
            k, n = r[c]
            lo, hi = wilson(k, n)
            cells.append(f"{100 * k / n:.1f} ({100 * lo:.0f}-{100 * hi:.0f})" if n else "-")
        out.append(f"| {name} | {per[0][c][1]} | " + " | ".join(cells) + " |")
    bal = [balanced_accuracy(p, y) for _, p, y in models_]
    out += ["| **balanced accuracy** | | " + " | ".join(f"**{100 * b:.2f}**" for b in bal) + " |", ""]
    return out + _steps(models_, bal)


def _steps(models_: list[tuple[str, np.ndarray, np.ndarray]], bal: list[float]) -> list[str]:
    """Each model against the one before it (its input) on the same test images: balanced accuracy and the
    paired test."""
    steps = []
    for (na, pa, ya), (nb, pb, yb), ba, bb in zip(models_, models_[1:], bal, bal[1:], strict=False):
        if ya.shape != yb.shape or (ya != yb).any():
            continue
        t = mcnemar(pb == yb, pa == ya)
        steps.append(
            f"| {na} -> {nb} | {100 * ba:.2f} | {100 * bb:.2f} | {100 * (bb - ba):+.2f} | "
            f"{t['a_only']} / {t['b_only']} | {t['p']:.2g} |"
        )
    if not steps:
        return []
    return [
        "Each step against its input on the same test images (balanced accuracy; the paired test is exact "
        "McNemar on per-image correctness):",
        "",
        "| step | input % | output % | change (points) | images only the output / only the input got right | p |",
        "|---|---:|---:|---:|---:|---:|",
        *steps,
        "",
    ]


def weakest_class(run: dict) -> str | None:
    """One sentence naming the deployed model's weakest class (lowest test recall) and its interval."""
    dep = deployed_row(run)
    pl = bench_predictions(run, dep["key"]) if dep else None
    if pl is None:
        return None
    classes = run["bench"]["classes"]
    r = recalls(*pl, len(classes))
    c = weakest(r)
    k, n = r[c]
    lo, hi = wilson(k, n)
    cm = np.asarray(run["bench"]["confusion"][dep["key"]])
    row = cm[c].copy()
    row[c] = 0
    taken = (
        f"; it was mostly taken for {classes[int(row.argmax())]} ({int(row.max())} images)"
        if row.max()
        else ""
    )
    return (
        f"- Weakest class of the deployed model: **{classes[c]}**, test recall {100 * k / n:.1f}% "
        f"({k} of {n}; 95% interval {100 * lo:.1f}-{100 * hi:.1f}%){taken}. Every class's recall is in "
        '"Classes"; the confusion matrix is plots/confusion.png.'
    )


def wrong_images(run: dict) -> list[str]:
    """Each wrong test image of the deployed model: what a person checks first."""
    wrong = mistakes(run)
    dep = deployed_row(run)
    if not dep:
        return []
    out = ["## Wrong test images", ""]
    if not wrong:
        return out + [f"The deployed model classifies every test image correctly ({dep['n']} images).", ""]
    out += [
        f"The deployed model gets {len(wrong)} of {dep['n']} test images wrong (most confident first; "
        "confidence is the calibrated probability of the class it named, as `slimvit predict` prints it):",
        "",
        "| image | true class | predicted | confidence |",
        "|---|---|---|---:|",
    ]
    for m in wrong:
        conf = f"{m['confidence']:.3f}" if m["confidence"] is not None else "-"
        out.append(f"| `{m['path']}` | {m['true']} | {m['predicted']} | {conf} |")
    if (Path(run.get("run_dir", ".")) / "plots" / "mistakes.png").exists():
        out += ["", "![wrong test images](plots/mistakes.png)"]
    return out + [""]
