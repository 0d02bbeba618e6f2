"""The sections on what each compression step did: Stages (every artifact measured), Distillation, Pruning
(and its sweep), Quantization."""

from __future__ import annotations

from slimvit.labels import pct, pct_ci, sweep_table
from slimvit.report.load import TRAINED, bench_rows, ref_row


def stages(run: dict) -> list[str]:
    """Every bench row (a sweep model's only if deployed) against the reference: size, MACs, accuracy,
    latency."""
    ref = ref_row(run)
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
    for r in bench_rows(run):
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


def distillation(run: dict) -> list[str]:
    """The student with (and without) distillation beside the teacher, and how the teacher's logits were
    made."""
    out = ["## Distillation", ""]
    tr, ev = run["train"], run["eval"]
    if "student" not in ev:
        return out + ["No student was trained in this run.", ""]
    out += [
        "| student | distillation | epochs | val acc (kept epoch) | test accuracy | test macro-F1 | training time |",
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
    first, last = (tr.get("student", {}).get(k) or 0 for k in ("first_competing_epoch", "epochs"))
    if first > 1:
        which = "its last epoch" if first >= last else f"its best validation epoch of epochs {first}-{last}"
        out += [
            "",
            f"The student kept {which} (`train.select_from`): on few validation images the best of every "
            "epoch is partly luck.",
        ]
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


def pruning(run: dict) -> list[str]:
    """What pruning removed (widths, parameters, MACs, latency), what the fine-tune recovered, and the
    sweep."""
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
    first = ft.get("first_competing_epoch") or 0
    if cap and first >= cap:  # prune.select_from 1: no stop before the last epoch, which is kept
        return (
            f"Fine-tune: all {ran} epochs, the last kept (`prune.select_from`: on few validation images the best "
            "epoch is partly luck)."
        )
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
    text = f"Fine-tune: {ran} of at most {cap} epochs ({why})."
    if first > 1:
        text += f" Only epochs from {first} on competed for the kept weights (`prune.select_from`): it kept epoch {ft.get('best_epoch')}."
    return text


def _sweep_text(run: dict) -> str:
    """How the sweep's models were made, for the sentence above its table."""
    if run["config"] is None:
        return "The last column is the fine-tune epochs each ratio took."
    pc = run["config"].prune
    how = (
        "Each ratio is pruned from the model of the next lower ratio (the main pruned model stands for its own)"
        if pc.sweep_from == "previous"
        else "Each ratio is pruned from the distilled student"
    )
    from slimvit.selection import first_competing_epoch  # (torch: only for a run with a config)

    last_only = first_competing_epoch(pc.select_from, pc.sweep_epochs) >= pc.sweep_epochs
    if last_only:
        cap = f"all its epochs ({pc.sweep_epochs}, more on a small training split), the last kept"
    else:
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


def quantization(run: dict) -> list[str]:
    """Each quantized variant of the pruned model against its FP32 file: size, accuracy, agreement, ops."""
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
