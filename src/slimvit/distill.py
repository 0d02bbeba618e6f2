"""Distillation: the losses (a registry: soft KD, DeiT hard distillation, the distillation token) and the
teacher's side: the teacher a student distils from, fed the student's inputs in its own normalisation, and
its logits, computed once before training.

The `distill` stage itself is `train.run_distill`: this module knows losses and teachers, not training.

Every loss takes the student's output, the teacher's logits (None for `none`) and the targets,
and returns its parts: ``{"loss", "task_loss", "kd_loss"}``. With an ``offset`` (per class) the
label term is logit-adjusted (Menon et al. 2021, "Long-tail learning via logit adjustment"): the
cross-entropy sees ``logits + offset``, ``offset = log(training class prior)``, so the raw logits learn
the class-balanced posterior; the distillation term compares raw logits with the teacher's.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slimvit import models
from slimvit.config import DistillConfig, TrainConfig
from slimvit.data import EvalDataset
from slimvit.errors import ConfigError, ModelError
from slimvit.io import atomic_path, is_main_process
from slimvit.layout import TRAIN
from slimvit.recipe import autocast_context, views
from slimvit.spec import ModelSpec

log = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------- the teacher


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
    if not (path / TRAIN).exists():
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


# --------------------------------------------------------------------------- the teacher's logits, cached


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


class LogitsMemo:
    """The last teacher logits `cache_teacher_logits` computed, by key (`_memo_key`: the teacher's weights,
    the images, the views, the precision, the device), kept across fits that distil from one teacher on one
    training set: the sweep's fine-tunes, and the prune stage's before them. With a `path` (safetensors, the
    key in its metadata) they outlive the process: the prune stage writes them (`write=True`), the sweep
    reads them, so `slimvit run` computes the student's logits once, not once per stage. A file of another
    key, or one that cannot be read, is not used."""

    def __init__(self, path: Path | None = None, write: bool = False) -> None:
        self.path, self.write = path, write
        self.key: str | None = None
        self.logits: torch.Tensor | None = None

    def get(self, key: str) -> torch.Tensor | None:
        if key != self.key and self.path is not None and self.path.exists():
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(str(self.path), framework="pt") as f:
                    if (f.metadata() or {}).get("key") == key:
                        self.key, self.logits = key, f.get_tensor("logits")
            except (SafetensorError, OSError, KeyError) as e:
                log.warning("teacher logits in '%s' not read (%s); computing them", self.path, e)
        return self.logits if key == self.key else None

    def put(self, key: str, logits: torch.Tensor) -> None:
        self.key, self.logits = key, logits
        if self.write and self.path is not None and is_main_process():
            from safetensors.torch import save_file

            with atomic_path(self.path) as tmp:
                save_file({"logits": logits.contiguous()}, str(tmp), metadata={"key": key})


def cache_teacher_logits(
    teacher,
    train: EvalDataset,
    tcfg: TrainConfig,
    precision: str,
    device,
    desc: str,
    memo: LogitsMemo | None = None,
):
    """The teacher's view-averaged logits of every training image, and the seconds they took; `memo`
    keeps them for the next fit from the same teacher on the same images (the sweep's fine-tunes)."""
    key = _memo_key(teacher, train, tcfg, precision, device) if memo is not None else None
    if key is not None and (got := memo.get(key)) is not None:
        log.info("%s: teacher logits reused (the same teacher on the same images: %s)", desc, key[:8])
        return got, 0.0
    t0 = time.perf_counter()
    cached = teacher_logits(teacher, train, tcfg, precision, device)
    seconds = time.perf_counter() - t0
    if key is not None:
        memo.put(key, cached)
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
