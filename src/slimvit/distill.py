"""Distillation losses, a registry: soft KD, DeiT hard distillation and the distillation token.

The `distill` stage itself is `train.run_distill`: this module knows losses, not training.

Every loss takes the student's output, the teacher's logits (None for `none`) and the targets,
and returns its parts: ``{"loss", "task_loss", "kd_loss"}``. With an ``offset`` (per class) the
label term is logit-adjusted (Menon et al. 2021, "Long-tail learning via logit adjustment"): the
cross-entropy sees ``logits + offset``, ``offset = log(training class prior)``, so the raw logits learn
the class-balanced posterior; the distillation term compares raw logits with the teacher's.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from slimvit.config import DistillConfig
from slimvit.errors import ConfigError

LossFn = Callable[..., dict[str, torch.Tensor]]
LOSSES: dict[str, Callable[..., LossFn]] = {}


def register(name: str):
    def deco(fn):
        LOSSES[name] = fn
        return fn

    return deco


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    label_smoothing: float = 0.0,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy for class indices (N,) or soft targets (N, C) (mixup/cutmix); `offset` (C,), on the
    logits' device, is added to the logits first (logit adjustment)."""
    logits = logits.float() if offset is None else logits.float() + offset
    if target.ndim == 2:
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing)


def soft_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on temperature-scaled logits, x T^2 (Hinton et al. 2015)."""
    t = temperature
    log_p = F.log_softmax(student.float() / t, dim=-1)
    log_q = F.log_softmax(teacher.float() / t, dim=-1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * (t * t)


def _single(out) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        raise ConfigError(
            "the student has a distillation token; use distill.loss=token with a *_distilled_* model"
        )
    return out


@register("none")
def _none(cfg: DistillConfig | None, label_smoothing: float, offset: torch.Tensor | None = None) -> LossFn:
    def fn(out, teacher_logits, target):
        task = cross_entropy(_single(out), target, label_smoothing, offset)
        return {"loss": task, "task_loss": task, "kd_loss": torch.zeros_like(task)}

    return fn


@register("soft")
def _soft(cfg: DistillConfig, label_smoothing: float, offset: torch.Tensor | None = None) -> LossFn:
    def fn(out, teacher_logits, target):
        out = _single(out)
        task = cross_entropy(out, target, label_smoothing, offset)
        kd = soft_kd(out, teacher_logits, cfg.temperature)
        return {"loss": (1 - cfg.alpha) * task + cfg.alpha * kd, "task_loss": task, "kd_loss": kd}

    return fn


@register("hard")
def _hard(cfg: DistillConfig, label_smoothing: float, offset: torch.Tensor | None = None) -> LossFn:
    """DeiT hard distillation: cross-entropy to the teacher's argmax."""

    def fn(out, teacher_logits, target):
        out = _single(out)
        task = cross_entropy(out, target, label_smoothing, offset)
        kd = F.cross_entropy(out.float(), teacher_logits.argmax(-1))
        return {"loss": (1 - cfg.alpha) * task + cfg.alpha * kd, "task_loss": task, "kd_loss": kd}

    return fn


@register("token")
def _token(cfg: DistillConfig, label_smoothing: float, offset: torch.Tensor | None = None) -> LossFn:
    """DeiT distillation token: the class head learns the labels, the distillation head the teacher."""

    def fn(out, teacher_logits, target):
        if not isinstance(out, (tuple, list)):
            raise ConfigError(
                "distill.loss=token needs a student with a distillation token (e.g. deit_tiny_distilled_patch16_224)"
            )
        cls_out, dist_out = out
        task = cross_entropy(cls_out, target, label_smoothing, offset)
        kd = F.cross_entropy(dist_out.float(), teacher_logits.argmax(-1))
        return {"loss": (1 - cfg.alpha) * task + cfg.alpha * kd, "task_loss": task, "kd_loss": kd}

    return fn


def make_loss(
    cfg: DistillConfig | None, label_smoothing: float, offset: torch.Tensor | None = None
) -> LossFn:
    """The loss of `cfg.loss` (`none` without a cfg); `offset` (C,) logit-adjusts its label term."""
    name = "none" if cfg is None else cfg.loss
    if name not in LOSSES:
        raise ConfigError(f"unknown distillation loss '{name}'; known: {', '.join(LOSSES)}")
    return LOSSES[name](cfg, label_smoothing, offset)


def logit_offset(labels: torch.Tensor | np.ndarray | list[int], num_classes: int) -> torch.Tensor:
    """log(class prior) of a training split's labels (a class without images counts as one)."""
    counts = torch.bincount(torch.as_tensor(labels, dtype=torch.long), minlength=num_classes).clamp(min=1)
    return torch.log(counts.double() / counts.sum()).float()
