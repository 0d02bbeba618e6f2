"""The report's PNG plots (matplotlib, Agg), each drawn from the run dict `load.load_run` returns."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slimvit import trust
from slimvit.deploy import VAL_METRIC, is_teacher, val_score
from slimvit.io import atomic_path
from slimvit.labels import pct, row_label, shape_label
from slimvit.report.load import TRAINED, bench_rows, deployed_row, find_row, mistakes, ref_row
from slimvit.report.stats import front


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display), with the report's style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "font.size": 9, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def save(fig, path: Path) -> None:
    """Write a figure as PNG atomically, then free it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)


def _shape_key(r: dict) -> tuple:
    """Sort key of a pruned model: by width ratio, then fewer blocks later (all blocks first); the teacher first."""
    if is_teacher(r):
        return (-1.0, 0)
    return (r.get("ratio") or 0.0, -(r.get("depth") or 10**6))


def _y(r: dict) -> float:
    """A candidate's height in the Pareto plot: what the choice reads, or test accuracy without validation."""
    return val_score(r) if r.get("val_accuracy") is not None else r["accuracy"]


MARKERS = {"onnxruntime": "o", "openvino": "D"}


def plot_pareto(run: dict, path: Path) -> None:
    """Every deployment candidate: validation balanced accuracy vs batch-1 latency, the front joined, budgets
    drawn.

    Marker shape per runtime, marker area ~ file size, colour per pruning ratio; the deployed point is
    ringed red, the reference (eager student) is a grey square.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    rows = [r for r in bench_rows(run) if r.get("candidate")]
    ref = ref_row(run)
    if not rows:
        rows = [r for r in bench_rows(run) if r["runtime"] != "pytorch"]
    shapes = sorted({_shape_key(r) for r in rows})
    cmap = plt.get_cmap("viridis")
    colour = {k: cmap(shapes.index(k) / max(1, len(shapes) - 1)) for k in shapes}
    sizes = np.array([r["size_mb"] for r in rows] or [1.0])
    for r in rows:
        ax.scatter(
            r["latency_ms_p50"],
            100 * _y(r),
            s=30 + 300 * r["size_mb"] / max(sizes.max(), 1e-9),
            marker=MARKERS.get(r["runtime"], "o"),
            color=colour[_shape_key(r)],
            alpha=0.65,
            edgecolors="red" if r["deployed"] else "none",
            linewidths=2,
        )
    _pareto_front(ax, front(rows), ref)
    budget = run["bench"].get("budgets") or {}
    _pareto_budgets(ax, rows, budget)
    _pareto_legend(ax, rows, colour, budget)
    ax.set_xscale("log")
    ax.margins(x=0.1, y=0.2)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_xlabel(f"batch-1 latency p50, ms (log scale; {run['bench']['threads']} threads)")
    ax.set_ylabel(f"{VAL_METRIC} % (what the choice reads)")
    ax.set_title(
        "Deployment candidates: accuracy vs latency\nmarker area ~ file size; red ring: deployed", fontsize=9
    )
    save(fig, path)


def _pareto_front(ax, f: list[dict], ref: dict) -> None:
    """The front as a step line with each point named, and the reference as a grey square."""
    if f:
        ax.plot(
            [r["latency_ms_p50"] for r in f],
            [100 * val_score(r) for r in f],
            "k--",
            lw=1,
            drawstyle="steps-post",
            label="front",
        )
        for r in f:
            ax.annotate(
                f"{'teacher' if is_teacher(r) else shape_label(r) or 'r=0'} {r['precision']}\n{r['size_mb']:.1f} MB",
                (r["latency_ms_p50"], 100 * val_score(r)),
                fontsize=7,
                xytext=(6, -10),
                textcoords="offset points",
            )
    if ref.get("val_accuracy") is not None:
        ax.scatter(ref["latency_ms_p50"], 100 * val_score(ref), marker="s", color="0.5", s=60)
        ax.annotate(
            "reference (eager student)",
            (ref["latency_ms_p50"], 100 * val_score(ref)),
            fontsize=7,
            xytext=(-10, 8),
            textcoords="offset points",
            ha="right",
        )


def _pareto_budgets(ax, rows: list[dict], budget: dict) -> None:
    """The latency budget as a vertical line; a red cross on every candidate over the size budget."""
    if budget.get("budget_ms"):
        ax.axvline(
            budget["budget_ms"], color="tab:red", lw=1, label=f"latency budget {budget['budget_ms']:g} ms"
        )
    for r in rows:
        if budget.get("budget_mb") and r["size_mb"] > budget["budget_mb"]:
            ax.scatter(
                r["latency_ms_p50"],
                100 * _y(r),
                marker="x",
                color="tab:red",
                s=25,
                linewidths=1,
            )


def _pareto_legend(ax, rows: list[dict], colour: dict, budget: dict) -> None:
    """Legend entries (empty scatters): a colour per pruned shape, a marker per runtime, the size budget."""
    legend = {
        _shape_key(r): "teacher"
        if is_teacher(r)
        else f"ratio {r.get('ratio') or 0:g}"
        + (f", {r['depth']} blocks" if r.get("depth") is not None else "")
        for r in rows
    }
    for k, c in colour.items():
        ax.scatter([], [], color=c, label=legend[k])
    for runtime in sorted({r["runtime"] for r in rows}):
        name = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}.get(runtime, runtime)
        ax.scatter([], [], marker=MARKERS.get(runtime, "o"), color="0.4", label=name)
    if budget.get("budget_mb"):
        ax.scatter([], [], marker="x", color="tab:red", label=f"over the {budget['budget_mb']:g} MB budget")


def plot_latency(run: dict, path: Path) -> None:
    """p50 latency (bars) with p90 (whisker) and file size of every variant."""
    plt = pyplot()
    rows = bench_rows(run)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 0.35 * len(rows) + 1.5), sharey=True)
    y = np.arange(len(rows))
    p50 = np.array([r["latency_ms_p50"] for r in rows])
    p90 = np.array([r["latency_ms_p90"] for r in rows])
    colors = ["tab:red" if r["deployed"] else "tab:gray" if r["reference"] else "tab:blue" for r in rows]
    ax1.barh(y, p50, xerr=[np.zeros_like(p50), p90 - p50], color=colors, alpha=0.8)
    ax1.set_yticks(y, [row_label(r) + (" *" if r["deployed"] else "") for r in rows])
    ax1.invert_yaxis()
    ax1.set_xlabel("batch-1 latency ms (bar p50, whisker p90)")
    ax2.barh(y, [r["size_mb"] for r in rows], color=colors, alpha=0.8)
    ax2.set_xlabel("file size MB")
    fig.suptitle("Latency and size per artifact (* deployed; grey: reference)")
    save(fig, path)


def plot_confusion(run: dict, path: Path) -> None:
    """The deployed model's test confusion matrix (when nothing is deployed, the pruned FP32 ONNX model's)."""
    plt = pyplot()
    dep = deployed_row(run) or find_row(run, "pruned", "onnxruntime", "fp32") or ref_row(run)
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
    ax.set_title(f"{what} ({row_label(dep)}), test split: {pct(dep['accuracy'])}")
    save(fig, path)


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
    plt = pyplot()
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
    save(fig, path)
    return True


def plot_training(run: dict, path: Path) -> None:
    """Training loss and validation accuracy per epoch of every model trained."""
    plt = pyplot()
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
    save(fig, path)


def plot_sweep(run: dict, path: Path) -> None:
    """Test accuracy against MACs of every pruning-sweep model, width-pruned and block-removed apart."""
    plt = pyplot()
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
    save(fig, path)


PLOTS = {
    "pareto.png": plot_pareto,
    "latency.png": plot_latency,
    "confusion.png": plot_confusion,
    "training.png": plot_training,
    "sweep.png": plot_sweep,
}


def write_plots(run: dict, plots: Path) -> list[str]:
    """Draw every plot the run has data for into the folder `plots`; the names of those written."""
    written = []
    for name, fn in PLOTS.items():
        if name == "sweep.png" and not run["sweep"]:
            continue
        fn(run, plots / name)
        written.append(name)
    (plots / "mistakes.png").unlink(missing_ok=True)  # another deployment's
    if plot_mistakes(run, plots / "mistakes.png"):
        written.append("mistakes.png")
    for name, fn in (
        ("reliability.png", trust.plot_reliability),
        ("risk_coverage.png", trust.plot_risk_coverage),
        ("heatmaps.png", trust.plot_heatmaps),
    ):
        plt = pyplot()
        (plots / name).unlink(missing_ok=True)
        if fn(run, plots / name, plt):
            save(plt.gcf(), plots / name)
            written.append(name)
    return written
