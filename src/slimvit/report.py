"""`slimvit report`: REPORT.md with tables and PNG plots, read back from a run folder's JSON files.

Nothing here measures anything: every number comes from the files the stages wrote (bench.json,
prune.json, quantize.json, metrics.jsonl, ...), and every sentence of the conclusions is computed
from those numbers, so the report cannot claim what the run did not show.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import yaml

from slimvit import trust
from slimvit.config import Config, read_config
from slimvit.deploy import shape_label
from slimvit.errors import ConfigError, ModelError
from slimvit.io import atomic_path, atomic_write_text, is_main_process, read_json, read_jsonl

log = logging.getLogger(__name__)

TRAINED = (
    ("teacher", "teacher"),
    ("student", "student (distilled)"),
    ("student_nokd", "student (no distillation)"),
    ("pruned", "pruned + fine-tune"),
)


def _maybe(path: Path):
    return read_json(path) if path.exists() else None


def load_run(run_dir: Path, cfg: Config | None = None) -> dict:
    """Everything the report reads; bench.json is required, the rest is used when present.

    `cfg` is the run's typed config; None reads the run folder's config.yaml (scripts reading old runs).
    """
    run_dir = Path(run_dir)
    if cfg is None and (run_dir / "config.yaml").exists():
        try:
            cfg = read_config(run_dir / "config.yaml")
        except ConfigError as e:  # a folder written by an older slimvit (keys since removed)
            log.warning("report: %s; the configuration is left out", e)
    if not (run_dir / "bench.json").exists():
        raise ModelError(f"no '{run_dir / 'bench.json'}'; run `slimvit bench` (or `slimvit run`) first")
    r = {
        "bench": read_json(run_dir / "bench.json"),
        "data": _maybe(run_dir / "data.json"),
        "manifest": _maybe(run_dir / "manifest.json") or {"stages": {}},
        "prune": _maybe(run_dir / "pruned" / "prune.json"),
        "sweep": _maybe(run_dir / "prune_sweep.json"),
        "export": _maybe(run_dir / "onnx" / "export.json"),
        "quantize": _maybe(run_dir / "onnx" / "quantize.json"),
        "config": cfg,
        "run_dir": run_dir,
        "train": {},
        "eval": {},
        "curves": {},
    }
    _apply_deploy(r["bench"], _maybe(run_dir / "deploy" / "deploy.json"))
    for name, _ in TRAINED:
        d = run_dir / name
        if (d / "train.json").exists():
            r["train"][name] = read_json(d / "train.json")
            r["curves"][name] = read_jsonl(d / "metrics.jsonl")
        if (d / "eval.json").exists():
            r["eval"][name] = read_json(d / "eval.json")
    return r


def _apply_deploy(bench: dict, dep: dict | None) -> None:
    """Mark the deployed row and carry the deploy step's record into the bench dict the report reads."""
    key = dep.get("key") if dep and dep.get("deployed") else None
    for r in bench["rows"]:
        r["deployed"] = key is not None and r.get("key") == key
    dep = dep or {}
    bench["deployed_why"] = dep.get("why")
    bench["deploy_error"] = dep.get("error") if dep else "the deploy stage has not run"
    bench["predict_check"] = dep.get("predict_check")
    bench["budgets"] = dep.get("budgets") or {}
    bench["review"] = dep.get("review")


# --------------------------------------------------------------------------- helpers


def _rows(run: dict) -> list[dict]:
    return run["bench"]["rows"]


def _find(run: dict, stage: str, runtime: str, precision: str) -> dict | None:
    return next(
        (r for r in _rows(run) if (r["stage"], r["runtime"], r["precision"]) == (stage, runtime, precision)),
        None,
    )


def _ref(run: dict) -> dict:
    return next(r for r in _rows(run) if r["reference"])


def _deployed(run: dict) -> dict | None:
    """The deployed row, or None when no candidate fitted the budgets."""
    return next((r for r in _rows(run) if r["deployed"]), None)


def pct_ci(x: float | None, ci) -> str:
    """An accuracy with its 95% interval, e.g. `98.89% (97.2-99.6)`."""
    if x is None:
        return "-"
    return pct(x) + (f" ({100 * ci[0]:.1f}-{100 * ci[1]:.1f})" if ci else "")


def _paired(run: dict, key_a: str, key_b: str) -> dict | None:
    """Exact McNemar test of two bench rows on the same test images (None if predictions are missing)."""
    from slimvit.evaluate import mcnemar

    a, b = _bench_predictions(run, key_a), _bench_predictions(run, key_b)
    if a is None or b is None:
        return None
    return mcnemar(a[0] == a[1], b[0] == b[1])


def _verdict(t: dict | None, a: str, b: str) -> str:
    """One phrase for a paired test: whether A and B differ on these images."""
    if t is None:
        return "no paired test (predictions missing)"
    diff = t["a_only"] - t["b_only"]
    if t["p"] >= 0.05:
        return (
            f"no real difference ({t['a_only']} images only {a} got right, {t['b_only']} only {b}; "
            f"exact McNemar p={t['p']:.2g})"
        )
    better = a if diff > 0 else b
    return (
        f"{better} is better ({t['a_only']} vs {t['b_only']} discordant images, exact McNemar p={t['p']:.2g})"
    )


def front(rows: list[dict]) -> list[dict]:
    """Candidates no other candidate beats on both validation accuracy and batch-1 latency (fastest first)."""
    cands = sorted(
        (r for r in rows if r.get("candidate") and r.get("val_accuracy") is not None),
        key=lambda r: (r["latency_ms_p50"], -r["val_accuracy"]),
    )
    out, best = [], -1.0
    for r in cands:
        if r["val_accuracy"] > best + 1e-12:
            out.append(r)
            best = r["val_accuracy"]
    return out


def pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _label(r: dict) -> str:
    runtime = {"pytorch": "PyTorch", "onnxruntime": "ORT", "openvino": "OpenVINO"}.get(
        r["runtime"], r["runtime"]
    )
    return f"{r['stage']} {runtime} {r['precision']}"


# --------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "font.size": 9, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)


def plot_pareto(run: dict, path: Path) -> None:
    """Every deployment candidate: validation accuracy vs batch-1 latency, the front joined, budgets drawn.

    Marker shape per runtime, marker area ~ file size, colour per pruning ratio; the deployed point is
    ringed red, the reference (eager student) is a grey square.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    rows = [r for r in _rows(run) if r.get("candidate")]
    ref = _ref(run)
    if not rows:
        rows = [r for r in _rows(run) if r["runtime"] != "pytorch"]
    sizes = np.array([r["size_mb"] for r in rows] or [1.0])
    shapes = sorted({_shape_key(r) for r in rows})
    legend = {
        _shape_key(r): f"ratio {r.get('ratio') or 0:g}"
        + (f", {r['depth']} blocks" if r.get("depth") is not None else "")
        for r in rows
    }
    cmap = plt.get_cmap("viridis")
    markers = {"onnxruntime": "o", "openvino": "D"}
    for r in rows:
        c = cmap(shapes.index(_shape_key(r)) / max(1, len(shapes) - 1))
        acc = r.get("val_accuracy") if r.get("val_accuracy") is not None else r["accuracy"]
        ax.scatter(
            r["latency_ms_p50"],
            100 * acc,
            s=30 + 300 * r["size_mb"] / max(sizes.max(), 1e-9),
            marker=markers.get(r["runtime"], "o"),
            color=c,
            alpha=0.65,
            edgecolors="red" if r["deployed"] else "none",
            linewidths=2,
        )
    f = front(rows)
    if f:
        ax.plot(
            [r["latency_ms_p50"] for r in f],
            [100 * r["val_accuracy"] for r in f],
            "k--",
            lw=1,
            drawstyle="steps-post",
            label="front",
        )
        for r in f:
            ax.annotate(
                f"{shape_label(r) or 'r=0'} {r['precision']}\n{r['size_mb']:.1f} MB",
                (r["latency_ms_p50"], 100 * r["val_accuracy"]),
                fontsize=7,
                xytext=(6, -10),
                textcoords="offset points",
            )
    if ref.get("val_accuracy") is not None:
        ax.scatter(ref["latency_ms_p50"], 100 * ref["val_accuracy"], marker="s", color="0.5", s=60)
        ax.annotate(
            "reference (eager student)",
            (ref["latency_ms_p50"], 100 * ref["val_accuracy"]),
            fontsize=7,
            xytext=(-10, 8),
            textcoords="offset points",
            ha="right",
        )
    budget = run["bench"].get("budgets") or {}
    if budget.get("budget_ms"):
        ax.axvline(
            budget["budget_ms"], color="tab:red", lw=1, label=f"latency budget {budget['budget_ms']:g} ms"
        )
    for r in rows:
        if budget.get("budget_mb") and r["size_mb"] > budget["budget_mb"]:
            ax.scatter(
                r["latency_ms_p50"],
                100 * (r.get("val_accuracy") or r["accuracy"]),
                marker="x",
                color="tab:red",
                s=25,
                linewidths=1,
            )
    for k in shapes:
        ax.scatter(
            [],
            [],
            color=cmap(shapes.index(k) / max(1, len(shapes) - 1)),
            label=legend[k],
        )
    for runtime in sorted({r["runtime"] for r in rows}):
        name = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}.get(runtime, runtime)
        ax.scatter([], [], marker=markers.get(runtime, "o"), color="0.4", label=name)
    if budget.get("budget_mb"):
        ax.scatter([], [], marker="x", color="tab:red", label=f"over the {budget['budget_mb']:g} MB budget")
    ax.set_xscale("log")
    ax.margins(x=0.1, y=0.2)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_xlabel(f"batch-1 latency p50, ms (log scale; {run['bench']['threads']} threads)")
    ax.set_ylabel("validation accuracy % (what the choice reads)")
    ax.set_title(
        "Deployment candidates: accuracy vs latency\nmarker area ~ file size; red ring: deployed", fontsize=9
    )
    _save(fig, path)


def plot_latency(run: dict, path: Path) -> None:
    """p50 latency (bars) with p90 (whisker) and file size of every variant."""
    plt = _plt()
    rows = _rows(run)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 0.35 * len(rows) + 1.5), sharey=True)
    y = np.arange(len(rows))
    p50 = np.array([r["latency_ms_p50"] for r in rows])
    p90 = np.array([r["latency_ms_p90"] for r in rows])
    colors = ["tab:red" if r["deployed"] else "tab:gray" if r["reference"] else "tab:blue" for r in rows]
    ax1.barh(y, p50, xerr=[np.zeros_like(p50), p90 - p50], color=colors, alpha=0.8)
    ax1.set_yticks(y, [_label(r) + (" *" if r["deployed"] else "") for r in rows])
    ax1.invert_yaxis()
    ax1.set_xlabel("batch-1 latency ms (bar p50, whisker p90)")
    ax2.barh(y, [r["size_mb"] for r in rows], color=colors, alpha=0.8)
    ax2.set_xlabel("file size MB")
    fig.suptitle("Latency and size per artifact (* deployed; grey: reference)")
    _save(fig, path)


def plot_confusion(run: dict, path: Path) -> None:
    plt = _plt()
    dep = _deployed(run) or _find(run, "pruned", "onnxruntime", "fp32") or _ref(run)
    key = f"{dep['stage']}/{dep['runtime']}/{dep['precision']}"
    cm = np.asarray(run["bench"]["confusion"][key])
    classes = run["bench"]["classes"]
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.imshow(cm, cmap="Blues")
    ax.grid(False)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(
                j,
                i,
                str(cm[i, j]),
                ha="center",
                va="center",
                color="white" if cm[i, j] > cm.max() / 2 else "black",
            )
    ax.set_xticks(range(len(classes)), classes, rotation=40, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    what = "Deployed model" if dep["deployed"] else "Nothing deployed; shown"
    ax.set_title(f"{what} ({_label(dep)}), test split: {pct(dep['accuracy'])}")
    _save(fig, path)


def mistakes(run: dict) -> list[dict]:
    """The deployed model's wrong test images: path (relative to the dataset), true and predicted class,
    and the model's calibrated confidence in its prediction, as `slimvit predict` prints it (None where
    bench kept no logits)."""
    from slimvit.calibrate import softmax
    from slimvit.layout import LOGITS, read_logits

    dep = _deployed(run)
    b = run["bench"]
    t = b.get("test_images")
    if not dep or not t:
        return []
    key = f"{dep['stage']}/{dep['runtime']}/{dep['precision']}"
    pred = (b.get("predictions") or {}).get(key)
    if pred is None:
        return []
    logits = read_logits(Path(run.get("run_dir", ".")) / LOGITS, "test", key)
    conf = None
    if logits is not None and len(logits) == len(pred):
        temperature = (b.get("calibration") or {}).get(key, {}).get("temperature", 1.0)
        conf = softmax(logits, temperature).max(1)  # as `slimvit predict` prints it
    classes = b["classes"]
    out = []
    for i, (path, label, k) in enumerate(zip(t["paths"], t["labels"], pred, strict=True)):
        if classes[k] != label:
            out.append(
                {
                    "path": path,
                    "true": label,
                    "predicted": classes[k],
                    "confidence": None if conf is None else float(conf[i]),
                }
            )
    return sorted(out, key=lambda m: -(m["confidence"] or 0))


MAX_THUMBNAILS = 24


def plot_mistakes(run: dict, path: Path) -> bool:
    """Thumbnails of the deployed model's wrong test images (at most MAX_THUMBNAILS, most confident
    first), captioned true -> predicted (confidence). False (nothing drawn) when none or the images are
    not here."""
    from slimvit.preprocess import open_rgb

    wrong = mistakes(run)[:MAX_THUMBNAILS]
    root = Path((run["bench"].get("test_images") or {}).get("root", ""))
    if not wrong or not all((root / m["path"]).is_file() for m in wrong):
        return False
    plt = _plt()
    cols = min(6, len(wrong))
    rows = -(-len(wrong) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, m in zip(axes.ravel(), wrong, strict=False):
        ax.imshow(open_rgb(root / m["path"]))
        conf = f" ({m['confidence']:.2f})" if m["confidence"] is not None else ""
        ax.set_title(f"{Path(m['path']).name}\n{m['true']} -> {m['predicted']}{conf}", fontsize=7)
    fig.suptitle("Deployed model: wrong test images (true -> predicted, confidence)")
    _save(fig, path)
    return True


def _mistakes(run: dict) -> list[str]:
    """Each wrong test image of the deployed model: what a person checks first."""
    wrong = mistakes(run)
    dep = _deployed(run)
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


def plot_training(run: dict, path: Path) -> None:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, label in TRAINED:
        rows = run["curves"].get(name)
        if not rows:
            continue
        ep = [r["epoch"] for r in rows]
        ax1.plot(ep, [r["train_loss"] for r in rows], label=label)
        ax2.plot(ep, [100 * r["val_acc"] for r in rows], label=label)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss")
    ax1.set_title("Training loss")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation accuracy %")
    ax2.set_title("Validation accuracy (model selection uses this, never the test split)")
    ax2.legend(fontsize=8)
    _save(fig, path)


def plot_sweep(run: dict, path: Path) -> None:
    plt = _plt()
    sw = run["sweep"]
    fig, ax = plt.subplots(figsize=(6, 4))
    base = sw["baseline"]
    pts = sorted(sw["points"], key=_shape_key)
    widths = [p for p in pts if p.get("depth") is None]
    macs = [base["macs"] / 1e6] + [p["macs_after"] / 1e6 for p in widths]
    acc = [100 * (base["test_acc"] or 0)] + [100 * p["test_acc"] for p in widths]
    ax.plot(macs, acc, "o-", label="widths pruned")
    labels = ["r=0"] + [shape_label(p) for p in widths]
    deep = [p for p in pts if p.get("depth") is not None]
    if deep:
        ax.plot(
            [p["macs_after"] / 1e6 for p in deep],
            [100 * p["test_acc"] for p in deep],
            "s",
            label="and blocks removed",
        )
        macs += [p["macs_after"] / 1e6 for p in deep]
        acc += [100 * p["test_acc"] for p in deep]
        labels += [shape_label(p) for p in deep]
        ax.legend(fontsize=8)
    for m, a, lab in zip(macs, acc, labels, strict=True):
        ax.annotate(lab, (m, a), xytext=(4, 4), textcoords="offset points", fontsize=8)
    ax.set_xlabel("MACs (M), batch 1")
    ax.set_ylabel("test accuracy %")
    ax.set_title("Pruning sweep: accuracy vs MACs")
    _save(fig, path)


# --------------------------------------------------------------------------- sections


def _environment(run: dict) -> list[str]:
    b = run["bench"]
    v = b.get("versions", {})
    isa = ", ".join(b.get("isa", []))
    return [
        "## Environment",
        "",
        f"- CPU: {b['cpu']} ({b.get('cores', '?')} cores visible{'; ' + isa if isa else ''})",
        f"- Threads for every timed runtime: {b['threads']} (PyTorch intra-op and ONNX Runtime intra-op alike)",
        "- Libraries: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- Benchmark date: {b['date']}; report written {time.strftime('%Y-%m-%d %H:%M:%S')}",
        f"- Timing: {b['settings']['warmup']} warm-up runs, {b['settings']['runs']}+ timed batch-1 runs per variant in "
        f"{b['settings']['rounds']} interleaved rounds (median and p90); throughput at batch "
        f"{b['settings']['throughput_batch']}.",
        "",
    ]


def _finetune_teacher(run: dict) -> str:
    """Whom the main fine-tune distilled from, as prune.json recorded it (not as the config says)."""
    if not run["prune"]:
        return ""
    ft = run["prune"].get("finetune", {})
    if "distilled_from" not in ft:
        return " (whom it distilled from is not recorded: an older run)"
    return (
        f", distilled from the {ft['distilled_from']}" if ft["distilled_from"] else ", without distillation"
    )


def _dataset(run: dict) -> list[str]:
    d, c = run["data"], run["config"]
    out = ["## Dataset and configuration", ""]
    if d:
        counts = ", ".join(f"{k} {v}" for k, v in d["counts"].items())
        sp = d["split"]
        out += [
            f"- `{d['root']}` ({d['layout']} layout): {d['images']} images, {len(d['classes'])} classes ({counts})",
            f"- Split (stratified, seeded, duplicates kept together): {sp['train']} train / {sp['val']} val / "
            f"{sp['test']} test. Model selection uses val only; every accuracy here is on the test split.",
        ]
    if c is not None:
        m, t, dist, p = c.model, c.train, c.distill, c.prune
        out += [
            f"- Preset `{c.preset}`: {c.data.img_size} px; teacher `{m.teacher}` "
            f"({_epochs_ran(run, 'teacher', t.teacher_epochs)}), student `{m.student}` with `{m.student_stem}` stem "
            f"({_epochs_ran(run, 'student', t.epochs)}, distillation `{dist.loss}`, alpha {dist.alpha}, T {dist.temperature}); "
            f"precision `{t.precision}`{_resolved_precision(run)}; prune ratio {p.ratio} ({p.importance}), "
            f"at most {p.finetune_epochs} fine-tune epochs{_finetune_teacher(run)}.",
            "",
            "<details><summary>Full resolved config (config.yaml)</summary>",
            "",
            "```yaml",
            yaml.safe_dump(c.to_dict(), sort_keys=False).rstrip(),
            "```",
            "",
            "</details>",
        ]
    return out + [""]


def _epochs_ran(run: dict, role: str, configured: int) -> str:
    """The epochs a training ran, and why it differs from the configured count (train.steps_floor_images
    raises them on a small split; patience stops early)."""
    t = run["train"].get(role) or {}
    ran, planned = t.get("epochs_run"), t.get("epochs")
    if ran is None:
        return f"{configured} epochs"
    text = f"{ran} epochs"
    if planned is not None and planned != configured:
        text += f": {configured} configured, raised to {planned} by train.steps_floor_images"
    if planned is not None and ran < planned:
        text += f", stopped early of {planned}"
    return text


def _resolved_precision(run: dict) -> str:
    used = sorted({t["precision"] for t in run["train"].values() if "precision" in t})
    return f" (trained in {', '.join(used)})" if used else ""


def _stage_table(run: dict) -> list[str]:
    ref = _ref(run)
    out = [
        "## Stages",
        "",
        f"Every artifact of this run, measured by one `slimvit bench` process. Ratios are against the reference "
        f"row: the unpruned distilled student in eager FP32 PyTorch ({ref['latency_ms_p50']:.2f} ms, "
        f"{ref['size_mb']:.2f} MB).",
        "",
        "| stage | runtime | precision | params (M) | size MB | MACs (M) | test accuracy (95% CI) | macro-F1 | p50 ms | p90 ms | "
        "images/s (batch) | latency x ref | size x ref |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    batch = run["bench"]["settings"]["throughput_batch"]
    for r in _rows(run):
        if r["stage"].startswith("sweep/") and not r["deployed"]:
            continue  # the sweep models' variants are in the candidates table
        tag = " (reference)" if r["reference"] else " **(deployed)**" if r["deployed"] else ""
        out.append(
            f"| {r['stage']}{tag} | {r['runtime']} | {r['precision']} | {r['params'] / 1e6:.2f} | {r['size_mb']:.2f} | "
            f"{r['macs'] / 1e6:.0f} | {pct_ci(r['accuracy'], r.get('accuracy_ci'))} | {r['macro_f1']:.4f} | {r['latency_ms_p50']:.2f} | "
            f"{r['latency_ms_p90']:.2f} | {r['throughput_ips']:.0f} ({batch}) | "
            f"{r['latency_ms_p50'] / ref['latency_ms_p50']:.2f} | {r['size_mb'] / ref['size_mb']:.2f} |"
        )
    out += [
        "",
        "![accuracy vs latency](plots/pareto.png)",
        "",
        "![latency and size](plots/latency.png)",
    ]
    return [*out, ""]


def _distillation(run: dict) -> list[str]:
    out = ["## Distillation", ""]
    tr, ev = run["train"], run["eval"]
    if "student" not in ev:
        return out + ["No student was trained in this run.", ""]
    out += [
        "| student | distillation | epochs | best val acc (epoch) | test accuracy | test macro-F1 | training time |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in ("student", "student_nokd"):
        if name in ev and name in tr:
            t = tr[name]
            out.append(
                f"| {dict(TRAINED)[name]} | {t['distill']} | {t['epochs']} | {pct(t['best_val_acc'])} ({t['best_epoch']}) | "
                f"{pct(ev[name]['accuracy'])} | {ev[name]['macro_f1']:.4f} | {t['seconds'] / 60:.1f} min |"
            )
    if "teacher" in ev:
        t = tr["teacher"]
        out.append(
            f"| (teacher) | - | {t['epochs']} | {pct(t['best_val_acc'])} ({t['best_epoch']}) | {pct(ev['teacher']['accuracy'])} | "
            f"{ev['teacher']['macro_f1']:.4f} | {t['seconds'] / 60:.1f} min |"
        )
    how = tr.get("student", {}).get("teacher_logits")
    if how == "cached":
        out += [
            "",
            "The teacher ran once per training image before the student's training, on each flip and rotation "
            "the augmentation draws from; the student learned from the logits averaged over them "
            "(`distill.teacher_logits: cached`), so no teacher ran in the training steps.",
        ]
    elif how == "live":
        out += ["", "The teacher ran on every augmented training batch (`distill.teacher_logits: live`)."]
    out += ["", "![training curves](plots/training.png)", ""]
    return out


def _pruning(run: dict) -> list[str]:
    p = run["prune"]
    out = ["## Pruning", ""]
    if not p:
        return out + ["The pruning stage has not run.", ""]
    wb, wa = p["widths_before"], p["widths_after"]
    b0 = next(iter(wb["blocks"].values()))
    a0 = next(iter(wa["blocks"].values()))
    out += [
        f"Torch-Pruning (DepGraph), ratio {p['ratio']}, importance `{p['importance']}`, "
        f"{'global' if p['global_pruning'] else 'uniform'}, round_to {p['round_to']}; the removed channels are "
        "physically gone (smaller matrices), and the model is still a plain timm ViT.",
        "",
        "| | before | after | ratio |",
        "|---|---:|---:|---:|",
        f"| embedding width | {wb['embed_dim']} | {wa['embed_dim']} | {wa['embed_dim'] / wb['embed_dim']:.2f} |",
        f"| heads x head dim (block 0) | {b0['num_heads']} x {b0['head_dim']} | {a0['num_heads']} x {a0['head_dim']} | "
        f"{a0['attn_dim'] / b0['attn_dim']:.2f} |",
        f"| MLP hidden (block 0) | {b0['mlp_hidden']} | {a0['mlp_hidden']} | {a0['mlp_hidden'] / b0['mlp_hidden']:.2f} |",
        f"| params | {p['params_before'] / 1e6:.3f} M | {p['params_after'] / 1e6:.3f} M | {p['params_ratio']:.3f} |",
        f"| MACs | {p['macs_before'] / 1e6:.1f} M | {p['macs_after'] / 1e6:.1f} M | {p['macs_ratio']:.3f} |",
        f"| FP32 eager latency p50 (same process, interleaved) | {p['latency_ms_before']['p50']:.2f} ms | "
        f"{p['latency_ms_after']['p50']:.2f} ms | {p['latency_ratio']:.3f} |",
        f"| val accuracy | {pct(run['train'].get('student', {}).get('best_val_acc'))} | {pct(p['val_acc'])} "
        f"({pct(p['val_acc_pruned'])} right after pruning) | |",
        f"| test accuracy | {pct(run['eval'].get('student', {}).get('accuracy'))} | {pct(p['test_acc'])} | |",
        "",
        _finetune_text(p),
        "",
    ]
    sw = run["sweep"]
    if sw:
        out += [
            "### Sweep",
            "",
            _sweep_text(run),
            "",
            sweep_table(sw["baseline"], sw["points"]).rstrip(),
            "",
            "![pruning sweep](plots/sweep.png)",
            "",
        ]
    return out


def _finetune_text(p: dict) -> str:
    """How long the main fine-tune ran and why it stopped."""
    ft = p.get("finetune", {})
    ran, cap = ft.get("epochs_run"), ft.get("epochs")
    if ran is None:
        return f"Fine-tuned for {cap} epochs."
    target = ft.get("recovery_target")
    if ft.get("stopped"):
        why = f"stopped early: {ft['stopped']}"
    elif target is not None:
        why = (
            f"validation balanced accuracy stayed below the student's {pct(target)} (best {pct(ft.get('best_val_bal_acc'))}); "
            "the best epoch is kept"
        )
    else:
        why = "`prune.recover` is off"
    return f"Fine-tune: {ran} of at most {cap} epochs ({why})."


def sweep_table(baseline: dict, rows: list[dict]) -> str:
    def pct(x) -> str:
        return "-" if x is None else f"{100 * x:.2f}"

    lines = [
        "| ratio | blocks | params (M) | MACs (M) | FP32 latency ms (p50) | val acc % | test acc % | fine-tune epochs |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| 0 (student) | all | {baseline['params'] / 1e6:.3f} | {baseline['macs'] / 1e6:.1f} | "
        f"{baseline['latency_ms']:.2f} | {pct(baseline['val_acc'])} | {pct(baseline['test_acc'])} | - |",
    ]
    for r in rows:
        ep = r.get("finetune_epochs_run")
        lines.append(
            f"| {r['ratio']:g} | {r.get('depth') or 'all'} | {r['params_after'] / 1e6:.3f} | {r['macs_after'] / 1e6:.1f} | "
            f"{r['latency_ms_after']:.2f} | {pct(r['val_acc'])} | {pct(r['test_acc'])} | "
            f"{'-' if ep is None else ep} |"
        )
    return "\n".join(lines) + "\n"


def _sweep_text(run: dict) -> str:
    if run["config"] is None:
        return "The last column is the fine-tune epochs each ratio took."
    pc = run["config"].prune
    how = (
        "Each ratio is pruned from the model of the next lower ratio (the main pruned model stands for its own)"
        if pc.sweep_from == "previous"
        else "Each ratio is pruned from the distilled student"
    )
    cap = f"at most {pc.sweep_epochs} epochs"
    if pc.recover:
        cap += ", stopping once validation balanced accuracy is back to the student's"
    depth = ""
    depths = {p["depth"] for p in (run["sweep"] or {}).get("points", []) if p.get("depth") is not None}
    if depths:
        kept = " or ".join(str(d) for d in sorted(depths, reverse=True))
        depth = (
            f" Rows with a number of blocks are that ratio's model cut to {kept} blocks: the blocks whose "
            "skipping changed its predictions on training images least were removed one at a time, then it "
            "was fine-tuned the same way."
        )
    return f"{how} and fine-tuned for {cap}; the last column is the epochs it took.{depth}"


def _modes(q: dict) -> dict:
    """The quantized variants of one candidate's entry in quantize.json (its other key: fp32)."""
    return {k: v for k, v in q.items() if k != "fp32"}


def _quantization(run: dict) -> list[str]:
    q = ((run["quantize"] or {}).get("models") or {}).get("pruned")
    out = ["## Quantization", ""]
    if not q:
        return out + ["The quantization stage has not run.", ""]
    fp32 = q["fp32"]
    out += [
        "All variants of the pruned model, built with ONNX Runtime's tools and run by ONNX Runtime on the full "
        "test split. Ops by precision count compute nodes of the file (before ORT's own load-time fusions).",
        "",
        "| variant | size MB | x FP32 size | accuracy | agreement with FP32 | int8 ops | fp16 ops | float32 ops |",
        "|---|---:|---:|---:|---:|---|---|---|",
    ]

    def ops(d: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in d.items()) or "-"

    out.append(
        f"| fp32 | {fp32['size_mb']:.2f} | 1.00 | {pct(fp32['accuracy'])} | - | - | - | {ops(fp32['ops']['float32'])} |"
    )
    for mode, info in _modes(q).items():
        out.append(
            f"| {mode} | {info['size_mb']:.2f} | {info['size_mb'] / fp32['size_mb']:.2f} | {pct(info['accuracy'])} | "
            f"{pct(info['agreement_fp32'])} | {ops(info['ops']['int8'])} | {ops(info['ops']['fp16'])} | "
            f"{ops(info['ops']['float32'])} |"
        )
    out.append("")
    for mode, info in _modes(q).items():
        details = [
            f"{k}: {v}" for k, v in info.items() if k in ("weights", "activations", "op_types", "format")
        ]
        if info.get("kept_float32"):
            details.append(f"kept in float32 (no fp16 CPU kernel): {', '.join(info['kept_float32'])}")
        out.append(f"- **{mode}**: " + "; ".join(details) + ".")
        reasons = info.get("float_reasons") or {}
        if reasons and mode.startswith("int8"):
            out.append("  Float ops and why: " + "; ".join(f"{k}: {v}" for k, v in reasons.items()) + ".")
    out.append("")
    return out


def _ratio_text(r: dict) -> str:
    if r.get("ratio") is None:
        return ""
    return f", pruning ratio {r['ratio']:g}" + (
        f", {r['depth']} blocks" if r.get("depth") is not None else ""
    )


def _shape_key(r: dict) -> tuple:
    """Sort key of a pruned model: by width ratio, then fewer blocks later (all blocks first)."""
    return (r.get("ratio") or 0.0, -(r.get("depth") or 10**6))


def _budget_sentences(run: dict) -> list[str]:
    """One sentence per budget: what it cost in validation accuracy against the best candidate without it."""
    b = run["bench"]
    budget = b.get("budgets") or {}
    rows = [r for r in _rows(run) if r.get("candidate") and r.get("portable", True) is not False]
    if not rows:
        return []
    best = max(rows, key=lambda r: r["val_accuracy"])
    out = []
    for key, unit, field in (("budget_ms", "ms", "latency_ms_p50"), ("budget_mb", "MB", "size_mb")):
        limit = budget.get(key)
        if limit is None:
            continue
        fit = [r for r in rows if r[field] <= limit]
        if not fit:
            out.append(f"- The {limit:g} {unit} budget: no candidate fits it.")
            continue
        top = max(fit, key=lambda r: r["val_accuracy"])
        cost = 100 * (best["val_accuracy"] - top["val_accuracy"])
        out.append(
            f"- The {limit:g} {unit} budget cost {cost:.2f} validation points: the most accurate candidate within it "
            f"({_label(top)}{_ratio_text(top)}, {top[field]:.2f} {unit}) scores {pct(top['val_accuracy'])} against "
            f"{pct(best['val_accuracy'])} for the most accurate of all ({_label(best)}{_ratio_text(best)})."
        )
    return out


def _candidates(run: dict) -> list[str]:
    """The deployment candidates: the front table, the plot, and each precision's paired test against FP32."""
    rows = [r for r in _rows(run) if r.get("candidate")]
    out = ["## Deployment candidates", ""]
    if not rows:
        return out + ["No deployment candidates were benchmarked in this run.", ""]
    n_val = max(r.get("val_n") or 0 for r in rows)
    f = front(rows)
    out += [
        f"Every ONNX variant of the pruned model and of every pruning-sweep model ({len(rows)} candidates) was "
        f"exported, quantized and timed in the same bench run. The choice reads **validation** accuracy only "
        f"({n_val} images: one image is {100 / max(1, n_val):.2f} points); test accuracy is reported, never used "
        "to choose. The front: candidates that no other candidate beats on both validation accuracy and batch-1 "
        "latency.",
        "",
        "| ratio (dN: N blocks kept) | runtime | precision | size MB | p50 ms | val accuracy (95% CI) | "
        "test accuracy (95% CI) | x FP32 of same model: test | portable |",
        "|---:|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in f:
        base = _find(run, r["stage"], r["runtime"], "fp32")
        vs = (
            "-"
            if base is None or base is r
            else _verdict(_paired(run, r["key"], base["key"]), r["precision"], "fp32").split(" (")[0]
        )
        tag = " **(deployed)**" if r["deployed"] else ""
        out.append(
            f"| {shape_label(r).removeprefix('r=') or '0'}{tag} | {r['runtime']} | {r['precision']} | {r['size_mb']:.2f} | "
            f"{r['latency_ms_p50']:.2f} | {pct_ci(r['val_accuracy'], r.get('val_accuracy_ci'))} | "
            f"{pct_ci(r['accuracy'], r.get('accuracy_ci'))} | {vs} | "
            f"{'yes' if r.get('portable', True) else 'VNNI only'} |"
        )
    out += ["", "![deployment candidates](plots/pareto.png)", "", *_runtimes(run)]
    ref = _ref(run)
    small = [r for r in rows if r["size_mb"] <= 2.5]
    fast = [r for r in rows if r["latency_ms_p50"] <= ref["latency_ms_p50"] / 8]
    for name, group in (
        ("<= 2.5 MB", small),
        (f"<= 1/8 of the reference's {ref['latency_ms_p50']:.2f} ms", fast),
    ):
        if group:
            top = max(group, key=lambda r: r["val_accuracy"])
            out.append(
                f"- Most accurate candidate {name}: {_label(top)}{_ratio_text(top)}, {top['size_mb']:.2f} MB, "
                f"{top['latency_ms_p50']:.2f} ms, validation {pct(top['val_accuracy'])}, test "
                f"{pct_ci(top['accuracy'], top.get('accuracy_ci'))}."
            )
        else:
            out.append(f"- No candidate {name}.")
    return [*out, ""]


def _runtimes(run: dict) -> list[str]:
    """ONNX Runtime against OpenVINO on the same files of the pruned model: which is faster here, at what precision."""
    ov = run["bench"].get("openvino") or {}
    if not ov.get("available", False):
        why = ov.get("why") or "not measured by this bench"
        return [f"OpenVINO was skipped: {why}.", ""]
    out = []
    for precision in ("fp32", "int8-static"):
        a = _find(run, "pruned", "onnxruntime", precision)
        b = _find(run, "pruned", "openvino", precision)
        if not a or not b:
            continue
        speed = a["latency_ms_p50"] / b["latency_ms_p50"]
        faster = (
            f"OpenVINO is {speed:.2f}x faster" if speed >= 1 else f"ONNX Runtime is {1 / speed:.2f}x faster"
        )
        out.append(
            f"- Pruned model, {precision} file: ONNX Runtime {a['latency_ms_p50']:.2f} ms, OpenVINO "
            f"{b['latency_ms_p50']:.2f} ms (computing in {b.get('ran_precision') or precision}), timed in the "
            f"same interleaved rounds: {faster} on this CPU. Test accuracy {pct(a['accuracy'])} vs {pct(b['accuracy'])}: "
            f"{_verdict(_paired(run, a['key'], b['key']), 'ONNX Runtime', 'OpenVINO')}."
        )
    skipped = ov.get("skipped") or []
    if skipped:
        out.append(
            f"- OpenVINO {ov.get('version', '')} could not load {len(skipped)} file(s), e.g. "
            f"`{skipped[0]['file']}`: {skipped[0]['why']}."
        )
    return [*out, ""] if out else []


def _portability(run: dict) -> list[str]:
    """Which CPUs the quantized files are exact on, and where they were validated."""
    b = run["bench"]
    v = b.get("validated_on") or {}
    rows = [r for r in _rows(run) if r.get("candidate") and r["precision"].startswith("int8")]
    out = ["## Portability", ""]
    if not rows:
        return out + ["No int8 candidates in this run.", ""]
    portable = [r for r in rows if r.get("portable", True)]
    out += [
        f"Accuracies were measured on {v.get('cpu', '?')} ({', '.join(v.get('isa', [])) or 'no AVX2'}) with "
        f"ONNX Runtime {v.get('onnxruntime', '?')}; `deploy/deploy.json` and the model's metadata record it, and "
        "`slimvit verify deploy/` re-measures accuracy and latency on the machine it lands on.",
        "",
        "x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) multiply uint8 activations by int8 weights with "
        "VPMADDUBSW, which adds two products into a saturating 16-bit integer: with full 8-bit weights "
        "(255 x 127 x 2 = 64,770) sums clip, and a model validated on a VNNI CPU lost 8 points on an AVX2 one. "
        "slimvit quantizes weights to 7 bits (`quantize.reduce_range`, |w| <= 64, so 255 x 64 x 2 = 32,640 never "
        "clips); VNNI/AMX and ARM64 accumulate in 32 bits and are exact either way. The check reads the weights "
        "in each file, so it does not depend on the CPU that runs it.",
        "",
        f"{len(portable)} of {len(rows)} int8 candidates are safe on every x86 class and ARM64"
        + (
            "."
            if len(portable) == len(rows)
            else "; the others (marked VNNI only) are exact only with VNNI/AMX or on ARM64, and are never deployed."
        ),
        "",
    ]
    return out


def _deployment(run: dict) -> list[str]:
    b = run["bench"]
    dep = _deployed(run)
    check = b.get("predict_check")
    if dep is None:
        return ["## Deployed model", "", f"Nothing deployed: {b.get('deploy_error')}.", ""]
    out = [
        "## Deployed model",
        "",
        f"`deploy/model.onnx` = `{dep['file']}`. Why: {b['deployed_why']}.",
        "",
    ]
    if check:
        out += [
            f"`slimvit predict` (onnxruntime + numpy + Pillow, no torch) on the {check['n']} test image files: "
            f"{pct(check['accuracy'])} ({check['failed']} undecodable), "
            + (
                "the same as the benchmark measured."
                if check.get("identical", check["agrees"])
                else (
                    f"against the benchmark's {pct(dep['accuracy'])}: "
                    + ("no real difference" if check["agrees"] else "**a real difference**")
                    + (
                        f" (paired test on the same images: {check['paired']['a_only']} right only here, "
                        f"{check['paired']['b_only']} only in the benchmark, p={check['paired']['p']:.2g})."
                        if check.get("paired")
                        else "."
                    )
                )
            ),
            "",
        ]
    out += [*_thread_scaling(b), "![confusion matrix](plots/confusion.png)", ""]
    return out


def _thread_scaling(b: dict) -> list[str]:
    """Batch-1 p50 of the pruned FP32 ONNX model and the deployed one by intra-op thread count."""
    scaling = b.get("thread_scaling") or []
    counts = sorted({r["threads"] for r in scaling})

    def cid(r: dict) -> tuple:
        return (r.get("stage", "pruned"), r.get("runtime", "onnxruntime"), r["precision"])

    base = ("pruned", "onnxruntime", "fp32")
    by = {(cid(r), r["threads"]): r["latency_ms_p50"] for r in scaling}
    deployed = [cid(r) for r in scaling if r.get("default_choice", r.get("deployed"))]
    cols = list(dict.fromkeys([base, *deployed[:1]]))
    if len(counts) < 2 or any((c, t) not in by for c in cols for t in counts):
        return []

    def name(c: tuple) -> str:
        if c == base:
            return f"pruned FP32 ONNX{' (default choice)' if c in deployed else ''}"
        where = (" on OpenVINO" if c[1] == "openvino" else "") + (f", {c[0]}" if c[0] != "pruned" else "")
        return f"default choice ({c[2]}{where})"

    names = [name(c) for c in cols]
    ratio = len(cols) == 2
    out = [
        f"Batch-1 p50 by intra-op thread count of the pruned FP32 ONNX model and the model the default rule "
        f"(no budgets) deploys (the tables above use {b['threads']}; timed in a pass of "
        "their own, so the figures at that count can differ a little from the tables'):",
        "",
        "| threads | " + " | ".join(f"{n} ms" for n in names) + (" | choice / FP32 |" if ratio else " |"),
        "|---:|" + "---:|" * (len(cols) + ratio),
    ]
    for t in counts:
        cells = [f"{by[c, t]:.2f}" for c in cols] + (
            [f"{by[cols[1], t] / by[base, t]:.2f}x"] if ratio else []
        )
        out.append(f"| {t} | " + " | ".join(cells) + " |")
    lo, hi = counts[0], counts[-1]
    gains = {c: by[c, lo] / by[c, hi] for c in cols}

    def change(g: float) -> str:
        return f"{g:.2f}x faster" if g >= 1 else f"slower ({1 / g:.2f}x the time)"

    text = f"From {lo} to {hi} threads FP32 ONNX got {change(gains[base])}"
    if ratio:
        text += f" and the default choice {change(gains[cols[1]])}."
        if cols[1][2].startswith("int8") and gains[cols[1]] < gains[base] - 0.1:
            text += (
                " At batch 1 the int8 matrix products are too small to split well across cores, so the int8 "
                "model's lead over FP32 is largest on one core."
            )
    else:
        text += "."
    return [*out, "", text, ""]


def eval_paired(ev: dict, a: str, b: str) -> dict | None:
    """Exact McNemar test of two trained models' eval.json predictions on the same test images."""
    from slimvit.evaluate import mcnemar

    if a not in ev or b not in ev or "pred" not in ev[a] or "pred" not in ev[b]:
        return None
    y_a, y_b = np.array(ev[a]["labels"]), np.array(ev[b]["labels"])
    if y_a.shape != y_b.shape or (y_a != y_b).any():
        return None
    return mcnemar(np.array(ev[a]["pred"]) == y_a, np.array(ev[b]["pred"]) == y_b)


def conclusions(run: dict) -> list[str]:
    """Plain-language findings, each computed from the numbers above."""
    ref, dep = _ref(run), _deployed(run)
    out = []
    if dep:
        out.append(
            f"- **Deploy `deploy/model.onnx` ({_label(dep)}{_ratio_text(dep)}) on this CPU**: "
            f"{dep['latency_ms_p50']:.2f} ms per image "
            f"({ref['latency_ms_p50'] / dep['latency_ms_p50']:.1f}x faster than the reference eager student), "
            f"{dep['size_mb']:.2f} MB ({ref['size_mb'] / dep['size_mb']:.1f}x smaller), test accuracy "
            f"{pct_ci(dep['accuracy'], dep.get('accuracy_ci'))} (reference {pct_ci(ref['accuracy'], ref.get('accuracy_ci'))})."
        )
    else:
        out.append(f"- **Nothing was deployed**: {run['bench'].get('deploy_error')}.")
    out += _budget_sentences(run)
    if weak := weakest_class(run):
        out.append(weak)
    ev = run["eval"]
    if "student" in ev and "student_nokd" in ev:
        d = ev["student"]["accuracy"] - ev["student_nokd"]["accuracy"]
        t = eval_paired(ev, "student", "student_nokd")
        out.append(
            f"- Distillation: the distilled student scored {pct(ev['student']['accuracy'])} and the same student "
            f"trained without it {pct(ev['student_nokd']['accuracy'])} ({100 * d:+.2f} points) on the same test "
            f"images: {_verdict(t, 'the distilled student', 'the student without distillation')}."
        )
    else:
        out.append(
            "- Distillation against no distillation: not measured in this run (the ablation is opt-in: "
            "`--set distill.ablation=true`)."
        )
    p = run["prune"]
    if p:
        out.append(
            f"- Pruning {p['ratio']:g} of the channels removed {1 - p['params_ratio']:.0%} of the parameters and "
            f"{1 - p['macs_ratio']:.0%} of the MACs; eager FP32 latency fell to {p['latency_ratio']:.2f}x. "
            f"Test accuracy after fine-tuning: {pct(p['test_acc'])}."
        )
    onnx32 = _find(run, "pruned", "onnxruntime", "fp32")
    fp16 = _find(run, "pruned", "onnxruntime", "fp16")
    if onnx32 and fp16:
        slower = fp16["latency_ms_p50"] / onnx32["latency_ms_p50"]
        isa = run["bench"].get("isa") or []
        hw = "" if not isa or "avx512_fp16" in isa else " (this CPU has no AVX-512 FP16 arithmetic)"
        out.append(
            f"- FP16 on this CPU{hw}: the file is {fp16['size_mb'] / onnx32['size_mb']:.2f}x the FP32 one, "
            f"latency {fp16['latency_ms_p50']:.2f} ms = {slower:.2f}x FP32 ONNX, accuracy {pct(fp16['accuracy'])}. "
            + (
                "It saves disk, not time: keep FP16 for GPUs."
                if slower >= 1
                else "It is faster here as well."
            )
        )
    dyn = _find(run, "pruned", "onnxruntime", "int8-dynamic")
    static = _find(run, "pruned", "onnxruntime", "int8-static")
    if onnx32 and dyn and static:
        out.append(
            f"- INT8 on ONNX Runtime: dynamic {dyn['latency_ms_p50']:.2f} ms ({pct(dyn['accuracy'])}), static QDQ "
            f"{static['latency_ms_p50']:.2f} ms ({pct(static['accuracy'])}), FP32 {onnx32['latency_ms_p50']:.2f} ms "
            f"({pct(onnx32['accuracy'])})."
        )
    torch32 = _find(run, "pruned", "pytorch", "fp32")
    if onnx32 and torch32:
        r = torch32["latency_ms_p50"] / onnx32["latency_ms_p50"]
        out.append(
            f"- Runtime: the same pruned FP32 weights take {torch32['latency_ms_p50']:.2f} ms in eager PyTorch and "
            f"{onnx32['latency_ms_p50']:.2f} ms in ONNX Runtime at batch 1 "
            + (f"(ONNX Runtime {r:.1f}x faster)." if r > 1 else f"(eager PyTorch {1 / r:.1f}x faster).")
        )
    return ["## Conclusions", "", *out, ""]


def _bench_predictions(run: dict, key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(predictions, labels) of one bench row on the test images, as class indices."""
    preds = (run["bench"].get("predictions") or {}).get(key)
    labels = (run["bench"].get("test_images") or {}).get("labels")
    if preds is None or not labels:
        return None
    classes = run["bench"]["classes"]
    return np.array(preds), np.array([classes.index(c) for c in labels])


def class_models(run: dict) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, test predictions, labels) of the models a deployment rests on: teacher, student, pruned,
    the deployed model's own FP32 file, and the deployed model."""
    out = []
    for name in ("teacher", "student", "pruned"):
        ev = run["eval"].get(name)
        if ev and "pred" in ev:
            out.append((dict(TRAINED)[name], np.array(ev["pred"]), np.array(ev["labels"])))
    dep = _deployed(run)
    if dep:
        fp32 = _find(run, dep["stage"], "onnxruntime", "fp32")
        if fp32 and fp32["key"] != dep["key"] and (pl := _bench_predictions(run, fp32["key"])):
            out.append((f"{dep['stage']} FP32 ONNX (before quantization)", *pl))
        if pl := _bench_predictions(run, dep["key"]):
            out.append((f"deployed ({_label(dep)})", *pl))
    return out


def recalls(pred: np.ndarray, labels: np.ndarray, k: int) -> list[tuple[int, int]]:
    """(right, images) per class."""
    return [(int(((pred == c) & (labels == c)).sum()), int((labels == c).sum())) for c in range(k)]


def _balance_text(run: dict) -> str:
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


def _classes(run: dict) -> list[str]:
    """Per-class recall with intervals, the weakest class, and each step's balanced accuracy."""
    from slimvit.evaluate import balanced_accuracy, mcnemar, wilson

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
    steps = []
    for (na, pa, ya), (nb, pb, yb), ba, bb in zip(models_, models_[1:], bal, bal[1:], strict=False):
        if ya.shape != yb.shape or (ya != yb).any():
            continue
        t = mcnemar(pb == yb, pa == ya)
        steps.append(
            f"| {na} -> {nb} | {100 * ba:.2f} | {100 * bb:.2f} | {100 * (bb - ba):+.2f} | "
            f"{t['a_only']} / {t['b_only']} | {t['p']:.2g} |"
        )
    if steps:
        out += [
            "Each step against its input on the same test images (balanced accuracy; the paired test is exact "
            "McNemar on per-image correctness):",
            "",
            "| step | input % | output % | change (points) | images only the output / only the input got right | p |",
            "|---|---:|---:|---:|---:|---:|",
            *steps,
            "",
        ]
    return out


def weakest_class(run: dict) -> str | None:
    """One sentence naming the deployed model's weakest class (lowest test recall) and its interval."""
    from slimvit.evaluate import wilson

    dep = _deployed(run)
    pl = _bench_predictions(run, dep["key"]) if dep else None
    if pl is None:
        return None
    classes = run["bench"]["classes"]
    r = recalls(*pl, len(classes))
    c = min((i for i in range(len(classes)) if r[i][1]), key=lambda i: (r[i][0] / r[i][1], -r[i][1]))
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


def _timing(run: dict) -> list[str]:
    st = run["manifest"].get("stages", {})
    if not st:
        return []
    out = ["## Time per stage", "", "| stage | status | minutes |", "|---|---|---:|"]
    for name, e in st.items():
        status = (
            "writing this report"
            if name == "report" and e.get("status") == "running"
            else e.get("status", "-")
        )
        out.append(f"| {name} | {status} | {e.get('seconds', 0.0) / 60:.1f} |")
    decode = run["manifest"].get("decode_seconds", 0.0)
    if decode:
        out.append(f"| (decoding the images) | done | {decode / 60:.1f} |")
    total = sum(e.get("seconds", 0.0) for e in st.values()) + decode
    return out + [f"| total | | {total / 60:.1f} |", ""]


def render(run: dict, command: str | None = None) -> str:
    ref, dep = _ref(run), _deployed(run)
    against = (
        f"against the reference (unpruned distilled student, eager FP32 PyTorch) at {pct(ref['accuracy'])}, "
        f"{ref['latency_ms_p50']:.2f} ms, {ref['size_mb']:.2f} MB."
    )
    summary = (
        f"Deployed: **{_label(dep)}{_ratio_text(dep)}**, {pct_ci(dep['accuracy'], dep.get('accuracy_ci'))} test "
        f"accuracy, {dep['latency_ms_p50']:.2f} ms batch-1 latency, {dep['size_mb']:.2f} MB, {against}"
        if dep
        else f"**Nothing deployed**: {run['bench'].get('deploy_error')}."
    )
    head = ["# slimvit report", "", summary, ""]
    if command:
        head += [f"Produced by `{command}`.", ""]
    sections = [
        head,
        conclusions(run),
        _stage_table(run),
        _distillation(run),
        _pruning(run),
        _quantization(run),
        _candidates(run),
        _deployment(run),
        trust.section(run),
        trust.localisation_section(run),
        _classes(run),
        _mistakes(run),
        _portability(run),
        _environment(run),
        _dataset(run),
        _timing(run),
    ]
    return "\n".join(line for s in sections for line in s)


PLOTS = {
    "pareto.png": plot_pareto,
    "latency.png": plot_latency,
    "confusion.png": plot_confusion,
    "training.png": plot_training,
    "sweep.png": plot_sweep,
}


def run_report(cfg, run_dir: str | Path, data=None, command: str | None = None) -> dict:
    """Write REPORT.md and plots/*.png into the run folder."""
    import sys

    run_dir = Path(run_dir)
    run = load_run(run_dir, cfg)
    if command is None and Path(sys.argv[0]).name in ("slimvit", "__main__.py"):
        command = " ".join(["slimvit", *sys.argv[1:]])
    written = []
    if is_main_process():
        for name, fn in PLOTS.items():
            if name == "sweep.png" and not run["sweep"]:
                continue
            fn(run, run_dir / "plots" / name)
            written.append(name)
        (run_dir / "plots" / "mistakes.png").unlink(missing_ok=True)  # another deployment's
        if plot_mistakes(run, run_dir / "plots" / "mistakes.png"):
            written.append("mistakes.png")
        for name, fn in (
            ("reliability.png", trust.plot_reliability),
            ("risk_coverage.png", trust.plot_risk_coverage),
            ("heatmaps.png", trust.plot_heatmaps),
        ):
            plt = _plt()
            (run_dir / "plots" / name).unlink(missing_ok=True)
            if fn(run, run_dir / "plots" / name, plt):
                _save(plt.gcf(), run_dir / "plots" / name)
                written.append(name)
        atomic_write_text(run_dir / "REPORT.md", render(run, command))
    log.info("report: %s (%d plots)", run_dir / "REPORT.md", len(written))
    return {"plots": written}
