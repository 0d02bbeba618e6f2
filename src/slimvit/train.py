"""The one training loop: teacher, student, no-distillation ablation and post-pruning fine-tuning.

Hugging Face Accelerate handles the device and the processes, so the same code runs on CPU, one
GPU, or several (``accelerate launch`` / ``torchrun``). Autocast (bf16/fp16) is applied here
rather than through Accelerate's global state, so stages with different settings can run in one
process.

Each epoch ends with a checkpoint that is one unit: ``out_dir/checkpoint.pt`` holds the weights, the
best weights so far, the optimizer, the schedule and the epoch, written to a temporary file and
renamed over the old one, so a kill at any moment leaves the old checkpoint or the new one, never
a mix (it is loaded with ``weights_only=True``: tensors and numbers, no pickled objects). Every RNG an
epoch draws from (torch's for the data order, augmentations and dropout, numpy's for timm's
mixup/cutmix, Python's) is seeded at the start of the epoch from (seed, epoch, rank), so the epoch
stored in the checkpoint determines them: a resumed run trains exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimvit import models, vit
from slimvit.config import DistillConfig, TrainConfig
from slimvit.data import Data, EvalDataset, TrainDataset
from slimvit.distill import cross_entropy, logit_offset, make_loss
from slimvit.errors import ConfigError, ModelError, first_line
from slimvit.evaluate import balanced_accuracy
from slimvit.io import (
    append_jsonl,
    atomic_path,
    atomic_write_json,
    is_main_process,
    read_jsonl,
    remove_temp_files,
)
from slimvit.spec import ModelSpec

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
LEGACY_CHECKPOINT = "last"
"""The folder older versions kept their checkpoint in (three files, each renamed on its own)."""


def make_accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware (emulated bf16 is many times slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    from slimvit.timing import cpu_flags

    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})  # x86 AVX-512 BF16 / AMX; Arm BF16


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> `bf16` where the hardware has native bf16, else `no`; other values unchanged."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "no"


def explicit_attention_on(device: torch.device) -> bool:
    """Whether training steps on `device` use timm's explicit attention (`vit.explicit_attention`): on a
    CPU, where the fused kernel's backward is the slow part of a ViT step; elsewhere the fused kernel."""
    return device.type == "cpu"


def autocast_context(precision: str, device: torch.device):
    if precision == "no":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a GPU; on a CPU use bf16 or no")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float):
    """Linear warm-up, then cosine decay to `min_ratio` of the peak."""

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return fn


def _epoch_batches(
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


def _save_checkpoint(out_dir: Path, state: dict) -> None:
    """Write the whole training state as one file, renamed into place: the old or the new one survives."""
    with atomic_path(out_dir / CHECKPOINT) as tmp:
        torch.save(state, tmp)
    shutil.rmtree(out_dir / LEGACY_CHECKPOINT, ignore_errors=True)


def _has_checkpoint(out_dir: Path) -> bool:
    return (out_dir / CHECKPOINT).exists() or (out_dir / LEGACY_CHECKPOINT / "train_state.pt").exists()


def _remove_checkpoint(out_dir: Path) -> None:
    (out_dir / CHECKPOINT).unlink(missing_ok=True)
    shutil.rmtree(out_dir / LEGACY_CHECKPOINT, ignore_errors=True)


def _load_checkpoint(out_dir: Path) -> dict:
    """The training state: model, best_model (or None), optimizer, scheduler, [ema,] epoch, epochs, best, seconds."""
    from safetensors.torch import load_file

    path = out_dir / CHECKPOINT
    try:
        if path.exists():
            return torch.load(path, map_location="cpu", weights_only=True)
        legacy = out_dir / LEGACY_CHECKPOINT
        state = torch.load(legacy / "train_state.pt", map_location="cpu", weights_only=True)
        best = out_dir / "model.safetensors"
        state["model"] = load_file(str(legacy / "model.safetensors"))
        state["best_model"] = load_file(str(best)) if best.exists() else None
        return state
    except FileNotFoundError:
        raise ModelError(f"no checkpoint to resume in '{out_dir}'; run the stage without --resume") from None
    except Exception as e:
        raise ModelError(
            f"the checkpoint in '{out_dir}' is corrupt ({first_line(e)}); run the stage without --resume"
        ) from None


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed every RNG an epoch draws from: torch (augmentations, dropout), numpy (timm's mixup/cutmix),
    Python's `random`. A function of (seed, epoch, rank) only, so a resumed epoch repeats exactly."""
    s = seed * 1_000_003 + epoch * 101 + rank
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


def floor_epochs(epochs: int, tcfg: TrainConfig, n_train: int) -> int:
    """`epochs`, raised so that a training split smaller than `train.steps_floor_images` gets as many
    optimizer steps as that many images would (rounded: a split one image short changes nothing)."""
    floor = tcfg.steps_floor_images
    if not floor or n_train >= floor or epochs == 0:
        return epochs
    return max(epochs, round(epochs * floor / max(1, n_train)))


def scale_epochs(epochs: int, tcfg: TrainConfig, n_train: int, what: str = "training") -> int:
    """`floor_epochs`, saying so in the log when it raised the count."""
    scaled = floor_epochs(epochs, tcfg, n_train)
    if scaled != epochs:
        log.info(
            "%s: %d epochs instead of %d: %d training images get the optimizer steps of %d (train.steps_floor_images)",
            what,
            scaled,
            epochs,
            n_train,
            tcfg.steps_floor_images,
        )
    return scaled


def epoch_size(epoch: int, epochs: int, img_size: int, tcfg: TrainConfig) -> int:
    """Image size of epoch `epoch` (0-based) of `epochs` under progressive resizing (`train.resize_from`):
    linear from resize_from at the first epoch to img_size at resize_until of the epochs, in steps of 16."""
    start = min(tcfg.resize_from, img_size)
    ramp = tcfg.resize_until * epochs
    if not start or start == img_size or epoch >= ramp:
        return img_size
    size = start + (img_size - start) * epoch / ramp
    return max(start, int(size) // 16 * 16)


def full_size_epochs(
    epochs: int, img_size: int, tcfg: TrainConfig, start: int = 0, stop: int | None = None
) -> float:
    """Epochs `start` to `stop` (0-based, stop excluded; default: the last) of `epochs`, in full-size epochs
    of training steps: a step on a smaller image costs a third of a full one plus two thirds of its pixels'
    share. Fitted to epochs measured on a 2-core Intel Xeon (bf16), 64 and 80 px of 96: the ViT-Ti student
    0.64x and 0.69x, the ResNet-18 0.68x and 0.86x, where this says 0.63x and 0.80x (the pixels: 0.44x, 0.69x)."""
    stop = epochs if stop is None else stop
    shares = ((epoch_size(e, epochs, img_size, tcfg) / img_size) ** 2 for e in range(start, stop))
    return sum(1 / 3 + 2 / 3 * share for share in shares)


def imbalance(labels, num_classes: int) -> float:
    """Largest over smallest class count of a split (inf when a class is missing)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    return float(counts.max() / counts.min()) if counts.min() > 0 else float("inf")


def resolve_balance(balance: str, labels, num_classes: int) -> str:
    """`auto` -> `sampler` where the training split's classes differ by `BALANCE_AUTO` or more, else `none`."""
    if balance != "auto":
        return balance
    return "sampler" if imbalance(labels, num_classes) >= BALANCE_AUTO else "none"


BALANCE_AUTO = 1.5
"""Largest/smallest training class count from which `train.balance: auto` samples class-balanced."""


def sample_weights(labels, num_classes: int) -> torch.Tensor:
    """One weight per sample, 1 / (its class's count): every class is drawn equally often."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    counts = torch.bincount(labels, minlength=num_classes).clamp(min=1).double()
    return (1.0 / counts)[labels]


def n_views(flips: bool, rot90: bool) -> int:
    """How many views `views` makes."""
    return 8 if flips and rot90 else 4 if flips or rot90 else 1


def views(x: torch.Tensor, flips: bool, rot90: bool) -> list[torch.Tensor]:
    """The flips/rotations of a (N, C, H, W) batch that the training augmentation draws from."""
    rots = [torch.rot90(x, k, (2, 3)) if k else x for k in range(4 if rot90 else 1)]
    if not flips:
        return rots
    if rot90:  # rotations and their mirror images: the 8 symmetries of a square
        return rots + [r.flip(3) for r in rots]
    return [x, x.flip(3), x.flip(2), x.flip(2).flip(3)]


@torch.no_grad()
def teacher_logits(
    teacher: nn.Module, ds: EvalDataset, tcfg: TrainConfig, precision: str, device, batch: int = 128
) -> torch.Tensor:
    """The teacher's logits for every training image, averaged over its flips/rotations (float32, CPU)."""
    teacher.eval()
    out = []
    for i in range(0, len(ds), batch):
        x = ds.x[i : i + batch].to(device)
        with autocast_context(precision, device):
            per_view = [models.eval_logits(teacher(v)).float() for v in views(x, tcfg.flips, tcfg.rot90)]
        out.append(torch.stack(per_view).mean(0).cpu())
    return torch.cat(out)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def _validate(
    model: nn.Module, ds: EvalDataset, batch: int, device, fidelity: Fidelity | None = None
) -> dict:
    """`acc`, `bal_acc` (mean per-class recall) and `loss` in fp32, as the test evaluation computes them;
    with `fidelity`, also `kl` and `agree` (to the reference model, on the validation views)."""
    model.eval()
    preds, loss_sum = [], 0.0
    for i in range(0, len(ds), batch):
        x, y = ds.x[i : i + batch].to(device), ds.labels[i : i + batch].to(device)
        out = models.eval_logits(model(x))
        loss_sum += float(cross_entropy(out, y)) * len(y)
        preds.append(out.argmax(-1).cpu())
    pred = torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)
    labels = ds.labels.numpy()
    fid = fidelity(model) if fidelity is not None else {}
    return {
        "acc": float((pred == labels).mean()) if len(labels) else 0.0,
        "bal_acc": balanced_accuracy(pred, labels),
        "loss": loss_sum / max(1, len(ds)),
        "kl": fid.get("kl"),
        "agree": fid.get("agree"),
    }


FIDELITY_VIEWS = 4
"""Views of each validation image a fine-tune compares with the student: the image, its 180-degree
rotation and its two mirror images (every other one of the 8 the augmentation draws from). Measured on
NEU-DET (AMD EPYC, bf16): all 8 in fp32 took as long as the training epoch itself (4 s of an 8.5 s epoch)."""


class Fidelity:
    """How close a model's function is to a reference model's (a pruning fine-tune's student) on the
    validation images and their flips/rotations (views the training augmentation draws from, FIDELITY_VIEWS
    of them): mean KL(reference || model) of the softmax outputs, and the share of views where both name
    the same class. Unlike validation accuracy it does not saturate: on 18 validation images every pruned
    model may score 100% while it disagrees with the student on a third of new images. Runs in the
    training's precision (bf16 where the CPU has it), the KL in fp32."""

    def __init__(
        self,
        reference: nn.Module,
        ds: EvalDataset,
        tcfg: TrainConfig,
        device,
        precision: str = "no",
        batch: int = 256,
    ):
        every = views(ds.x, tcfg.flips, tcfg.rot90)
        step = max(1, len(every) // FIDELITY_VIEWS)
        self.x = torch.cat(every[::step][:FIDELITY_VIEWS])  # (V*N, C, H, W)
        self.batch, self.device, self.precision = batch, device, precision
        self.ref_logp = self._log_probs(reference)  # (V*N, classes)

    @torch.no_grad()
    def _log_probs(self, model: nn.Module) -> torch.Tensor:
        import torch.nn.functional as F

        was_training = model.training
        model.eval()
        out = []
        for i in range(0, len(self.x), self.batch):
            with autocast_context(self.precision, self.device):
                logits = models.eval_logits(model(self.x[i : i + self.batch].to(self.device)))
            out.append(F.log_softmax(logits.float(), -1).cpu())
        model.train(was_training)
        return torch.cat(out)

    def __call__(self, model: nn.Module) -> dict:
        logp = self._log_probs(model)
        kl = (self.ref_logp.exp() * (self.ref_logp - logp)).sum(-1).mean()
        agree = (logp.argmax(-1) == self.ref_logp.argmax(-1)).float().mean()
        return {"kl": float(kl), "agree": float(agree), "views": len(self.x)}


def _best(v: dict, epoch: int) -> dict:
    """The record of the best epoch so far (kept in the checkpoint and train.json)."""
    return {
        "val_acc": v["acc"],
        "val_bal_acc": v["bal_acc"],
        "val_loss": v["loss"],
        "val_kl": v.get("kl"),
        "val_agree": v.get("agree"),
        "epoch": epoch,
    }


def _best_key(best: dict) -> tuple:
    return _key(
        {
            "bal_acc": best["val_bal_acc"],
            "acc": best["val_acc"],
            "loss": best["val_loss"],
            "kl": best.get("val_kl"),
        }
    )


def _key(m: dict) -> tuple:
    """What "better on validation" means: balanced accuracy, then accuracy, then (fine-tunes, which have
    a reference) lower KL to the reference on the validation views, else lower loss."""
    return (m["bal_acc"], m["acc"], -m["kl"] if m.get("kl") is not None else -m["loss"])


def _start_or_resume(acc, out_dir: Path, resume, epochs: int, desc: str, model, optimizer, scheduler, ema):
    """Load the checkpoint to resume from, or clear another run's files: (start epoch, best, seconds so far,
    stop reason, best weights)."""
    best: dict = {
        "val_acc": -1.0,
        "val_bal_acc": -1.0,
        "val_loss": float("inf"),
        "val_kl": None,
        "val_agree": None,
        "epoch": -1,
    }
    start_epoch, elapsed, stopped, best_weights = 0, 0.0, None, None
    if acc.is_main_process and out_dir.is_dir():
        remove_temp_files(out_dir)  # half-written files of a killed run
    if resume is True or (resume == "auto" and _has_checkpoint(out_dir)):
        state = _load_checkpoint(out_dir)
        if state.get("epochs") != epochs:
            raise ConfigError(
                f"the checkpoint in '{out_dir}' was made for {state.get('epochs')} epochs, not {epochs}; "
                "run the stage without --resume (or --force) to start over"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and "ema" in state:
            ema.module.load_state_dict(state["ema"])
        start_epoch, best, elapsed = int(state["epoch"]) + 1, dict(state["best"]), float(state["seconds"])
        best.setdefault("val_bal_acc", best["val_acc"])  # a checkpoint of an older version
        best.setdefault("val_kl", None)
        best.setdefault("val_agree", None)
        best_weights = state.get("best_model")  # of the best epoch so far: what model.safetensors gets
        stopped = state.get("stopped")
        log.info("%s: resuming at epoch %d/%d", desc, start_epoch + 1, epochs)
    elif acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        _remove_checkpoint(out_dir)  # another run's: never resumed into this one
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)
        (out_dir / "train.json").unlink(missing_ok=True)
    if acc.is_main_process and start_epoch:
        kept = [r for r in read_jsonl(out_dir / "metrics.jsonl") if r.get("epoch", 0) <= start_epoch]
        with atomic_path(out_dir / "metrics.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return start_epoch, best, elapsed, stopped, best_weights


def _memo_key(teacher: nn.Module, train: EvalDataset, tcfg: TrainConfig, precision: str, device) -> str:
    def update(t: torch.Tensor) -> None:  # the tensor's bytes, without a copy where it is contiguous on CPU
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())

    h = hashlib.blake2b(digest_size=16)
    # parameters and every buffer, non-persistent ones too (a renormalisation's scale and shift)
    for k, v in [*teacher.named_parameters(), *teacher.named_buffers()]:
        h.update(k.encode())
        update(v)
    update(train.x)
    h.update(repr((tcfg.flips, tcfg.rot90, precision, str(device))).encode())
    return h.hexdigest()


def _cache_teacher(
    teacher,
    train: EvalDataset,
    tcfg: TrainConfig,
    precision: str,
    device,
    desc: str,
    memo: dict | None = None,
):
    """The teacher's view-averaged logits of every training image, and the seconds they took.

    `memo` (a dict the caller keeps across fits) holds the last logits computed, by teacher weights, images
    and views: the sweep's fine-tunes all distil from one model on one training set.
    """
    key = _memo_key(teacher, train, tcfg, precision, device) if memo is not None else None
    if key is not None and key in memo:
        log.info("%s: teacher logits reused from the previous fine-tune (same teacher, same images)", desc)
        return memo[key], 0.0
    t0 = time.perf_counter()
    cached = teacher_logits(teacher, train, tcfg, precision, device)
    seconds = time.perf_counter() - t0
    if key is not None:
        memo.clear()
        memo[key] = cached
    agree = float((cached.argmax(1) == train.labels).float().mean())
    log.info(
        "%s: teacher logits of %d training images x %d flips/rotations in %.0fs (averaged, they name "
        "the label of %.1f%% of them); no teacher runs in the training steps",
        desc,
        len(cached),
        len(views(torch.zeros(1, 1, 2, 2), tcfg.flips, tcfg.rot90)),
        seconds,
        100 * agree,
    )
    return cached, seconds


def _train_epoch(
    acc,
    model,
    optimizer,
    scheduler,
    ema,
    train_ds: TrainDataset,
    bar,
    *,
    loss_fn,
    teacher,
    cached,
    mixup,
    precision: str,
    mem_format,
    grad_clip: float,
    show_bar: bool,
    size: int | None = None,
) -> torch.Tensor:
    """One pass over `bar` (this rank's batches of sample indices): the training statistics
    [loss, task_loss, kd_loss, correct, seen], summed over the processes. `size`: downscale the augmented
    batches to this many pixels (progressive resizing; the model must take that size)."""
    import torch.nn.functional as F

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
            ema.update(acc.unwrap_model(model))
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


def fit(
    model: nn.Module,
    spec: ModelSpec,
    data: Data,
    tcfg: TrainConfig,
    out_dir: str | Path,
    *,
    epochs: int,
    lr: float,
    teacher: nn.Module | None = None,
    distill_cfg: DistillConfig | None = None,
    resume: bool | str = False,
    desc: str = "train",
    select_initial: bool = False,
    stop_at: float | None = None,
    logits_memo: dict | None = None,
    resize: bool = False,
    reference: nn.Module | None = None,
    min_epochs: int = 0,
    stop_agreement: float | None = None,
) -> tuple[nn.Module, dict]:
    """Train `model` and keep the best epoch by validation balanced accuracy (mean per-class recall;
    ties: accuracy, then lower val loss). On a split with as many validation images per class this is
    plain accuracy.

    Args:
        spec: the model's artifact description (models.make_spec), saved with every checkpoint.
        out_dir: stage folder; receives model.safetensors/json (best), checkpoint.pt, metrics.jsonl, train.json.
        teacher: eval-mode teacher for distillation; required unless the loss is `none`.
        resume: True continues from out_dir/last (error if absent), "auto" continues if present.
        select_initial: the weights `model` starts with compete as "epoch 0" for the best checkpoint
            (training cannot end worse on validation than where it started). The pruning fine-tunes do
            not use it: on a small validation split an untrained cut model often ties the student and
            would be kept without any fine-tuning.
        stop_at: stop after the first trained epoch that becomes the best and whose validation balanced
            accuracy reaches this (fine-tuning until a pruned model has recovered); `epochs` is then a cap.
            `train.patience` also stops training when the best epoch is that many epochs old.
        logits_memo: a dict kept across several fits that distil from one teacher on one training set (the
            sweep's fine-tunes): the cached teacher logits are computed once and reused.
        resize: train the early epochs on smaller images as `train.resize_from` says (the teacher and the
            student; fine-tunes start from a trained model and stay at full size).
        reference: the model whose function a fine-tune recovers (the unpruned student): each epoch's
            KL divergence from it and agreement with it on the validation views (`Fidelity`) break ties
            of validation accuracy, and `stop_agreement` reads the agreement.
        min_epochs: `stop_at` does not stop training before this many epochs (a floor of optimizer steps:
            on a small split one epoch is a couple of steps).
        stop_agreement: with `stop_at`, "recovered" also needs this agreement with `reference`.

    Returns:
        The model with the best weights loaded (in eval mode) and the summary written to train.json.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    loss_name = "none" if distill_cfg is None else distill_cfg.loss
    if loss_name != "none" and teacher is None:
        raise ModelError(f"distillation loss '{loss_name}' needs a teacher")
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    acc = make_accelerator()
    device, rank, world = acc.device, acc.process_index, acc.num_processes
    if tcfg.batch_size % world:
        raise ConfigError(f"train.batch_size={tcfg.batch_size} must be divisible by the {world} processes")
    torch.manual_seed(tcfg.seed)

    mean, std = spec.mean, spec.std
    train_ds = TrainDataset(*data.arrays("train"), mean, std, tcfg)
    val_ds = EvalDataset(*data.arrays("val"), mean, std)
    balance = resolve_balance(tcfg.balance, train_ds.labels.numpy(), len(data.classes))
    draw_weights = sample_weights(train_ds.labels, len(data.classes)) if balance == "sampler" else None
    steps_per_epoch = len(_epoch_batches(len(train_ds), tcfg.batch_size, 0, 0, 0, world))
    total_steps = max(1, epochs * steps_per_epoch)

    if loss_name == "token":
        model.set_distilled_training(True)
    import timm.optim

    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=lr, weight_decay=tcfg.weight_decay)
    warmup = int(tcfg.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, warmup, tcfg.min_lr_ratio)
    )
    ema = None
    if tcfg.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=tcfg.ema_decay)

    start_epoch, best, elapsed, stopped, best_weights = _start_or_resume(
        acc, out_dir, resume, epochs, desc, model, optimizer, scheduler, ema
    )
    if best["epoch"] == 0 and not select_initial:
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
    if select_initial and start_epoch == 0:
        v = _validate(acc.unwrap_model(model), val_ds, 256, device, fidelity)
        best = _best(v, 0)
        best_weights = _weights(acc.unwrap_model(model))
        log.info(
            "%s 0/%d  (initial weights)  val acc %.4f  balanced %.4f  val loss %.4f",
            desc,
            epochs,
            v["acc"],
            v["bal_acc"],
            v["loss"],
        )
    cached, cache_seconds = None, 0.0
    if teacher is not None and loss_name != "none":
        teacher = teacher.to(device, memory_format=mem_format).eval()
        if distill_cfg.teacher_logits == "cached" and not (tcfg.mixup > 0 or tcfg.cutmix > 0):
            cached, cache_seconds = _cache_teacher(
                teacher,
                EvalDataset(*data.arrays("train"), mean, std),
                tcfg,
                precision,
                device,
                desc,
                logits_memo,
            )
    offset = logit_offset(train_ds.labels, len(data.classes)).to(device) if balance == "logit" else None
    loss_fn = make_loss(distill_cfg if loss_name != "none" else None, tcfg.label_smoothing, offset)
    mixup = None
    if tcfg.mixup > 0 or tcfg.cutmix > 0:
        from timm.data import Mixup

        mixup = Mixup(
            mixup_alpha=tcfg.mixup,
            cutmix_alpha=tcfg.cutmix,
            label_smoothing=tcfg.label_smoothing,
            num_classes=len(data.classes),
        )
    show_bar = acc.is_main_process and sys.stderr.isatty()

    schedule = tcfg if resize else dataclasses.replace(tcfg, resize_from=0)  # the sizes of the epochs
    t_session, done = time.perf_counter(), start_epoch
    for epoch in range(start_epoch, epochs if stopped is None else start_epoch):
        t0 = time.perf_counter()
        model.train()
        _seed_epoch(tcfg.seed, epoch, rank)
        batches = _epoch_batches(len(train_ds), tcfg.batch_size, tcfg.seed, epoch, rank, world, draw_weights)
        size = epoch_size(epoch, epochs, data.img_size, schedule)
        bar = tqdm(batches, desc=f"{desc} {epoch + 1}/{epochs}", disable=not show_bar, leave=False)
        small = size != data.img_size
        with (
            vit.any_input_size(acc.unwrap_model(model)) if small else contextlib.nullcontext(),
            vit.explicit_attention(acc.unwrap_model(model), on=explicit_attention_on(device)),
        ):
            stats = _train_epoch(
                acc,
                model,
                optimizer,
                scheduler,
                ema,
                train_ds,
                bar,
                loss_fn=loss_fn,
                teacher=teacher if loss_name != "none" else None,
                cached=cached,
                mixup=mixup,
                precision=precision,
                mem_format=mem_format,
                grad_clip=tcfg.grad_clip,
                show_bar=show_bar,
                size=size,
            )
        eval_model = ema.module if ema is not None else acc.unwrap_model(model)
        v = _validate(eval_model, val_ds, 256, device, fidelity)
        val_acc, val_loss = v["acc"], v["loss"]
        elapsed += time.perf_counter() - t0
        done = epoch + 1
        row = {
            "epoch": epoch + 1,
            "train_loss": float(stats[0] / stats[4]),
            "train_acc": float(stats[3] / stats[4]),
            "val_loss": val_loss,
            "val_acc": val_acc,
            "val_bal_acc": v["bal_acc"],
            "lr": float(scheduler.get_last_lr()[0]),
            "seconds": time.perf_counter() - t0,
            "img_size": size,
        }
        if loss_name != "none":
            row.update(task_loss=float(stats[1] / stats[4]), kd_loss=float(stats[2] / stats[4]))
        if fidelity is not None:
            row.update(val_kl=v["kl"], val_agree=v["agree"])
        improved = _key(v) > _best_key(best)
        if improved:
            best = _best(v, epoch + 1)
            best_weights = _weights(eval_model)
        stopped = _stop_reason(
            best,
            stop_at,
            tcfg.patience,
            epoch + 1,
            epochs,
            world,
            min_epochs=min_epochs,
            agreement=stop_agreement,
        )
        if acc.is_main_process:
            state = {
                "model": _weights(acc.unwrap_model(model)),
                "best_model": best_weights,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "epochs": epochs,
                "best": best,
                "seconds": elapsed,
                "stopped": stopped,
            }
            if ema is not None:
                state["ema"] = ema.module.state_dict()
            _save_epoch(out_dir, row, state)
            # the epochs left, weighted by their pixels when the early ones ran smaller (train.resize_from)
            done_cost = full_size_epochs(epochs, data.img_size, schedule, start_epoch, epoch + 1)
            left_cost = full_size_epochs(epochs, data.img_size, schedule, epoch + 1)
            left = (time.perf_counter() - t_session) / done_cost * left_cost
            _log_epoch(desc, row, epochs, improved, stopped, left, data.img_size)
        acc.wait_for_everyone()
        if stopped:
            break

    summary = {
        "best_epoch": best["epoch"],
        "best_val_acc": best["val_acc"],
        "best_val_bal_acc": best["val_bal_acc"],
        "best_val_loss": best["val_loss"],
        "best_val_kl": best.get("val_kl"),
        "best_val_agree": best.get("val_agree"),
        "fidelity_views": fidelity.x.shape[0] if fidelity is not None else None,
        "min_epochs": min_epochs,
        "epochs": epochs,
        "epochs_run": done,
        "stopped": stopped,
        "balance": balance,
        "teacher_logits": None if loss_name == "none" else ("cached" if cached is not None else "live"),
        "teacher_logits_seconds": cache_seconds,
        "seconds": elapsed,
        "distill": loss_name,
        "processes": world,
        "precision": precision,
        "attention": "explicit" if explicit_attention_on(device) else "fused",  # the training steps'
    }
    model = acc.unwrap_model(model).to(memory_format=torch.contiguous_format)
    if loss_name == "token":
        model.set_distilled_training(False)
    model = model.cpu()  # what follows (evaluation, pruning, export, timing) runs on the CPU
    if acc.is_main_process:
        if best_weights is not None:
            model.load_state_dict(best_weights)
        models.save(model, spec, out_dir)
        atomic_write_json(out_dir / "train.json", summary)
    acc.wait_for_everyone()
    if not acc.is_main_process:  # rank 0's best (BatchNorm statistics differ between ranks)
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(out_dir / "model.safetensors")))
    model.eval()
    return model, summary


def _stop_reason(
    best: dict,
    stop_at: float | None,
    patience: int,
    done: int,
    epochs: int,
    world: int,
    min_epochs: int = 0,
    agreement: float | None = None,
) -> str | None:
    """Why training stops after epoch `done` (None: it goes on); with several processes, rank 0's
    reason (BatchNorm statistics, hence validation, differ between ranks).

    "Recovered" needs a trained epoch as the best, at least `min_epochs` epochs run, and, with
    `agreement`, the best epoch agreeing with the reference on that share of the validation views:
    validation accuracy alone saturates on a small split (every pruned model at 100% of 18 images after
    its first epoch of two optimizer steps), so it cannot say that the student's function is back."""
    stopped = None
    agrees = agreement is None or (
        best.get("val_agree") is not None and best["val_agree"] >= agreement - 1e-9
    )
    if (
        stop_at is not None
        and best["epoch"] >= 1
        and done >= min_epochs
        and agrees
        and best["val_bal_acc"] >= stop_at - 1e-9
    ):
        stopped = f"recovered: validation balanced accuracy {best['val_bal_acc']:.4f} >= {stop_at:.4f}" + (
            f", agreement with the student {best['val_agree']:.4f} >= {agreement:.4f} on the validation views"
            if agreement is not None
            else ""
        )
    elif patience and done - best["epoch"] >= patience and done < epochs:
        stopped = f"no better validation epoch in {patience} epochs"
    if world > 1:
        from accelerate.utils import broadcast_object_list

        stopped = broadcast_object_list([stopped])[0]
    return stopped


def _save_epoch(out_dir: Path, row: dict, state: dict) -> None:
    # Metrics first: a resume drops rows past the checkpoint, so a crash between the two is safe.
    append_jsonl(out_dir / "metrics.jsonl", row)
    _save_checkpoint(out_dir, state)


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

ROLES = ("teacher", "student", "student_nokd")


def _role_spec(cfg, role: str, data: Data) -> tuple[ModelSpec, bool, str | None]:
    m = cfg.model
    if role == "teacher":
        spec = models.make_spec(
            m.teacher, len(data.classes), data.classes, data.img_size, "patch", m.teacher_kwargs
        )
        return spec, m.teacher_pretrained, m.teacher_weights
    spec = models.make_spec(
        m.student, len(data.classes), data.classes, data.img_size, m.student_stem, m.student_kwargs
    )
    return spec, m.student_pretrained, m.student_weights


class Renormalize(nn.Module):
    """Feed a model inputs normalised for another one: x_dst = (x_src * std_src + mean_src - mean_dst) / std_dst.

    The teacher and the student may come with different mean/std (ImageNet's for a ResNet, 0.5 for
    timm's ViTs); the student's batch must be mapped back before the teacher sees it, or a
    BatchNorm teacher sees a 2x rescaled input and its logits are noise.
    """

    def __init__(self, model: nn.Module, src_mean, src_std, dst_mean, dst_std) -> None:
        super().__init__()
        self.model = model
        src_mean, src_std, dst_mean, dst_std = (
            torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)
            for v in (src_mean, src_std, dst_mean, dst_std)
        )
        self.register_buffer("scale", src_std / dst_std, persistent=False)
        self.register_buffer("shift", (src_mean - dst_mean) / dst_std, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x * self.scale + self.shift)


def load_teacher(
    run_dir: Path, classes: list[str], input_spec: ModelSpec, source: str = "teacher"
) -> nn.Module:
    """The model a run distils from, in eval mode, taking inputs normalised as `input_spec` says: the run's
    `teacher`, or (`source="student"`, pruning fine-tunes) its distilled student.

    Required on purpose: a teacher fed the student's normalisation (here ImageNet statistics vs
    ViT's 0.5/0.5) gives wrong soft targets; distilling from them once collapsed the pruning
    fine-tune to about 33% training accuracy.
    """
    command = {"teacher": "slimvit teacher", "student": "slimvit distill"}[source]
    path = Path(run_dir) / source
    if not (path / "train.json").exists():
        raise ModelError(f"no trained {source} in '{path}'; run `{command}` (or `slimvit run`) first")
    teacher, spec = models.load(path)
    if spec.num_classes != len(classes) or list(spec.classes) != list(classes):
        raise ModelError(
            f"the {source} in '{path}' predicts {spec.num_classes} classes {list(spec.classes)}, "
            f"the data has {len(classes)} {classes}; retrain the {source} on this dataset ({command} --force)"
        )
    if (input_spec.mean, input_spec.std) != (spec.mean, spec.std):
        teacher = Renormalize(teacher, input_spec.mean, input_spec.std, spec.mean, spec.std).eval()
    return teacher


def train_role(cfg, run_dir: Path, role: str, data: Data | None = None, resume: bool | str = False) -> dict:
    """Train the teacher, the distilled student, or the student without distillation; evaluate on test."""
    from slimvit.data import load_data
    from slimvit.evaluate import evaluate_model

    run_dir = Path(run_dir)
    data = data or load_data(cfg.data, run_dir)
    spec, pretrained, weights = _role_spec(cfg, role, data)
    torch.manual_seed(cfg.train.seed)
    model = models.create(spec, pretrained=pretrained, weights=weights)
    teacher, distill_cfg = None, None
    if role == "student" and cfg.distill.loss != "none":
        teacher, distill_cfg = load_teacher(run_dir, data.classes, input_spec=spec), cfg.distill
    t = cfg.train
    epochs, lr = (t.teacher_epochs, t.teacher_lr) if role == "teacher" else (t.epochs, t.lr)
    epochs = scale_epochs(epochs, t, len(data.split["train"]), role)
    log.info(
        "%s: %s (%.2fM params), %d epochs, distillation: %s",
        role,
        spec.name,
        models.count_params(model) / 1e6,
        epochs,
        distill_cfg.loss if distill_cfg else "none",
    )
    model, summary = fit(
        model,
        spec,
        data,
        t,
        run_dir / role,
        epochs=epochs,
        lr=lr,
        teacher=teacher,
        distill_cfg=distill_cfg,
        resume=resume,
        desc=role,
        resize=True,
    )
    metrics = evaluate_model(model, data, spec, "test")
    if is_main_process():
        atomic_write_json(run_dir / role / "eval.json", metrics)
    log.info(
        "%s: test accuracy %.4f, macro-F1 %.4f (best epoch %d)",
        role,
        metrics["accuracy"],
        metrics["macro_f1"],
        summary["best_epoch"],
    )
    return {**summary, "test_accuracy": metrics["accuracy"], "test_macro_f1": metrics["macro_f1"]}


def run_teacher(cfg, run_dir: Path, data: Data | None = None, resume: bool | str = False) -> dict:
    return train_role(cfg, run_dir, "teacher", data, resume)


def run_distill(cfg, run_dir: Path, data: Data | None = None, resume: bool | str = False) -> dict:
    """Train the student from the teacher (`student/`)."""
    return train_role(cfg, run_dir, "student", data, resume)


def run_ablation(cfg, run_dir: Path, data: Data | None = None, resume: bool | str = False) -> dict:
    """Train the same student without distillation (`student_nokd/`), for the report's comparison."""
    return train_role(cfg, run_dir, "student_nokd", data, resume)
