"""The sections on choosing and shipping a model: Deployment candidates (the front, runtimes, what a budget
cost), Deployed model (why, the predict check, threads), Portability (which CPUs the int8 files are exact on).

Every choice named here reads what `slimvit.deploy.choose` reads: `deploy.val_score`."""

from __future__ import annotations

from slimvit.deploy import VAL_METRIC, is_student, is_teacher, val_score
from slimvit.labels import pct, pct_ci, ratio_text, row_label, shape_label
from slimvit.report.load import bench_rows, deployed_row, find_row, ref_row
from slimvit.report.stats import front, paired, verdict


def budget_sentences(run: dict) -> list[str]:
    """One sentence per budget: what it cost in validation balanced accuracy against the best candidate
    without it."""
    b = run["bench"]
    budget = b.get("budgets") or {}
    rows = [r for r in bench_rows(run) if r.get("candidate") and r.get("portable", True) is not False]
    if not rows:
        return []
    best = max(rows, key=val_score)
    out = []
    for key, unit, field in (("budget_ms", "ms", "latency_ms_p50"), ("budget_mb", "MB", "size_mb")):
        limit = budget.get(key)
        if limit is None:
            continue
        fit = [r for r in rows if r[field] <= limit]
        if not fit:
            out.append(f"- The {limit:g} {unit} budget: no candidate fits it.")
            continue
        top = max(fit, key=val_score)
        cost = 100 * (val_score(best) - val_score(top))
        out.append(
            f"- The {limit:g} {unit} budget cost {cost:.2f} points of {VAL_METRIC}: the most accurate candidate "
            f"within it ({row_label(top)}{ratio_text(top)}, {top[field]:.2f} {unit}) scores {pct(val_score(top))} "
            f"against {pct(val_score(best))} for the most accurate of all ({row_label(best)}{ratio_text(best)})."
        )
    return out


def candidates(run: dict) -> list[str]:
    """The deployment candidates: the front table, the plot, and each precision's paired test against FP32."""
    rows = [r for r in bench_rows(run) if r.get("candidate")]
    out = ["## Deployment candidates", ""]
    if not rows:
        return out + ["No deployment candidates were benchmarked in this run.", ""]
    n_val = max(r.get("val_n") or 0 for r in rows)
    f = front(rows)
    out += [
        f"Every ONNX variant of the pruned model and of every pruning-sweep model, and the teacher's own file "
        f"({len(rows)} candidates), was exported, quantized and timed in the same bench run. The choice reads **{VAL_METRIC}** only "
        f"({n_val} images: one image is {100 / max(1, n_val):.2f} points on a balanced split); test accuracy is "
        f"reported, never used to choose. The front: candidates that no other candidate beats on both {VAL_METRIC} "
        "and batch-1 latency.",
        "",
        f"| ratio (dN: N blocks kept) | runtime | precision | size MB | p50 ms | {VAL_METRIC} | "
        "test accuracy (95% CI) | x FP32 of same model: test | portable |",
        "|---:|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in f:
        base = find_row(run, r["stage"], r["runtime"], "fp32")
        vs = (
            "-"
            if base is None or base is r
            else verdict(paired(run, r["key"], base["key"]), r["precision"], "fp32").split(" (")[0]
        )
        tag = " **(deployed)**" if r["deployed"] else ""
        shape = "teacher" if is_teacher(r) else shape_label(r).removeprefix("r=") or "0"
        out.append(
            f"| {shape}{tag} | {r['runtime']} | {r['precision']} | {r['size_mb']:.2f} | "
            f"{r['latency_ms_p50']:.2f} | {pct(val_score(r))} | "
            f"{pct_ci(r['accuracy'], r.get('accuracy_ci'))} | {vs} | "
            f"{'yes' if r.get('portable', True) else 'VNNI only'} |"
        )
    out += ["", "![deployment candidates](plots/pareto.png)", ""]
    if (dep := deployed_row(run)) is not None and is_student(dep):  # deploy's fallback: in no table above
        out.append(
            f"- **Deployed: none of these** but the student's own file, uncompressed ({row_label(dep)}): "
            f"{dep['size_mb']:.2f} MB, {dep['latency_ms_p50']:.2f} ms, {VAL_METRIC} {pct(val_score(dep))}, test "
            f"{pct_ci(dep['accuracy'], dep.get('accuracy_ci'))}; no compression fitted (Deployed model says why)."
        )
    out += [*_runtimes(run), *_teacher(run, rows)]
    ref = ref_row(run)
    small = [r for r in rows if r["size_mb"] <= 2.5]
    fast = [r for r in rows if r["latency_ms_p50"] <= ref["latency_ms_p50"] / 8]
    for name, group in (
        ("<= 2.5 MB", small),
        (f"<= 1/8 of the reference's {ref['latency_ms_p50']:.2f} ms", fast),
    ):
        if group:
            top = max(group, key=val_score)
            out.append(
                f"- Most accurate candidate {name}: {row_label(top)}{ratio_text(top)}, {top['size_mb']:.2f} MB, "
                f"{top['latency_ms_p50']:.2f} ms, {VAL_METRIC} {pct(val_score(top))}, test "
                f"{pct_ci(top['accuracy'], top.get('accuracy_ci'))}."
            )
        else:
            out.append(f"- No candidate {name}.")
    return [*out, ""]


def _teacher(run: dict, rows: list[dict]) -> list[str]:
    """What the deployed ViT buys over deploying the run's own teacher: speed, size, and accuracy on the
    same test images."""
    dep = deployed_row(run)
    mine = [r for r in rows if is_teacher(r)]
    if dep is None or not mine or is_teacher(dep):
        return []
    t = min(mine, key=lambda r: r["latency_ms_p50"])
    name = run["config"].model.teacher if run.get("config") else "teacher"
    return [
        f"- Against deploying the teacher (`{name}`, fastest as {row_label(t)}: {t['latency_ms_p50']:.2f} ms, "
        f"{t['size_mb']:.2f} MB, {VAL_METRIC} {pct(val_score(t))}): the deployed model is "
        f"{t['latency_ms_p50'] / dep['latency_ms_p50']:.2f}x faster and {t['size_mb'] / dep['size_mb']:.1f}x "
        f"smaller; test {pct(dep['accuracy'])} vs {pct(t['accuracy'])}: "
        f"{verdict(paired(run, dep['key'], t['key']), 'the deployed model', 'the teacher')}.",
        "",
    ]


def _runtimes(run: dict) -> list[str]:
    """ONNX Runtime against OpenVINO on the same files of the pruned model: which is faster here, at what precision."""
    ov = run["bench"].get("openvino") or {}
    if not ov.get("available", False):
        why = ov.get("why") or "not measured by this bench"
        return [f"OpenVINO was skipped: {why}.", ""]
    out = []
    for precision in ("fp32", "int8-static"):
        a = find_row(run, "pruned", "onnxruntime", precision)
        b = find_row(run, "pruned", "openvino", precision)
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
            f"{verdict(paired(run, a['key'], b['key']), 'ONNX Runtime', 'OpenVINO')}."
        )
    skipped = ov.get("skipped") or []
    if skipped:
        out.append(
            f"- OpenVINO {ov.get('version', '')} could not load {len(skipped)} file(s), e.g. "
            f"`{skipped[0]['file']}`: {skipped[0]['why']}."
        )
    return [*out, ""] if out else []


def portability(run: dict) -> list[str]:
    """Which CPUs the quantized files are exact on, and where they were validated."""
    b = run["bench"]
    v = b.get("validated_on") or {}
    rows = [r for r in bench_rows(run) if r.get("candidate") and r["precision"].startswith("int8")]
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


def deployed_model(run: dict) -> list[str]:
    """The deployed file and why deploy chose it, the torch-free predict check, and thread scaling."""
    b = run["bench"]
    dep = deployed_row(run)
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
