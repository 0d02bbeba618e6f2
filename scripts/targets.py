"""Our own acceptance targets (the project's issues), checked against a finished run folder.

    .venv/bin/python scripts/targets.py runs/neu-det

These thresholds were fixed for NEU-DET by the project's issues; they describe what the project promised,
not a user's models, so REPORT.md does not print them. Prints one table row per target (measured value,
met or not) and the older reference project's published figures beside this run's matching rows. Exit 0
when every target with numbers in the run is met, 1 otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

from slimvit import labels, report

# The older reference project's published figures (its README and REPORT.md, ViT version), the
# rows this report is read against. Latency: its own CPU, batch size not stated.
OLD_PROJECT = [
    {"stage": "student (ViT-Ti, distilled)", "size_mb": 22.0, "accuracy": 0.40, "latency_ms": 15.0},
    {"stage": "pruned r=0.2 (FP32)", "size_mb": 17.6, "accuracy": 0.45, "latency_ms": 61.0},
    {"stage": "pruned, dynamic INT8", "size_mb": 5.18, "accuracy": 0.4389, "latency_ms": 64.0},
    {"stage": "pruned, static INT8", "size_mb": 5.04, "accuracy": 0.075, "latency_ms": 40.0},
    {"stage": "pruned, FP16", "size_mb": 8.87, "accuracy": 0.45, "latency_ms": 510.0},
]


def _minutes(run: dict, *stages: str) -> float | None:
    st = run["manifest"].get("stages", {})
    if not all(s in st and "seconds" in st[s] for s in stages):
        return None
    return sum(st[s]["seconds"] for s in stages) / 60


def targets(run: dict) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for every target of the issues; met None when the run lacks the numbers."""
    out: list[tuple[str, str, bool | None]] = []
    ev, p, q = run["eval"], run["prune"], run["quantize"]
    ref = report.ref_row(run)
    dep = report.deployed_row(run)
    if "student" in ev:
        a = ev["student"]["accuracy"]
        out.append(("distilled student test accuracy >= 98.5%", labels.pct(a), a >= 0.985))
        if "student_nokd" in ev:
            b = ev["student_nokd"]["accuracy"]
            t = report.eval_paired(ev, "student", "student_nokd")
            out.append(
                (
                    "distillation helps (distilled beats the same student without, exact McNemar p < 0.05)",
                    f"{labels.pct(a)} vs {labels.pct(b)}"
                    + (f" ({t['a_only']} vs {t['b_only']} images, p={t['p']:.2g})" if t else ""),
                    None if t is None else t["p"] < 0.05 and t["a_only"] > t["b_only"],
                )
            )
    m = _minutes(run, "teacher", "distill")
    out.append(
        (
            "teacher + distilled student training <= 30 min",
            "-" if m is None else f"{m:.1f} min",
            None if m is None else m <= 30,
        )
    )
    if p:
        out += [
            ("pruned params >= 18% lower", f"{1 - p['params_ratio']:.1%} lower", p["params_ratio"] <= 0.82),
            ("pruned MACs >= 18% lower", f"{1 - p['macs_ratio']:.1%} lower", p["macs_ratio"] <= 0.82),
            (
                "pruned FP32 eager latency <= 0.85x student",
                f"{p['latency_ratio']:.2f}x",
                p["latency_ratio"] <= 0.85,
            ),
        ]
        if "student" in ev:
            d = p["test_acc"] - ev["student"]["accuracy"]
            out.append(
                ("pruned test accuracy within 0.5 point of student", f"{100 * d:+.2f} points", d >= -0.005)
            )
        swept = sorted({pt["ratio"] for pt in (run["sweep"] or {}).get("points", [])})
        out.append(
            (
                "pruning sweep 0.1/0.2/0.3/0.5 exists",
                ", ".join(f"{r:g}" for r in swept) or "no sweep",
                {0.1, 0.2, 0.3, 0.5} <= {round(r, 6) for r in swept},
            )
        )
    onnx32 = report.find_row(run, "pruned", "onnxruntime", "fp32")
    static = report.find_row(run, "pruned", "onnxruntime", "int8-static")
    fp16 = report.find_row(run, "pruned", "onnxruntime", "fp16")
    if q and onnx32 and dep:
        if static:
            r = static["size_mb"] / onnx32["size_mb"]
            out.append(("INT8 static file <= 0.3x pruned FP32 file", f"{r:.2f}x", r <= 0.3))
            r = static["latency_ms_p50"] / onnx32["latency_ms_p50"]
            out.append(("INT8 static p50 <= 0.5x pruned FP32 ONNX", f"{r:.2f}x", r <= 0.5))
        r = dep["latency_ms_p50"] / onnx32["latency_ms_p50"]
        out.append((f"deployed ({dep['precision']}) p50 <= 0.5x pruned FP32 ONNX", f"{r:.2f}x", r <= 0.5))
        r = dep["latency_ms_p50"] / ref["latency_ms_p50"]
        out.append((f"deployed ({dep['precision']}) p50 <= 0.25x reference row", f"{r:.2f}x", r <= 0.25))
        r = dep["size_mb"] / onnx32["size_mb"]
        out.append((f"deployed ({dep['precision']}) file <= 0.3x pruned FP32 file", f"{r:.2f}x", r <= 0.3))
        own = (
            report.find_row(run, dep["stage"], "onnxruntime", "fp32") or onnx32
        )  # the FP32 model it was built from
        d = dep["accuracy"] - own["accuracy"]
        out.append(
            (
                f"deployed accuracy within 0.5 point of its FP32 model ({dep['stage']})",
                f"{100 * d:+.2f} points",
                d >= -0.005,
            )
        )
        if fp16:
            d = fp16["accuracy"] - onnx32["accuracy"]
            out.append(
                ("FP16 accuracy within 0.1 point of pruned FP32", f"{100 * d:+.2f} points", abs(d) <= 0.001)
            )
    check = run["bench"].get("predict_check")
    if check and dep:
        out.append(
            (
                "`slimvit predict` agrees with bench accuracy (paired test on the same images)",
                f"{labels.pct(check['accuracy'])} vs {labels.pct(dep['accuracy'])}",
                check["agrees"],
            )
        )
    out += _candidate_targets(run)
    # Every stage's own time plus image decoding (the report's own few seconds are not in yet while
    # it is being written).
    m = run["manifest"]
    total = (
        sum(s.get("seconds", 0.0) for s in m.get("stages", {}).values()) + m.get("decode_seconds", 0.0)
        or None
    )
    out.append(
        (
            "whole pipeline <= 60 min (stage times + image decoding)",
            "-" if total is None else f"{total / 60:.1f} min",
            None if total is None else total <= 3600,
        )
    )
    return out


def _candidate_targets(run: dict) -> list[tuple[str, str, bool | None]]:
    """Issue 11 and 15's targets: small and fast candidates that stay accurate, both runtimes, int8 as FP32."""
    rows = [r for r in report.bench_rows(run) if r.get("candidate")]
    if not rows:
        return []
    ref = report.ref_row(run)
    out = []
    for name, group in (
        ("a candidate <= 2.5 MB with test accuracy >= 98.5%", [r for r in rows if r["size_mb"] <= 2.5]),
        (
            "a candidate <= 1/8 of the reference's batch-1 latency with test accuracy >= 98.5%",
            [r for r in rows if r["latency_ms_p50"] <= ref["latency_ms_p50"] / 8],
        ),
    ):
        best = max(group, key=lambda r: r["accuracy"], default=None)
        out.append(
            (
                name,
                "none"
                if best is None
                else f"{labels.row_label(best)}{labels.ratio_text(best)}: {best['size_mb']:.2f} MB, "
                f"{best['latency_ms_p50']:.2f} ms, {labels.pct(best['accuracy'])}",
                best is not None and best["accuracy"] >= 0.985,
            )
        )
    runtimes = {r["runtime"] for r in rows if r["stage"] == "pruned"}
    out.append(
        (
            "ONNX Runtime and OpenVINO rows for the pruned model in the same bench",
            ", ".join(sorted(runtimes)),
            {"onnxruntime", "openvino"} <= runtimes,
        )
    )
    drops = []
    for r in rows:
        base = report.find_row(run, r["stage"], "onnxruntime", "fp32")
        if r["precision"].startswith("int8") and base:
            drops.append((base["accuracy"] - r["accuracy"], r))
    if drops:
        worst, r = max(drops, key=lambda d: d[0])
        out.append(
            (
                "every int8 variant within 0.5 point of its FP32 model's test accuracy (on this CPU)",
                f"worst {100 * -worst:+.2f} points ({labels.row_label(r)}{labels.ratio_text(r)})",
                worst <= 0.005 + 1e-9,
            )
        )
    return out


def _targets_section(run: dict) -> list[str]:
    out = ["## Targets", "", "| target | measured | met |", "|---|---:|:---:|"]
    rows = targets(run)
    for name, measured, met in rows:
        out.append(f"| {name} | {measured} | {'-' if met is None else 'yes' if met else '**no**'} |")
    missed = [n for n, _, met in rows if met is False]
    out += [
        "",
        f"Not met: {'; '.join(missed)}." if missed else "Every target with numbers in this run is met.",
        "",
    ]
    return out


def old_project_table(run: dict) -> list[str]:
    """The older project's published rows (its README and report; its own CPU, batch size not stated) next
    to the matching rows of this run."""
    ours = [
        report.ref_row(run),
        report.find_row(run, "pruned", "pytorch", "fp32"),
        report.find_row(run, "pruned", "onnxruntime", "int8-dynamic"),
        report.find_row(run, "pruned", "onnxruntime", "int8-static"),
        report.find_row(run, "pruned", "onnxruntime", "fp16"),
    ]
    out = [
        "| stage | old: size MB | old: accuracy | old: latency ms | slimvit: size MB | slimvit: accuracy | slimvit: p50 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for old, new in zip(OLD_PROJECT, ours, strict=True):
        if new is not None:
            out.append(
                f"| {old['stage']} | {old['size_mb']:.2f} | {labels.pct(old['accuracy'], 1)} | {old['latency_ms']:.0f} | "
                f"{new['size_mb']:.2f} | {labels.pct(new['accuracy'])} | {new['latency_ms_p50']:.2f} |"
            )
    return out


def main() -> int:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    run = report.load_run(Path(sys.argv[1]))
    lines = (
        _targets_section(run)
        + ["### Side by side with the older reference project", ""]
        + old_project_table(run)
    )
    print("\n".join(lines))
    return 1 if any(met is False for _, _, met in targets(run)) else 0


if __name__ == "__main__":
    sys.exit(main())
