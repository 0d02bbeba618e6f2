"""The report's "Trusting the deployed model" section: how far each stage's confidence can be believed
(temperature fitted on validation; ECE, NLL and Brier on test; a reliability diagram), and what sending the
least confident images to a person buys (risk-coverage curves, the deployed operating point).

Reads bench.json (per-variant calibration) and bench_logits.npz; numpy and matplotlib only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slimvit import calibrate
from slimvit.evaluate import wilson
from slimvit.explain import GRID
from slimvit.layout import DEPLOYED_MODEL, LOCALISATION, LOGITS, read_logits

STAGES = (("teacher", "teacher"), ("student", "student"), ("pruned", "pruned r"))


def stage_keys(run: dict) -> list[tuple[str, str]]:
    """(label, bench key) of the teacher, the student, the pruned model (their ONNX FP32 rows, as they
    would be deployed) and the deployed model."""
    keys = {r["key"] for r in run["bench"]["rows"]}
    out = []
    for stage in ("teacher", "student", "pruned"):
        key = f"{stage}/onnxruntime/fp32"
        if key in keys:
            out.append((stage, key))
    dep = next((r for r in run["bench"]["rows"] if r.get("deployed")), None)
    if dep is not None:
        out.append(("deployed", dep["key"]))
    return out


def _test_labels(bench: dict) -> np.ndarray | None:
    t = bench.get("test_images") or {}
    if not t.get("labels"):
        return None
    return np.array([bench["classes"].index(c) for c in t["labels"]])


def _probs(run: dict, key: str, temperature: float = 1.0) -> np.ndarray | None:
    logits = read_logits(Path(run.get("run_dir", ".")) / LOGITS, "test", key)
    return None if logits is None else calibrate.softmax(logits, temperature)


def section(run: dict) -> list[str]:
    b = run["bench"]
    cal = b.get("calibration") or {}
    y = _test_labels(b)
    stages = [(n, k) for n, k in stage_keys(run) if k in cal]
    if not stages or y is None:
        return []
    out = [
        "## Trusting the deployed model",
        "",
        "Confidence is what the model says about its own answer; it is worth something only if, of the "
        "images it calls 90% sure, about 90% are right. Each model's confidence is rescaled by one "
        "temperature fitted on the validation images (a temperature never changes the class it names); "
        "the figures below are on the test images. ECE: the average gap between confidence and accuracy "
        "(15 bins; 0 is perfect). NLL and Brier: lower is better.",
        "",
        "| model | temperature | ECE before | ECE after | NLL before | NLL after | Brier before | Brier after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, key in stages:
        c = cal[key]
        out.append(
            f"| {name} | {c['temperature']:.2f} | {c['ece']:.3f} | {c['ece_t']:.3f} | {c['nll']:.3f} | "
            f"{c['nll_t']:.3f} | {c['brier']:.3f} | {c['brier_t']:.3f} |"
        )
    unfitted = [n for n, k in stages if cal[k].get("not_fitted")]
    if unfitted:
        out += ["", f"Not fitted for {', '.join(unfitted)}: {cal[dict(stages)[unfitted[0]]]['not_fitted']}."]
    names = dict(stages)
    if "student" in names and "deployed" in names:
        out += ["", calibration_change(cal[names["student"]], cal[names["deployed"]], len(y))]
    out += ["", "![reliability](plots/reliability.png)", ""]
    out += _review(run, names, y)
    return out


def calibration_change(student: dict, deployed: dict, n: int) -> str:
    """The sentence on what compression did to calibration (ECE after temperature), with its noise."""
    diff = round(100 * (deployed["ece_t"] - student["ece_t"]), 1) + 0.0  # + 0.0: never "-0.0 points"
    return (
        f"Compression changed calibration by {diff:+.1f} points of ECE after temperature (student "
        f"{100 * student['ece_t']:.1f}, deployed {100 * deployed['ece_t']:.1f}); with {n} test images an ECE "
        f"moves by about {100 / np.sqrt(n):.0f} points from the sample alone, so smaller differences are noise."
    )


def _review(run: dict, names: dict, y: np.ndarray) -> list[str]:
    b = run["bench"]
    cal = b.get("calibration") or {}
    key = names.get("deployed")
    if key is None:
        return []
    out = [
        "### Sending the least confident images to a person",
        "",
        "The curve shows, for every share of test images the model keeps (the most confident first), the "
        "accuracy on those it keeps: a line that sends the rest to a person gets that accuracy on what it "
        "does not check.",
        "",
        "![risk-coverage](plots/risk_coverage.png)",
        "",
    ]
    plan = b.get("review")
    if not plan:
        p = _probs(run, key, cal[key]["temperature"])
        if p is None:
            return out[:1] + [
                "",
                "bench_logits.npz is missing: run `slimvit bench --force` for the curve.",
                "",
            ]
        conf, right = p.max(1), p.argmax(1) == y
        points = {cov: _at_coverage(conf, right, cov) for cov in (1.0, 0.95, 0.9)}
        out += [
            "No review threshold was deployed (`slimvit deploy --review-rate 0.05` or `--target-accuracy "
            "99.5` chooses one on validation). On test, for reference: "
            + "; ".join(f"keeping {100 * c:.0f}%: {100 * a:.2f}% right" for c, a in points.items())
            + ".",
            "",
        ]
        return out
    v, t = plan["val"], plan.get("test")
    lo, hi = plan["threshold_range"]["lo"], plan["threshold_range"]["hi"]
    out.append(
        f"Deployed with a review threshold: confidence below **{plan['threshold']:.3f}** goes to a person "
        f"({plan['rule']}; chosen on the {v['n']} validation images, where it sent {v['review']} "
        f"({100 * v['review_rate']:.1f}%) and "
        + ("-" if v["accuracy_accepted"] is None else f"{100 * v['accuracy_accepted']:.2f}%")
        + " of the rest were right)."
    )
    if v["review"] == 0 and plan["threshold"] <= 0:
        out.append(
            f"With {v['n']} validation images that share is less than one image: nothing is sent to review. "
            "More validation images, or `--target-accuracy`, give the threshold something to stand on."
        )
    elif lo is not None:
        out.append(
            f"Validation is small, so the threshold itself is uncertain: resampling the validation images puts "
            f"it between {lo:.3f} and {hi:.3f} (95%)."
        )
    if t:
        k, n = t["correct_accepted"], t["accepted"]
        lo_t, hi_t = wilson(k, n) if n else (0.0, 0.0)
        out.append(
            f"On test: sending {100 * t['review_rate']:.1f}% to review ({t['review']} of {t['n']}), "
            f"{100 * (k / n if n else 0):.2f}% of the rest are right (95% interval {100 * lo_t:.1f}-{100 * hi_t:.1f}%)."
        )
        if v["accuracy_accepted"] is not None:
            kept = lo_t - 1e-9 <= v["accuracy_accepted"] <= hi_t + 1e-9
            out.append(
                "What validation promised "
                + (
                    "lies inside that interval: test agrees with it."
                    if kept
                    else f"({100 * v['accuracy_accepted']:.2f}%) lies **outside** that interval."
                )
            )
    return out + [""]


def _at_coverage(conf: np.ndarray, right: np.ndarray, coverage: float) -> float:
    curve = calibrate.risk_coverage(conf, right)
    k = max(1, int(round(coverage * len(curve)))) - 1
    return curve[k]["accuracy"]


def _plotted(run: dict) -> tuple[dict, np.ndarray, list[tuple[str, str]]] | None:
    """(calibration by key, test labels, [(label, key)] of the student and the deployed model) for the
    plots, or None when the bench has no calibration or test labels."""
    b = run["bench"]
    cal, y = b.get("calibration") or {}, _test_labels(b)
    names = dict(stage_keys(run))
    shown = [(n, names[n]) for n in ("student", "deployed") if n in names and names[n] in cal]
    return (cal, y, shown) if shown and y is not None else None


def plot_reliability(run: dict, path: Path, plt) -> bool:
    """Confidence against accuracy per bin, for the student and the deployed model, before and after
    temperature."""
    got = _plotted(run)
    if got is None:
        return False
    cal, y, shown = got
    fig, axes = plt.subplots(1, len(shown), figsize=(4.6 * len(shown), 4), squeeze=False)
    for ax, (name, key) in zip(axes[0], shown, strict=True):
        for t, label, style in ((1.0, "before", "o--"), (cal[key]["temperature"], "after temperature", "s-")):
            p = _probs(run, key, t)
            if p is None:
                continue
            bins = [q for q in calibrate.reliability(p, y) if q["n"]]
            ax.plot([q["confidence"] for q in bins], [q["accuracy"] for q in bins], style, label=label, ms=4)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, label="perfect")
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name}: ECE {cal[key]['ece']:.3f} -> {cal[key]['ece_t']:.3f}")
        ax.legend(loc="upper left")
    return True


def plot_risk_coverage(run: dict, path: Path, plt) -> bool:
    """Accuracy on the accepted test images against the share accepted, student and deployed model."""
    got = _plotted(run)
    if got is None:
        return False
    cal, y, shown = got
    b = run["bench"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, key in shown:
        p = _probs(run, key, cal[key]["temperature"])
        if p is None:
            continue
        curve = calibrate.risk_coverage(p.max(1), p.argmax(1) == y)
        ax.plot([100 * q["coverage"] for q in curve], [100 * q["accuracy"] for q in curve], label=name)
    plan = b.get("review")
    if plan and plan.get("test") and plan["test"]["accuracy_accepted"] is not None:
        t = plan["test"]
        ax.scatter(
            [100 * (1 - t["review_rate"])],
            [100 * t["accuracy_accepted"]],
            color="tab:red",
            zorder=3,
            label=f"deployed threshold {plan['threshold']:.3f}",
        )
    ax.set_xlabel("test images kept, most confident first (%)")
    ax.set_ylabel("accuracy on the kept images (%)")
    ax.set_title("Risk-coverage on the test images")
    ax.legend()
    return True


# --------------------------------------------------------------------------- where the models look

LOCALISE_IMAGES = 120
"""Localisation is scored on at most this many test images with boxes, evenly spaced in the test list (which
is in class order): an occlusion map costs 37 model calls an image, and on NEU-DET's 360 test images the four
models took 1.3 of the pipeline's 18 minutes (AMD EPYC, 2 threads); 120 images keep the pointing game's
interval near +-9 points and take a third of that. The student, the pruned model and the deployed one are scored
(the compression steps); the teacher is drawn in the heatmap plot only."""


def localised(t: dict, limit: int = LOCALISE_IMAGES) -> list[int]:
    """The indices of the test images localisation is scored on: those with boxes, at most `limit` of them,
    evenly spaced so every class is sampled."""
    have = [i for i, b in enumerate(t.get("boxes") or []) if b]
    if len(have) <= limit:
        return have
    return [have[int(j * len(have) / limit)] for j in range(limit)]


def _model_files(run: dict) -> list[tuple[str, Path]]:
    """(label, ONNX file) of the teacher, the student, the pruned model and the deployed model (the
    deployed file itself, on the runtime it was deployed for)."""
    run_dir = Path(run.get("run_dir", "."))
    rows = {r["key"]: r for r in run["bench"]["rows"]}
    out = []
    for name, key in stage_keys(run):
        if name == "deployed":
            path = run_dir / DEPLOYED_MODEL
        else:
            path = run_dir / rows[key]["file"]
        if path.exists():
            out.append((name, path))
    return out


def localisation_scores(run: dict, threads: int = 2) -> dict[str, list]:
    """Each model's per-test-image localisation (explain.localise), cached in the run folder by model file
    (its size and modification time), so re-rendering the report does not recompute them."""
    import json

    from slimvit.explain import localise
    from slimvit.io import atomic_write_json

    t = run["bench"].get("test_images") or {}
    run_dir = Path(run.get("run_dir", "."))
    cache_path = run_dir / LOCALISATION
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    idx = localised(t)
    out, changed = {}, False
    for name, path in _model_files(run):
        if name == "teacher":  # not a compression step; its heatmaps are drawn (plot_heatmaps), not scored
            continue
        st = path.stat()
        tag = f"{path.relative_to(run_dir)}|{st.st_size}|{st.st_mtime_ns}|{len(t['paths'])}|{len(idx)}"
        if cache.get(name, {}).get("tag") != tag:
            got = localise(
                path, Path(t["root"]), [t["paths"][i] for i in idx], [t["boxes"][i] for i in idx], threads
            )
            scores: list = [None] * len(t["paths"])
            for i, sc in zip(idx, got, strict=True):
                scores[i] = sc
            cache[name] = {"tag": tag, "scores": scores}
            changed = True
        out[name] = cache[name]["scores"]
    if changed:
        atomic_write_json(cache_path, cache)
    return out


def _mean_ci(x: np.ndarray, signed: bool = False) -> str:
    """The mean of a [0, 1] figure in points with its 95% half-width; `signed` for a difference."""
    if len(x) < 2:
        return "-"
    se = x.std(ddof=1) / np.sqrt(len(x))
    return f"{100 * x.mean():{'+' if signed else ''}.1f} (+-{196 * se:.1f})"


def _sample_words(n: int, n_boxed: int) -> str:
    if n >= n_boxed:
        return f"the {n} test images that have them"
    return f"{n} of the {n_boxed} test images that have them (evenly spaced: each map costs 37 model calls)"


def localisation_section(run: dict) -> list[str]:
    from slimvit.evaluate import mcnemar

    t = run["bench"].get("test_images") or {}
    if not t.get("paths"):
        return []
    if not any(t.get("boxes") or []):
        return [
            "## Where the models look",
            "",
            "This dataset has no defect boxes, so localisation is not scored; `slimvit predict --explain DIR` "
            "still draws each image's heatmap.",
            "",
        ]
    root = Path(t["root"])
    if not all((root / p).exists() for p in t["paths"][:1]):
        return [
            "## Where the models look",
            "",
            f"The test images are not at `{root}`: localisation not scored.",
            "",
        ]
    scores = localisation_scores(run)
    names = list(scores)
    keep = [i for i in range(len(t["paths"])) if all(scores[n][i] is not None for n in names)]
    if not keep:
        return []
    hits = {n: np.array([scores[n][i]["hit"] for i in keep]) for n in names}
    energy = {n: np.array([scores[n][i]["energy"] for i in keep]) for n in names}
    chance = np.array([scores[names[0]][i]["chance"] for i in keep])
    out = [
        "## Where the models look",
        "",
        f"An occlusion heatmap (a {GRID}x{GRID} grid, each cell hidden in turn; how much the named class's "
        "log-probability falls) scored against the dataset's defect boxes on "
        f"{_sample_words(len(keep), sum(1 for b in t['boxes'] if b))}. Pointing game: the share of images whose hottest cell lies "
        "in a box; energy: the share of the heat inside the boxes; chance: the boxes' share of the image, what "
        "a map that looks nowhere in particular would score on both. 95% intervals.",
        "",
        "| model | pointing game % | energy in boxes % | chance % |",
        "|---|---:|---:|---:|",
    ]
    for n in names:
        k = int(hits[n].sum())
        lo, hi = wilson(k, len(keep))
        out.append(
            f"| {n} | {100 * k / len(keep):.1f} ({100 * lo:.0f}-{100 * hi:.0f}) | {_mean_ci(energy[n])} | "
            f"{100 * chance.mean():.1f} |"
        )
    out += ["", "Each compression step against its input on the same images:", ""]
    out += [
        "| step | pointing game change (points; only after / only before hit, McNemar p) | energy change (points, 95% CI) |"
    ]
    out += ["|---|---:|---:|"]
    pairs = [
        (a, b)
        for a, b in (("student", "pruned"), ("pruned", "deployed"), ("student", "deployed"))
        if a in hits and b in hits
    ]
    for a, b in pairs:
        m = mcnemar(hits[b], hits[a])
        d = energy[b] - energy[a]
        out.append(
            f"| {a} -> {b} | {100 * (hits[b].mean() - hits[a].mean()):+.1f} ({m['a_only']} / {m['b_only']}, "
            f"p={m['p']:.2g}) | {_mean_ci(d, signed=True)} |"
        )
    lo_hit = {n: wilson(int(hits[n].sum()), len(keep))[0] for n in names}
    flat = [n for n in names if lo_hit[n] <= chance.mean() + 1e-9]
    if flat:
        out += [
            "",
            f"For {', '.join(flat)} the pointing game is not above chance ({100 * chance.mean():.0f}%: the boxes "
            "cover that much of the image): on this data the heatmaps do not single out the defect boxes, so "
            "the steps above say whether compression changed the maps, not whether the models look at the "
            "defects.",
        ]
    if "student" in hits and "deployed" in hits:
        dh = 100 * (hits["deployed"].mean() - hits["student"].mean())
        de = 100 * (energy["deployed"].mean() - energy["student"].mean())
        if abs(dh) <= 5 and abs(de) <= 5:
            out += [
                "",
                f"Compression kept where the model looks: the deployed model is within 5 points of the student on both ({dh:+.1f} and {de:+.1f}).",
            ]
        else:
            labels = np.array([t["labels"][i] for i in keep])
            per = {
                c: 100 * (hits["deployed"][labels == c].mean() - hits["student"][labels == c].mean())
                for c in sorted(set(labels))
            }
            worst = min(per, key=per.get)
            out += [
                "",
                f"**Compression moved where the model looks**: pointing game {dh:+.1f} points, energy {de:+.1f} "
                f"points against the student; most on {worst} ({per[worst]:+.1f} points of pointing game).",
            ]
    labels = np.array([t["labels"][i] for i in keep])
    out += [
        "",
        "Pointing game per class, %:",
        "",
        "| class | images | " + " | ".join(names) + " |",
        "|---|---:|" + "---:|" * len(names),
    ]
    for c in sorted(set(labels)):
        m = labels == c
        out.append(
            f"| {c} | {int(m.sum())} | " + " | ".join(f"{100 * hits[n][m].mean():.0f}" for n in names) + " |"
        )
    out += ["", "![heatmaps](plots/heatmaps.png)", ""]
    return out


def plot_heatmaps(run: dict, path: Path, plt, n_right: int = 3, n_wrong: int = 3) -> bool:
    """Test images (the deployed model's wrong ones first, then right ones) with each model's heatmap
    beside them, boxes drawn."""
    from slimvit import runtime
    from slimvit.explain import occlusion, upsample
    from slimvit.preprocess import load_rgb, open_rgb

    b = run["bench"]
    t = b.get("test_images") or {}
    files = _model_files(run)
    dep = next((r for r in b["rows"] if r.get("deployed")), None)
    if not t.get("paths") or not files or dep is None:
        return False
    root = Path(t["root"])
    if not (root / t["paths"][0]).exists():
        return False
    pred = (b.get("predictions") or {}).get(dep["key"]) or []
    wrong = [i for i, (k, y) in enumerate(zip(pred, t["labels"], strict=False)) if b["classes"][k] != y]
    right = [i for i in range(len(pred)) if i not in set(wrong)]
    pick = wrong[:n_wrong] + right[:: max(1, len(right) // max(1, n_right))][:n_right]
    runners = [(name, *runtime.runner(p, 2)) for name, p in files]
    fig, axes = plt.subplots(
        len(pick), 1 + len(runners), figsize=(2.2 * (1 + len(runners)), 2.3 * len(pick)), squeeze=False
    )
    for row, i in zip(axes, pick, strict=True):
        img = np.asarray(open_rgb(root / t["paths"][i]))
        row[0].imshow(img)
        row[0].set_title(f"{Path(t['paths'][i]).name}\ntrue {t['labels'][i]}", fontsize=7)
        boxes = (t.get("boxes") or [[]] * len(pred))[i]
        for ax, (name, run_fn, meta) in zip(row[1:], runners, strict=True):
            r = occlusion(run_fn, meta, load_rgb(root / t["paths"][i], int(meta["input_size"][-1])))
            heat = upsample(r["heat"] / (r["heat"].max() or 1), (img.shape[1], img.shape[0]), smooth=True)
            ax.imshow(img)
            ax.imshow(heat, cmap="inferno", alpha=0.5, vmin=0, vmax=1)
            ax.set_title(f"{name}: {meta['classes'][r['class']]} {r['probs'][r['class']]:.2f}", fontsize=7)
        for ax in row:
            ax.axis("off")
            for _, x0, y0, x1, y1 in boxes:
                ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="cyan", lw=0.8))
    fig.suptitle(
        "Where each model looks (occlusion; defect boxes in cyan); the deployed model's wrong images first",
        fontsize=9,
    )
    return True
