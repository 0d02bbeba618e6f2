"""The `prune` stage and the pruning sweep: prune the distilled student (or the model of the next lower
ratio) with `slimvit.vit_pruning`, fine-tune it with distillation until validation recovers, evaluate, time,
and write prune.json / prune_sweep.json and prune_sweep.md.
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimvit import models
from slimvit.config import PruneConfig
from slimvit.distill import LogitsMemo, load_teacher
from slimvit.errors import ConfigError, ModelError
from slimvit.io import atomic_write_json, atomic_write_text, is_main_process, read_json
from slimvit.labels import sweep_table
from slimvit.layout import (
    EVAL,
    PRUNE,
    PRUNE_INIT,
    PRUNED,
    PRUNING,
    SPEC,
    STUDENT,
    SWEEP_SUMMARY,
    SWEEP_TABLE,
    TEACHER_LOGITS,
    TRAIN,
    sweep_dir,
)
from slimvit.recipe import scale_epochs
from slimvit.spec import ModelSpec, Widths, read_spec
from slimvit.timing import compare_latency, count_macs_params
from slimvit.vit import apply_widths, read_widths, vit_parts
from slimvit.vit_pruning import block_drop_order, check_ratio, criterion, drop_blocks, prune_model

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the stage


def _taylor_batches(data, spec: ModelSpec, n_batches: int, batch_size: int, seed: int):
    from slimvit.data import to_tensor_batch

    images, labels = data.arrays("train")
    order = np.random.default_rng(seed).permutation(len(labels))
    out = []
    for i in range(n_batches):
        idx = order[i * batch_size : (i + 1) * batch_size]
        if len(idx) == 0:
            break
        x = to_tensor_batch(images[idx], spec.mean, spec.std)
        out.append((x, torch.from_numpy(labels[idx])))
    return out


def _require_student(run_dir: Path) -> Path:
    path = Path(run_dir) / STUDENT
    if not (path / TRAIN).exists() or not (path / SPEC).exists():
        raise ModelError(f"no distilled student in '{path}'; run `slimvit distill` (or `slimvit run`) first")
    return path


def load_student(run_dir: Path, classes: list[str]) -> tuple[nn.Module, ModelSpec]:
    """The distilled student of a run, checked against the data's classes."""
    path = _require_student(run_dir)
    model, spec = models.load(path)
    if list(spec.classes) != list(classes):
        raise ModelError(
            f"the student in '{path}' predicts classes {list(spec.classes)}, the data has {list(classes)}; "
            "re-run `slimvit distill --force` on this dataset"
        )
    return model, spec


def _settings(pcfg: PruneConfig, ratio: float) -> dict:
    return {
        "ratio": ratio,
        "importance": pcfg.importance,
        "global_pruning": pcfg.global_pruning,
        "iterative_steps": pcfg.iterative_steps,
        "round_to": pcfg.round_to,
        "prune_heads": pcfg.prune_heads,
        "prune_embed": pcfg.prune_embed,
        "taylor_batches": pcfg.taylor_batches if criterion(pcfg.importance).needs_gradients else 0,
    }


def _prune_or_resume(
    cfg,
    student: nn.Module,
    spec: ModelSpec,
    data,
    out: Path,
    ratio: float,
    resume,
    source=(STUDENT, 0.0),
    depth: int | None = None,
) -> tuple:
    """The pruned, not yet fine-tuned model: made now (and saved in out/init/), or read back on resume.

    `source` is (folder, its ratio): the model pruned further, by the step that brings it to `ratio` of
    the student's widths. With `depth`, the source keeps its widths and loses whole blocks instead, down to
    `depth` of them (`vit_pruning.block_drop_order`).
    """
    init = out / PRUNE_INIT
    step = 1 - (1 - ratio) / (1 - source[1])
    if depth is not None:
        settings = {
            "ratio": ratio,
            "depth": depth,
            "source": source[0],
            "depth_batches": cfg.prune.taylor_batches,
        }
    else:
        settings = {
            **_settings(cfg.prune, ratio),
            **({"source": source[0], "step_ratio": step} if source[1] else {}),
        }
    if resume and (init / PRUNING).exists():
        info = read_json(init / PRUNING)
        if info.get("settings") != settings:
            raise ConfigError(
                f"'{init}' was pruned with {info.get('settings')}, not {settings}; "
                "run without --resume (or with --force) to prune again"
            )
        model, pspec = models.load(init)
        log.info("prune: resuming from the pruned model in %s", init)
        return model, pspec, info, True
    if resume is True:
        raise ModelError(f"nothing to resume in '{out}'; run `slimvit prune` without --resume")
    if is_main_process():
        shutil.rmtree(out, ignore_errors=True)  # a fresh start: no stale checkpoint of another shape
    torch.manual_seed(cfg.train.seed)  # the random criterion draws from torch's RNG
    batches = None
    if depth is not None or criterion(cfg.prune.importance).needs_gradients:
        batches = _taylor_batches(data, spec, cfg.prune.taylor_batches, cfg.train.batch_size, cfg.train.seed)
    t0 = time.perf_counter()
    if depth is not None:
        model, pspec, extra = _cut_depth(student, spec, batches, depth)
    else:
        model, pspec, extra = _prune_widths(student, spec, cfg.prune, step, batches)
    from slimvit.evaluate import evaluate_model

    val = evaluate_model(model, data, pspec, "val")
    info = {
        "settings": settings,
        "seconds": time.perf_counter() - t0,
        "val_acc_pruned": val["accuracy"],
        "val_bal_acc_pruned": val["balanced_accuracy"],
        **extra,
    }
    if is_main_process():
        models.save(model, pspec, init)
        atomic_write_json(init / PRUNING, info)
    return model, pspec, info, False


def _prune_widths(model: nn.Module, spec: ModelSpec, pcfg: PruneConfig, step: float, batches) -> tuple:
    """Width pruning: `model` pruned in place by `step` of its widths; (model, spec, extra record)."""
    widths = prune_model(model, torch.randn(1, *spec.input_size), pcfg, ratio=step, batches=batches)
    return model, spec.with_widths(widths), {}


def _cut_depth(model: nn.Module, spec: ModelSpec, batches, depth: int) -> tuple:
    """Depth cutting: `model`'s most dispensable blocks removed down to `depth`; (model, spec, extra record)."""
    removed = block_drop_order(model, [x for x, _ in batches], depth)
    widths = drop_blocks(model, removed)
    pspec = replace(spec.with_widths(widths), kwargs={**spec.kwargs, "depth": depth})
    # the model as `models.load` rebuilds it (timm spreads drop-path rates over the new depth), so that
    # a resumed fine-tune trains the same model as an uninterrupted one
    fresh = apply_widths(models.build(pspec), widths)
    fresh.load_state_dict(model.state_dict())
    return fresh, pspec, {"removed_blocks": removed}


def run_prune(
    cfg,
    run_dir: str | Path,
    data=None,
    resume: bool | str = False,
    ratio: float | None = None,
    out_name: str = PRUNED,
    epochs: int | None = None,
    source: str = STUDENT,
    depth: int | None = None,
    logits_memo: LogitsMemo | None = None,
    on_epoch=None,
) -> dict:
    """Prune the distilled student, fine-tune it with distillation, evaluate, and write prune.json.

    Args:
        resume: True continues an interrupted fine-tune (error if there is none), "auto" continues
            one if present, False starts over.
        ratio: pruning ratio; default `cfg.prune.ratio`.
        out_name: output folder inside `run_dir` (the sweep uses sweep/r<ratio>).
        epochs: fine-tuning epochs; default `cfg.prune.finetune_epochs`.
        source: folder of the model to prune: the student, or a pruned model of a lower ratio (iterative
            pruning: it is pruned by the step to `ratio` of the student's widths, then fine-tuned).
        depth: remove whole blocks of `source` (a pruned model of ratio `ratio`) down to this many, instead
            of pruning widths.
        logits_memo: passed to `train.fit`: a sweep's fine-tunes reuse one computation of the teacher's
            logits. The prune stage's own (out_name pruned/) keeps them in pruned/ for the sweep.
        on_epoch: passed to the fine-tune (`FitOptions.on_epoch`): called with the model after each epoch,
            for studies that read every epoch (scripts/finetune_levers.py).

    Returns:
        A compact summary (ratio, params/MACs/latency before and after, val/test accuracy).
    """
    from slimvit.data import load_data

    ratio = check_ratio(cfg.prune.ratio if ratio is None else ratio)
    epochs = cfg.prune.finetune_epochs if epochs is None else int(epochs)
    if epochs < 0:
        raise ConfigError(f"fine-tuning epochs={epochs} must be >= 0")
    run_dir = Path(run_dir)
    out = run_dir / out_name
    student_dir = run_dir / STUDENT
    if not (student_dir / TRAIN).exists():
        raise ModelError(
            f"no distilled student in '{student_dir}'; run `slimvit distill` (or `slimvit run`) first"
        )
    data = data or load_data(cfg.data, run_dir)
    if logits_memo is None and out_name == PRUNED:
        logits_memo = LogitsMemo(run_dir / PRUNED / TEACHER_LOGITS, write=True)
    epochs = scale_epochs(epochs, cfg.train, len(data.split["train"]), f"finetune r={ratio:g}")
    student, spec = load_student(run_dir, data.classes)
    widths_before = read_widths(student)
    macs_before, params_before = count_macs_params(student, spec.input_size)
    reference = copy.deepcopy(student)  # pruning works in place; keep the student for the latency comparison
    model, spec, src_ratio = _source_model(run_dir, source, ratio, depth, student, spec)
    model, pspec, info, resumed = _prune_or_resume(
        cfg, model, spec, data, out, ratio, resume, source=(source, src_ratio), depth=depth
    )
    macs_after, params_after = count_macs_params(model, pspec.input_size)
    sizes = {
        "params_before": params_before,
        "params_after": params_after,
        "params_ratio": params_after / params_before,
        "macs_before": macs_before,
        "macs_after": macs_after,
        "macs_ratio": macs_after / macs_before,
    }
    _log_sizes(ratio, sizes, pspec.widths)
    desc = f"finetune r={ratio:g}" + (f" depth {depth}" if depth else "")
    model, finetune, val = _finetune(
        cfg,
        run_dir,
        out,
        model,
        pspec,
        data,
        info=info,
        epochs=epochs,
        resumed=resumed,
        reference=reference,
        desc=desc,
        logits_memo=logits_memo,
        on_epoch=on_epoch,
    )
    result, test = _evaluate(cfg, model, pspec, data, reference, info, sizes, finetune, val)
    result.update(widths_before=widths_before.to_json(), widths_after=pspec.widths.to_json())
    if is_main_process():
        atomic_write_json(out / EVAL, test)
        atomic_write_json(out / PRUNE, result)
    _log_result(result, info, test)
    return _summary(result)


def _source_model(run_dir: Path, source: str, ratio: float, depth: int | None, student, spec) -> tuple:
    """The model to prune: the student, or the pruned model in `source` (iterative pruning, or the model
    a depth point is cut from); (model, spec, its ratio)."""
    model, src_ratio = student, 0.0
    if source != STUDENT:
        src_ratio = float(read_json(run_dir / source / PRUNE)["ratio"])
        model, spec = models.load(run_dir / source)
        if depth is None and src_ratio >= ratio:
            raise ConfigError(f"cannot prune '{source}' (ratio {src_ratio:g}) to the lower ratio {ratio:g}")
    if depth is not None and abs(src_ratio - ratio) > 1e-9:  # a depth point keeps its source's widths
        raise ConfigError(
            f"a depth-pruned model of ratio {ratio:g} is cut from a model of that ratio, not '{source}'"
        )
    return model, spec, src_ratio


def _log_sizes(ratio: float, sizes: dict, widths: Widths) -> None:
    log.info(
        "prune r=%.2f: params %.2fM -> %.2fM (%.2fx), MACs %.1fM -> %.1fM (%.2fx); %s",
        ratio,
        sizes["params_before"] / 1e6,
        sizes["params_after"] / 1e6,
        sizes["params_ratio"],
        sizes["macs_before"] / 1e6,
        sizes["macs_after"] / 1e6,
        sizes["macs_ratio"],
        widths.describe(),
    )


def _finetune(
    cfg,
    run_dir: Path,
    out: Path,
    model,
    pspec,
    data,
    *,
    info: dict,
    epochs: int,
    resumed: bool,
    reference,
    desc: str,
    logits_memo: LogitsMemo | None,
    on_epoch,
) -> tuple:
    """Fine-tune the pruned model with distillation (from `prune.teacher`), or save it as pruned with no
    epochs; (model, the fine-tune's record, (val acc, val balanced acc)). Which epoch is kept and whether
    it stops early: `prune.select_from` and `prune.recover` (the student's validation score back).

    info: the pruning record (`_prune_or_resume`); resumed: the fine-tune continues a checkpoint;
    reference: the unpruned student, whose function on the validation views the epochs are judged by."""
    from slimvit.train import FitOptions, fit

    teacher, distill_cfg = None, None
    if epochs > 0 and cfg.distill.loss != "none":
        teacher = load_teacher(run_dir, data.classes, input_spec=pspec, source=cfg.prune.teacher)
        distill_cfg = cfg.distill
    target = recovery_target(cfg, run_dir / STUDENT) if cfg.prune.recover else None
    if epochs > 0:
        opts = FitOptions(
            epochs=epochs,
            lr=cfg.prune.finetune_lr,
            distill=distill_cfg,
            resume="auto" if resumed else False,
            desc=desc,
            # the untrained cut model does not compete: on a small validation split it often ties the
            # student and, when kept, was deployed without any fine-tuning (docs/decisions.md, "A fine-tune always trains")
            select_initial=False,
            stop_at=target,
            min_epochs=math.ceil(cfg.prune.finetune_floor * epochs) if target is not None else 0,
            stop_agreement=cfg.prune.recover_agreement / 100 if target is not None else None,
            select_from=cfg.prune.select_from,
            on_epoch=on_epoch,
        )
        # judged by what does not saturate: the student's function on the validation views (`reference`)
        model, summary = fit(
            model,
            pspec,
            data,
            cfg.train,
            out,
            opts,
            teacher=teacher,
            reference=reference,
            logits_memo=logits_memo,
        )
        val = summary["best_val_acc"], summary["best_val_bal_acc"]
    else:
        if is_main_process():
            models.save(model, pspec, out)
        summary = {"epochs": 0, "epochs_run": 0}
        val = info["val_acc_pruned"], info.get("val_bal_acc_pruned", info["val_acc_pruned"])
    finetune = {
        **summary,
        "epochs": epochs,
        "lr": cfg.prune.finetune_lr,
        "distill": cfg.distill.loss,
        "distilled_from": cfg.prune.teacher if teacher is not None else None,
        "recovery_target": target,
    }
    return model, finetune, val


def _evaluate(cfg, model, pspec, data, reference, info, sizes, finetune, val) -> tuple[dict, dict]:
    """Test accuracy, and latency against the student: (the stage's record less its widths, the test metrics)."""
    from slimvit.evaluate import evaluate_model

    test = evaluate_model(model, data, pspec, "test")
    latency = compare_latency({"before": reference, "after": model}, pspec.input_size, cfg.bench)
    result = {
        **info["settings"],
        **sizes,
        "latency_ms_before": latency["before"],
        "latency_ms_after": latency["after"],
        "latency_ratio": latency["after"]["p50"] / latency["before"]["p50"],
        "prune_seconds": info["seconds"],
        "val_acc_pruned": info["val_acc_pruned"],
        "val_acc": val[0],
        "val_bal_acc": val[1],
        "test_acc": test["accuracy"],
        "test_bal_acc": test["balanced_accuracy"],
        "test_macro_f1": test["macro_f1"],
        "finetune": finetune,
        **({"removed_blocks": info["removed_blocks"]} if "removed_blocks" in info else {}),
    }
    return result, test


def _log_result(result: dict, info: dict, test: dict) -> None:
    log.info(
        "prune r=%.2f: latency %.2f -> %.2f ms (%.2fx), val acc %.4f (%.4f before fine-tuning), test acc %.4f",
        result["ratio"],
        result["latency_ms_before"]["p50"],
        result["latency_ms_after"]["p50"],
        result["latency_ratio"],
        result["val_acc"],
        info["val_acc_pruned"],
        test["accuracy"],
    )


def recovery_target(cfg, student_dir: Path) -> float:
    """The validation balanced accuracy a fine-tune stops at: the student's, less `prune.recover_tolerance`."""
    train = read_json(Path(student_dir) / TRAIN)
    student = train.get("best_val_bal_acc", train["best_val_acc"])  # older runs kept accuracy only
    return student - cfg.prune.recover_tolerance / 100


def _summary(result: dict) -> dict:
    keys = ("ratio", "params_before", "params_after", "macs_before", "macs_after", "latency_ratio")
    return {
        **{k: result[k] for k in keys},
        "depth": result.get("depth"),
        "latency_ms_before": result["latency_ms_before"]["p50"],
        "latency_ms_after": result["latency_ms_after"]["p50"],
        "val_acc": result["val_acc"],
        "test_acc": result["test_acc"],
        "finetune_epochs_run": result.get("finetune", {}).get("epochs_run"),
    }


# --------------------------------------------------------------------------- the sweep


def run_sweep(cfg, run_dir: str | Path, ratios: Sequence[float], data=None) -> list[dict]:
    """Prune + fine-tune (`prune.sweep_epochs`) at each ratio; write prune_sweep.json and .md.

    With `prune.sweep_from: previous` (the default) the ratios are pruned iteratively: each from the model
    of the next lower ratio (the main pruned model stands for its own ratio), so a high ratio starts from
    an already fine-tuned, partly pruned model. `student` prunes every ratio from the student.
    Each depth of `prune.depths` adds a candidate per ratio: that ratio's model with whole blocks removed
    (`sweep/r<ratio>-d<depth>`).
    Points already done (prune.json and eval.json present) are read back, not redone. prune_sweep.json lists
    this sweep's points; export takes its candidates from it, so a folder of an earlier sweep (another
    `prune.sweep`) stays on disk for reuse but is no candidate.
    """
    from slimvit.data import load_data

    ratios = [check_ratio(r) for r in ratios]
    if not ratios:
        raise ConfigError("no ratios to sweep; pass --sweep 0.1,0.2,0.3,0.5 or set prune.sweep")
    run_dir = Path(run_dir)
    # before any fine-tune: a depth the student cannot be cut to fails now, not in an hour
    if cfg.prune.depths:
        blocks = len(vit_parts(load_student(run_dir, read_spec(run_dir / STUDENT).classes)[0]).blocks)
        if max(cfg.prune.depths) >= blocks:
            raise ConfigError(
                f"prune.depths={list(cfg.prune.depths)}: the student has {blocks} blocks; each depth must be fewer"
            )
    rows = []
    chain = cfg.prune.sweep_from == "previous"
    main = run_dir / PRUNED / PRUNE
    # the prune stage's logits, where it distilled from the same model on the same images
    memo = LogitsMemo(run_dir / PRUNED / TEACHER_LOGITS)
    source = STUDENT
    for r in sorted(set(ratios)):
        points = [(r, None, source)]
        if chain and abs(r - cfg.prune.ratio) < 1e-9 and main.exists():
            log.info("sweep r=%g: the main pruned model (pruned/) is this point", r)
            rows.append({**_summary(read_json(main)), "model": PRUNED})
            points, width_model = [], PRUNED
        else:
            width_model = sweep_dir(r)
        # depth candidates: the ratio's own model (or the main pruned one) loses whole blocks
        points += [(r, d, width_model) for d in sorted(set(cfg.prune.depths), reverse=True)]
        for ratio, depth, src in points:
            name = sweep_dir(ratio, depth)
            out = run_dir / name
            if (out / PRUNE).exists() and (out / EVAL).exists():
                log.info("sweep %s: done, skipped", name)
                rows.append({**_summary(read_json(out / PRUNE)), "model": name})
                continue
            data = data or load_data(cfg.data, run_dir)
            summary = run_prune(
                cfg,
                run_dir,
                data,
                resume="auto",
                ratio=ratio,
                out_name=name,
                epochs=cfg.prune.sweep_epochs,
                source=src,
                depth=depth,
                logits_memo=memo,
            )
            rows.append({**summary, "model": name})
        if chain:
            source = width_model
    baseline = _baseline(run_dir, rows)
    if is_main_process():
        atomic_write_json(run_dir / SWEEP_SUMMARY, {"baseline": baseline, "points": rows})
        atomic_write_text(run_dir / SWEEP_TABLE, sweep_table(baseline, rows))
    return rows


def _baseline(run_dir: Path, rows: list[dict]) -> dict:
    """The unpruned student's row: sizes and latency from the sweep's own before-measurements."""
    student = run_dir / STUDENT
    train = read_json(student / TRAIN) if (student / TRAIN).exists() else {}
    ev = read_json(student / EVAL) if (student / EVAL).exists() else {}
    first = rows[0]
    return {
        "ratio": 0.0,
        "params": first["params_before"],
        "macs": first["macs_before"],
        "latency_ms": float(np.median([r["latency_ms_before"] for r in rows])),
        "val_acc": train.get("best_val_acc"),
        "test_acc": ev.get("accuracy"),
    }
