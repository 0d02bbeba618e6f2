"""The sections on where and how the run was made: Environment (CPU, threads, libraries, timing settings),
Dataset and configuration, Time per stage."""

from __future__ import annotations

import time

import yaml


def environment(run: dict) -> list[str]:
    """Where and how the timings were taken: CPU, threads, libraries, warm-up, runs and rounds."""
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


def _attention(m) -> str:
    """The student's attention, when it is not timm's plain kind."""
    return "" if m.student_attention == "plain" else f" and `{m.student_attention}` attention"


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


def dataset(run: dict) -> list[str]:
    """The dataset and its split, and the resolved config (in full, folded away)."""
    d, c = run["data"], run["config"]
    out = ["## Dataset and configuration", ""]
    if d:
        counts = ", ".join(f"{k} {v}" for k, v in d["counts"].items())
        sp = d["split"]
        how = (
            "runs of consecutive files kept together, "
            if c is not None and c.data.split_by == "sequence"
            else ""
        )
        out += [
            f"- `{d['root']}` ({d['layout']} layout): {d['images']} images, {len(d['classes'])} classes ({counts})",
            f"- Split (stratified, seeded, {how}duplicates kept together): {sp['train']} train / {sp['val']} val / "
            f"{sp['test']} test. Model selection uses val only; every accuracy here is on the test split.",
        ]
    if c is not None:
        m, t, dist, p = c.model, c.train, c.distill, c.prune
        out += [
            f"- Preset `{c.preset}`: {c.data.img_size} px; teacher `{m.teacher}` "
            f"({_epochs_ran(run, 'teacher', t.teacher_epochs)}), student `{m.student}` with `{m.student_stem}` stem{_attention(m)} "
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
    """The precisions the trainings recorded running in (what `train.precision` resolved to)."""
    used = sorted({t["precision"] for t in run["train"].values() if "precision" in t})
    return f" (trained in {', '.join(used)})" if used else ""


def timing(run: dict) -> list[str]:
    """Minutes per stage from manifest.json (the report stage itself is still running)."""
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
