"""What a training will do, decided before it runs: the model of each role, the device and precision,
the learning-rate and epoch schedule, the image size of each epoch, the flips/rotations the augmentation
draws from, the class balance.

Apart from the loop (`train.fit`) so that the time estimate (`eta`) reads the same decisions the training
makes, without importing the loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from slimvit import models
from slimvit.config import TrainConfig
from slimvit.errors import ConfigError
from slimvit.spec import ModelSpec

if TYPE_CHECKING:
    from slimvit.data import Data

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the model of a role


def role_spec(cfg, role: str, data: Data) -> tuple[ModelSpec, bool, str | None]:
    """The model `role` trains (teacher, student or student_nokd): (spec, pretrained, weights file)."""
    m = cfg.model
    if role == "teacher":
        spec = models.make_spec(
            m.teacher, len(data.classes), data.classes, data.img_size, "patch", m.teacher_kwargs
        )
        return spec, m.teacher_pretrained, m.teacher_weights
    spec = models.make_spec(
        m.student,
        len(data.classes),
        data.classes,
        data.img_size,
        m.student_stem,
        m.student_kwargs,
        m.student_attention,
    )
    return spec, m.student_pretrained, m.student_weights


# --------------------------------------------------------------------------- device and precision


def make_accelerator():
    """Device and processes only: autocast is applied per training (`autocast_context`), not through
    Accelerate's global state, so stages with different precisions can run in one process."""
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


def make_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, fused: bool = True
) -> torch.optim.Optimizer:
    """AdamW with timm's parameter groups (no weight decay on norms, biases, tokens, position embeddings), on
    PyTorch's fused kernel: one pass over each tensor per step where the default CPU path makes several (it
    picks the multi-tensor path on GPUs only). Every training uses it, and the ETA's step timing; `fused=False`
    is PyTorch's default path (`scripts/step_cost.py --compare optimizer`)."""
    import timm.optim

    kwargs = {"fused": True} if fused else {}
    return timm.optim.create_optimizer_v2(model, "adamw", lr=lr, weight_decay=weight_decay, **kwargs)


# --------------------------------------------------------------------------- schedule


def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float):
    """Linear warm-up, then cosine decay to `min_ratio` of the peak."""

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return fn


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


# --------------------------------------------------------------------------- augmentation views


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


# --------------------------------------------------------------------------- class balance


BALANCE_AUTO = 1.5
"""Largest/smallest training class count from which `train.balance: auto` samples class-balanced."""


def imbalance(labels, num_classes: int) -> float:
    """Largest over smallest class count of a split (inf when a class is missing)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    return float(counts.max() / counts.min()) if counts.min() > 0 else float("inf")


def resolve_balance(balance: str, labels, num_classes: int) -> str:
    """`auto` -> `sampler` where the training split's classes differ by `BALANCE_AUTO` or more, else `none`."""
    if balance != "auto":
        return balance
    return "sampler" if imbalance(labels, num_classes) >= BALANCE_AUTO else "none"


def sample_weights(labels, num_classes: int) -> torch.Tensor:
    """One weight per sample, 1 / (its class's count): every class is drawn equally often."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    counts = torch.bincount(labels, minlength=num_classes).clamp(min=1).double()
    return (1.0 / counts)[labels]
