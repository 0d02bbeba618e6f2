"""The one training loop: teacher, student, no-distillation ablation and post-pruning fine-tuning.

Hugging Face Accelerate handles the device and the processes, so the same code runs on CPU, one
GPU, or several (``accelerate launch`` / ``torchrun``). Autocast (bf16/fp16) is applied here
rather than through Accelerate's global state, so stages with different settings can run in one
process.

Each epoch ends with a checkpoint (`slimvit.checkpoint`: one file, renamed into place). Every RNG an
epoch draws from (torch's for the data order, augmentations and dropout, numpy's for timm's
mixup/cutmix, Python's) is seeded at the start of the epoch from (seed, epoch, rank), so the epoch
stored in the checkpoint determines them: a resumed run trains exactly as an uninterrupted one.

What the training will do (precision, schedule, image sizes, balance) is decided in `slimvit.recipe`,
which epoch it keeps and when it stops in `slimvit.selection`, the teacher's side in `slimvit.distill`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimvit import models, vit
from slimvit.checkpoint import save_epoch, start_or_resume
from slimvit.config import DistillConfig, TrainConfig
from slimvit.data import Data, EvalDataset, TrainDataset
from slimvit.distill import LogitsMemo, cache_teacher_logits, load_teacher, logit_offset, make_loss
from slimvit.errors import ConfigError, ModelError
from slimvit.io import atomic_write_json, is_main_process
from slimvit.layout import ABLATION, EVAL, STUDENT, TEACHER, TRAIN, WEIGHTS
from slimvit.recipe import (
    autocast_context,
    epoch_size,
    explicit_attention_on,
    full_size_epochs,
    lr_lambda,
    make_accelerator,
    make_optimizer,
    resolve_balance,
    resolve_precision,
    role_spec,
    sample_weights,
    scale_epochs,
)
from slimvit.selection import (
    Fidelity,
    best_record,
    first_competing_epoch,
    improves,
    stop_reason,
    validate,
)
from slimvit.spec import ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitOptions:
    """How `fit` trains: its length, learning rate, distillation, and when it stops."""

    epochs: int
    """Epochs to train (with `stop_at`, a cap)."""
    lr: float
    """Peak learning rate of the warm-up + cosine schedule."""
    distill: DistillConfig | None = None
    """The distillation loss; None trains on the labels alone. A loss other than `none` needs a teacher."""
    resume: bool | str = False
    """True continues from out_dir's checkpoint (error if absent), "auto" continues if present."""
    desc: str = "train"
    """The training's name in the log."""
    select_initial: bool = False
    """The starting weights compete as "epoch 0" for the best checkpoint (training cannot end worse on
    validation than where it started). The pruning fine-tunes do not use it: on a small validation split
    an untrained cut model often ties the student and would be kept without any fine-tuning."""
    resize: bool = False
    """Train the early epochs on smaller images as `train.resize_from` says (the teacher and the student;
    fine-tunes start from a trained model and stay at full size)."""
    stop_at: float | None = None
    """Stop after the first trained epoch that becomes the best and whose validation balanced accuracy
    reaches this (a pruned model has recovered). `train.patience` also stops training when the best epoch
    is that many epochs old."""
    min_epochs: int = 0
    """`stop_at` does not stop training before this many epochs (a floor of optimizer steps: on a small
    split one epoch is a couple of steps)."""
    stop_agreement: float | None = None
    """With `stop_at`, "recovered" also needs this agreement with the reference model on the validation views."""
    select_from: float = 0.0
    """Only the epochs after this fraction of `epochs` compete for the kept weights (`train.select_from`;
    1 keeps the last epoch). `train.patience` counts from the first of them."""
    on_epoch: Callable[[nn.Module, int], None] | None = None
    """Called after each epoch's validation, on the main process, with the model validated (in eval mode;
    the EMA where there is one) and the epoch (1-based): for studies that read every epoch
    (scripts/epoch_rules.py). It must not change the model."""

    @property
    def loss(self) -> str:
        return "none" if self.distill is None else self.distill.loss


@dataclass
class _Run:
    """One `fit` in progress: what `_setup` builds, and the progress each epoch updates."""

    opts: FitOptions
    tcfg: TrainConfig
    spec: ModelSpec
    data: Data
    out_dir: Path
    acc: Any  # accelerate.Accelerator
    model: nn.Module  # prepared by the accelerator (wrapped under several processes)
    optimizer: Any
    scheduler: Any
    ema: Any  # timm ModelEmaV3 or None
    train_ds: TrainDataset
    val_ds: EvalDataset
    draw_weights: torch.Tensor | None  # per-sample weights of the class-balanced sampler
    balance: str
    precision: str
    mem_format: torch.memory_format
    fidelity: Fidelity | None
    start_epoch: int
    done: int  # epochs behind it
    best: dict  # selection.best_record of the best epoch so far
    elapsed: float  # training seconds, resumed runs' included
    stopped: str | None
    best_weights: dict | None
    teacher: nn.Module | None = None  # only when distilling
    cached: torch.Tensor | None = None  # the teacher's logits of every training image
    cache_seconds: float = 0.0
    loss_fn: Any = None
    mixup: Any = None


def fit(
    model: nn.Module,
    spec: ModelSpec,
    data: Data,
    tcfg: TrainConfig,
    out_dir: str | Path,
    opts: FitOptions,
    *,
    teacher: nn.Module | None = None,
    reference: nn.Module | None = None,
    logits_memo: LogitsMemo | None = None,
) -> tuple[nn.Module, dict]:
    """Train `model` and keep the best epoch by validation balanced accuracy (mean per-class recall;
    ties: accuracy, then lower val loss). On a split with as many validation images per class this is
    plain accuracy.

    Args:
        spec: the model's artifact description (models.make_spec), saved with every checkpoint.
        out_dir: stage folder; receives model.safetensors/json (best), checkpoint.pt, metrics.jsonl, train.json.
        teacher: eval-mode teacher for distillation; required unless the loss is `none`.
        reference: the model whose function a fine-tune recovers (the unpruned student): each epoch's
            KL divergence from it and agreement with it on the validation views (`Fidelity`) break ties
            of validation accuracy, and `opts.stop_agreement` reads the agreement.
        logits_memo: kept across several fits that distil from one teacher on one training set (the
            sweep's fine-tunes): the cached teacher logits are computed once and reused.

    Returns:
        The model with the best weights loaded (in eval mode) and the summary written to train.json.
    """
    run = _setup(model, spec, data, tcfg, Path(out_dir), opts, teacher, reference, logits_memo)
    t_session = time.perf_counter()
    for epoch in range(run.start_epoch, opts.epochs if run.stopped is None else run.start_epoch):
        _epoch(run, epoch, t_session)
        if run.stopped:
            break
    return _finish(run)


def _setup(model, spec, data, tcfg, out_dir, opts, teacher, reference, logits_memo) -> _Run:
    """Datasets, optimizer, schedule, EMA and the checkpoint to resume; the teacher's targets and the loss."""
    if opts.loss != "none" and teacher is None:
        raise ModelError(f"distillation loss '{opts.loss}' needs a teacher")
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    acc = make_accelerator()
    device, world = acc.device, acc.num_processes
    if tcfg.batch_size % world:
        raise ConfigError(f"train.batch_size={tcfg.batch_size} must be divisible by the {world} processes")
    torch.manual_seed(tcfg.seed)

    train_ds = TrainDataset(*data.arrays("train"), spec.mean, spec.std, tcfg)
    val_ds = EvalDataset(*data.arrays("val"), spec.mean, spec.std)
    balance = resolve_balance(tcfg.balance, train_ds.labels.numpy(), len(data.classes))
    draw_weights = sample_weights(train_ds.labels, len(data.classes)) if balance == "sampler" else None
    steps_per_epoch = len(epoch_batches(len(train_ds), tcfg.batch_size, 0, 0, 0, world))

    if opts.loss == "token":
        model.set_distilled_training(True)
    optimizer, scheduler, ema = _optimization(model, tcfg, opts, steps_per_epoch)
    start_epoch, best, elapsed, stopped, best_weights = start_or_resume(
        acc, out_dir, opts.resume, opts.epochs, opts.desc, model, optimizer, scheduler, ema
    )
    if best["epoch"] == 0 and not opts.select_initial:
        raise ConfigError(
            f"the checkpoint in '{out_dir}' keeps the untrained starting weights as its best epoch (a fine-tune "
            "of an older slimvit); run the stage without --resume (or --force) to start over"
        )

    precision = resolve_precision(tcfg.precision, device)
    mem_format = torch.channels_last if tcfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=mem_format)
    model, optimizer = acc.prepare(model, optimizer)
    fidelity = (
        Fidelity(reference.to(device), val_ds, tcfg, device, precision) if reference is not None else None
    )
    run = _Run(
        opts=opts,
        tcfg=tcfg,
        spec=spec,
        data=data,
        out_dir=out_dir,
        acc=acc,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        ema=ema,
        train_ds=train_ds,
        val_ds=val_ds,
        draw_weights=draw_weights,
        balance=balance,
        precision=precision,
        mem_format=mem_format,
        fidelity=fidelity,
        start_epoch=start_epoch,
        done=start_epoch,
        best=best,
        elapsed=elapsed,
        stopped=stopped,
        best_weights=best_weights,
    )
    if opts.select_initial and start_epoch == 0:
        _initial_weights_compete(run)
    if teacher is not None and opts.loss != "none":
        _teacher_targets(run, teacher, logits_memo)
    offset = logit_offset(train_ds.labels, len(data.classes)).to(device) if balance == "logit" else None
    run.loss_fn = make_loss(opts.distill if opts.loss != "none" else None, tcfg.label_smoothing, offset)
    if tcfg.mixup > 0 or tcfg.cutmix > 0:
        from timm.data import Mixup

        run.mixup = Mixup(
            mixup_alpha=tcfg.mixup,
            cutmix_alpha=tcfg.cutmix,
            label_smoothing=tcfg.label_smoothing,
            num_classes=len(data.classes),
        )
    return run


def _optimization(model: nn.Module, tcfg: TrainConfig, opts: FitOptions, steps_per_epoch: int):
    """AdamW, its warm-up + cosine schedule over all the steps, and the weights' EMA (or None)."""
    total_steps = max(1, opts.epochs * steps_per_epoch)
    optimizer = make_optimizer(model, opts.lr, tcfg.weight_decay)
    warmup = int(tcfg.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, warmup, tcfg.min_lr_ratio)
    )
    ema = None
    if tcfg.ema:
        from timm.utils import ModelEmaV3

        # warmed up (decay 1 - (1 + step)^-2/3, at most ema_decay): without it a fixed 0.998 keeps 20% of the
        # random initialisation after NEU-DET's 800 student steps (a 27%-accurate EMA, measured)
        ema = ModelEmaV3(model, decay=tcfg.ema_decay, use_warmup=True)
    return optimizer, scheduler, ema


def _initial_weights_compete(run: _Run) -> None:
    """`select_initial`: the starting weights are the best "epoch 0" until a trained epoch beats them."""
    model = run.acc.unwrap_model(run.model)
    v = validate(model, run.val_ds, 256, run.acc.device, run.fidelity)
    run.best = best_record(v, 0)
    run.best_weights = _weights(model)
    log.info(
        "%s 0/%d  (initial weights)  val acc %.4f  balanced %.4f  val loss %.4f",
        run.opts.desc,
        run.opts.epochs,
        v["acc"],
        v["bal_acc"],
        v["loss"],
    )


def _teacher_targets(run: _Run, teacher: nn.Module, logits_memo: LogitsMemo | None) -> None:
    """The teacher on the device; its logits cached once where no mixup/cutmix mixes the images."""
    tcfg, device = run.tcfg, run.acc.device
    run.teacher = teacher.to(device, memory_format=run.mem_format).eval()
    if run.opts.distill.teacher_logits == "cached" and not (tcfg.mixup > 0 or tcfg.cutmix > 0):
        run.cached, run.cache_seconds = cache_teacher_logits(
            run.teacher,
            EvalDataset(*run.data.arrays("train"), run.spec.mean, run.spec.std),
            tcfg,
            run.precision,
            device,
            run.opts.desc,
            logits_memo,
        )


def epoch_batches(
    n: int, batch: int, seed: int, epoch: int, rank: int, world: int, weights: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """This rank's batches of one epoch: a seeded permutation, or with `weights` (one per sample) n draws
    with replacement in proportion to them (class-balanced sampling)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if weights is None:
        perm = torch.randperm(n, generator=g)
    else:
        perm = torch.multinomial(weights, n, replacement=True, generator=g)
    per_rank = batch // world
    usable = (n // batch) * batch if n >= batch else n  # full global batches keep ranks in step
    perm = perm[:usable]
    mine = perm[rank::world]
    return [mine[i : i + per_rank] for i in range(0, len(mine), max(1, per_rank))]


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed every RNG an epoch draws from: torch (augmentations, dropout), numpy (timm's mixup/cutmix),
    Python's `random`. A function of (seed, epoch, rank) only, so a resumed epoch repeats exactly."""
    s = seed * 1_000_003 + epoch * 101 + rank
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _epoch(run: _Run, epoch: int, t_session: float) -> None:
    """Train epoch `epoch` (0-based), validate it, keep it if it is the best, decide whether to stop, and
    checkpoint."""
    opts, tcfg, acc = run.opts, run.tcfg, run.acc
    t0 = time.perf_counter()
    stats, size = _train_pass(run, epoch)
    eval_model = run.ema.module if run.ema is not None else acc.unwrap_model(run.model)
    first = first_competing_epoch(opts.select_from, opts.epochs)
    # the views' KL and agreement rank the epochs that may be kept (and the stop rule reads the kept one's):
    # an epoch before them skips the views (4x the validation images; under `select_from: 1` all but the last)
    fidelity = run.fidelity if epoch + 1 >= first else None
    v = validate(eval_model, run.val_ds, 256, acc.device, fidelity)
    run.elapsed += time.perf_counter() - t0
    run.done = epoch + 1
    row = {
        "epoch": epoch + 1,
        "train_loss": float(stats[0] / stats[4]),
        "train_acc": float(stats[3] / stats[4]),
        "val_loss": v["loss"],
        "val_acc": v["acc"],
        "val_bal_acc": v["bal_acc"],
        "lr": float(run.scheduler.get_last_lr()[0]),
        "seconds": time.perf_counter() - t0,
        "img_size": size,
    }
    if opts.loss != "none":
        row.update(task_loss=float(stats[1] / stats[4]), kd_loss=float(stats[2] / stats[4]))
    if fidelity is not None:
        row.update(val_kl=v["kl"], val_agree=v["agree"])
    improved = improves(v, run.best, epoch + 1, first)
    if improved:
        run.best = best_record(v, epoch + 1)
        run.best_weights = _weights(eval_model)
    if opts.on_epoch is not None and acc.is_main_process:
        opts.on_epoch(eval_model.eval(), epoch + 1)
    run.stopped = stop_reason(
        run.best,
        opts.stop_at,
        tcfg.patience if epoch + 1 >= first else 0,  # no stop before an epoch may be kept
        epoch + 1,
        opts.epochs,
        acc.num_processes,
        min_epochs=opts.min_epochs,
        agreement=opts.stop_agreement,
    )
    if acc.is_main_process:
        save_epoch(run.out_dir, row, _state(run, epoch))
        # the epochs left, weighted by their pixels when the early ones ran smaller (train.resize_from)
        schedule, img_size = _schedule(run), run.data.img_size
        done_cost = full_size_epochs(opts.epochs, img_size, schedule, run.start_epoch, epoch + 1)
        left_cost = full_size_epochs(opts.epochs, img_size, schedule, epoch + 1)
        left = (time.perf_counter() - t_session) / done_cost * left_cost
        _log_epoch(opts.desc, row, opts.epochs, improved, run.stopped, left, img_size)
    acc.wait_for_everyone()


def _schedule(run: _Run) -> TrainConfig:
    """The settings that give the epochs' image sizes: progressive resizing only where `opts.resize`."""
    return run.tcfg if run.opts.resize else dataclasses.replace(run.tcfg, resize_from=0)


def _train_pass(run: _Run, epoch: int) -> tuple[torch.Tensor, int]:
    """The optimizer steps of one epoch, on its seeded batches at its image size: (statistics, size)."""
    from tqdm.auto import tqdm

    acc, tcfg, img_size = run.acc, run.tcfg, run.data.img_size
    run.model.train()
    rank, world = acc.process_index, acc.num_processes
    _seed_epoch(tcfg.seed, epoch, rank)
    batches = epoch_batches(
        len(run.train_ds), tcfg.batch_size, tcfg.seed, epoch, rank, world, run.draw_weights
    )
    size = epoch_size(epoch, run.opts.epochs, img_size, _schedule(run))
    show_bar = acc.is_main_process and sys.stderr.isatty()
    bar = tqdm(
        batches, desc=f"{run.opts.desc} {epoch + 1}/{run.opts.epochs}", disable=not show_bar, leave=False
    )
    model = acc.unwrap_model(run.model)
    with (
        vit.any_input_size(model) if size != img_size else contextlib.nullcontext(),
        vit.explicit_attention(model, on=explicit_attention_on(acc.device)),
    ):
        stats = _train_steps(run, bar, size, show_bar)
    return stats, size


def _train_steps(run: _Run, bar, size: int, show_bar: bool) -> torch.Tensor:
    """One pass over `bar` (this rank's batches of sample indices): the training statistics
    [loss, task_loss, kd_loss, correct, seen], summed over the processes. `size`: downscale the augmented
    batches to this many pixels (progressive resizing; the model must take that size)."""
    import torch.nn.functional as F

    acc, model, optimizer, scheduler, ema = run.acc, run.model, run.optimizer, run.scheduler, run.ema
    train_ds, loss_fn, teacher, cached, mixup = run.train_ds, run.loss_fn, run.teacher, run.cached, run.mixup
    precision, mem_format, grad_clip = run.precision, run.mem_format, run.tcfg.grad_clip
    device = acc.device
    sums = {"loss": 0.0, "task_loss": 0.0, "kd_loss": 0.0}
    seen, correct = 0, 0
    for idx in bar:
        items = [train_ds[int(i)] for i in idx]
        x = torch.stack([it[0] for it in items]).to(device).contiguous(memory_format=mem_format)
        y = torch.stack([it[1] for it in items]).to(device)
        target = y
        if mixup is not None and len(y) % 2 == 0:
            x, target = mixup(x, y)
        x_full = x  # a live teacher sees the full-size batch
        if size is not None and size != x.shape[-1]:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            x = x.contiguous(memory_format=mem_format)
        with autocast_context(precision, device):
            out = model(x)
            t_logits = None
            if cached is not None:
                t_logits = cached[idx].to(device)
            elif teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(x_full)
            parts = loss_fn(out, t_logits, target)
        optimizer.zero_grad(set_to_none=True)
        acc.backward(parts["loss"])
        if grad_clip > 0:
            acc.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(acc.unwrap_model(model), step=scheduler.last_epoch)  # the optimizer steps so far
        logits = out[0] if isinstance(out, (tuple, list)) else out
        n = len(y)
        seen += n
        correct += int((logits.argmax(-1) == y).sum())
        for k in sums:
            sums[k] += float(parts[k].detach()) * n
        if show_bar:
            bar.set_postfix(loss=f"{sums['loss'] / seen:.3f}", acc=f"{correct / seen:.3f}")
    stats = torch.tensor(
        [sums["loss"], sums["task_loss"], sums["kd_loss"], correct, seen], dtype=torch.float64, device=device
    )
    return acc.reduce(stats, reduction="sum") if acc.num_processes > 1 else stats


def _state(run: _Run, epoch: int) -> dict:
    """What the checkpoint after epoch `epoch` holds: everything a resume needs to go on exactly."""
    state = {
        "model": _weights(run.acc.unwrap_model(run.model)),
        "best_model": run.best_weights,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "epoch": epoch,
        "epochs": run.opts.epochs,
        "best": run.best,
        "seconds": run.elapsed,
        "stopped": run.stopped,
    }
    if run.ema is not None:
        state["ema"] = run.ema.module.state_dict()
    return state


def _finish(run: _Run) -> tuple[nn.Module, dict]:
    """Load the best epoch's weights, save the model and train.json (rank 0), return both."""
    opts, acc, best = run.opts, run.acc, run.best
    device = acc.device
    summary = {
        "best_epoch": best["epoch"],
        "best_val_acc": best["val_acc"],
        "best_val_bal_acc": best["val_bal_acc"],
        "best_val_loss": best["val_loss"],
        "best_val_kl": best.get("val_kl"),
        "best_val_agree": best.get("val_agree"),
        "fidelity_views": run.fidelity.x.shape[0] if run.fidelity is not None else None,
        "min_epochs": opts.min_epochs,
        "epochs": opts.epochs,
        "first_competing_epoch": first_competing_epoch(opts.select_from, opts.epochs),
        "epochs_run": run.done,
        "stopped": run.stopped,
        "balance": run.balance,
        "teacher_logits": None if opts.loss == "none" else ("cached" if run.cached is not None else "live"),
        "teacher_logits_seconds": run.cache_seconds,
        "seconds": run.elapsed,
        "distill": opts.loss,
        "processes": acc.num_processes,
        "precision": run.precision,
        "attention": "explicit" if explicit_attention_on(device) else "fused",  # the training steps'
    }
    model = acc.unwrap_model(run.model).to(memory_format=torch.contiguous_format)
    if opts.loss == "token":
        model.set_distilled_training(False)
    model = model.cpu()  # what follows (evaluation, pruning, export, timing) runs on the CPU
    if acc.is_main_process:
        if run.best_weights is not None:
            model.load_state_dict(run.best_weights)
        models.save(model, run.spec, run.out_dir)
        atomic_write_json(run.out_dir / TRAIN, summary)
    acc.wait_for_everyone()
    if not acc.is_main_process:  # rank 0's best (BatchNorm statistics differ between ranks)
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(run.out_dir / WEIGHTS)))
    model.eval()
    return model, summary


def _log_epoch(
    desc: str, row: dict, epochs: int, improved: bool, stopped: str | None, left: float, full_size: int
) -> None:
    log.info(
        "%s %d/%d%s  loss %.4f  train acc %.4f  val acc %.4f  balanced %.4f  val loss %.4f%s  %.1fs%s%s",
        desc,
        row["epoch"],
        epochs,
        f" ({row['img_size']} px)" if row["img_size"] != full_size else "",
        row["train_loss"],
        row["train_acc"],
        row["val_acc"],
        row["val_bal_acc"],
        row["val_loss"],
        f"  agrees with the student {row['val_agree']:.4f} (KL {row['val_kl']:.4f})"
        if "val_agree" in row
        else "",
        row["seconds"],
        "  *" if improved else "",
        f"  ({int(left // 60)}m{int(left % 60):02d}s left)" if left > 0 and not stopped else "",
    )
    if stopped:
        log.info("%s: stopped after epoch %d of at most %d (%s)", desc, row["epoch"], epochs, stopped)


def seconds_per_epoch(rows: list[dict]) -> float:
    return float(np.median([r["seconds"] for r in rows])) if rows else float("nan")


# --------------------------------------------------------------------------- stages

ROLES = (TEACHER, STUDENT, ABLATION)
"""The models `train_role` trains; each role's name is its folder's."""


def train_role(
    cfg,
    run_dir: Path,
    role: str,
    data: Data | None = None,
    resume: bool | str = False,
    on_epoch: Callable[[nn.Module, int], None] | None = None,
) -> dict:
    """Train the teacher, the distilled student, or the student without distillation; evaluate on test.
    `on_epoch`: see FitOptions."""
    from slimvit.data import load_data
    from slimvit.evaluate import evaluate_model

    run_dir = Path(run_dir)
    data = data or load_data(cfg.data, run_dir)
    spec, pretrained, weights = role_spec(cfg, role, data)
    torch.manual_seed(cfg.train.seed)
    model = models.create(spec, pretrained=pretrained, weights=weights)
    teacher, distill_cfg = None, None
    if role == STUDENT and cfg.distill.loss != "none":
        teacher, distill_cfg = load_teacher(run_dir, data.classes, input_spec=spec), cfg.distill
    t = cfg.train
    epochs, lr = (t.teacher_epochs, t.teacher_lr) if role == TEACHER else (t.epochs, t.lr)
    epochs = scale_epochs(epochs, t, len(data.split["train"]), role)
    log.info(
        "%s: %s (%.2fM params), %d epochs, distillation: %s",
        role,
        spec.name,
        models.count_params(model) / 1e6,
        epochs,
        distill_cfg.loss if distill_cfg else "none",
    )
    opts = FitOptions(
        epochs=epochs,
        lr=lr,
        distill=distill_cfg,
        resume=resume,
        desc=role,
        resize=True,
        select_from=0.0 if role == TEACHER else t.select_from,
        on_epoch=on_epoch,
    )
    model, summary = fit(model, spec, data, t, run_dir / role, opts, teacher=teacher)
    metrics = evaluate_model(model, data, spec, "test")
    if is_main_process():
        atomic_write_json(run_dir / role / EVAL, metrics)
    log.info(
        "%s: test accuracy %.4f, macro-F1 %.4f (best epoch %d)",
        role,
        metrics["accuracy"],
        metrics["macro_f1"],
        summary["best_epoch"],
    )
    return {**summary, "test_accuracy": metrics["accuracy"], "test_macro_f1": metrics["macro_f1"]}


def run_teacher(cfg, run_dir: Path, data: Data | None = None, resume: bool | str = False) -> dict:
    return train_role(cfg, run_dir, TEACHER, data, resume)


def run_distill(cfg, run_dir: Path, data: Data | None = None, resume: bool | str = False) -> dict:
    """Train the student from the teacher (`student/`)."""
    return train_role(cfg, run_dir, STUDENT, data, resume)


def run_ablation(cfg, run_dir: Path, data: Data | None = None, resume: bool | str = False) -> dict:
    """Train the same student without distillation (`student_nokd/`), for the report's comparison."""
    return train_role(cfg, run_dir, ABLATION, data, resume)
