"""Typed, frozen configuration with YAML presets and ``section.key=value`` overrides.

A config is a tree of frozen dataclasses. Presets live in ``slimvit/presets/*.yaml`` and only
list the values that differ from the defaults below. ``load_config`` merges preset, user file
and overrides (in that order), validates everything in ``__post_init__`` and returns a
:class:`Config`. ``Config.to_dict`` / ``Config.from_dict`` round-trip through plain dicts, which
is what gets saved as ``config.yaml`` in the run folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from slimvit.errors import ConfigError


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _check_choice(name: str, value: Any, choices: typing.Iterable[Any]) -> None:
    choices = list(choices)
    _check(value in choices, f"{name}={value!r} is not one of {choices}")


@dataclass(frozen=True)
class DataConfig:
    path: str | None = None
    """Dataset folder; None means $SLIMVIT_DATA or data/NEU-DET under the working directory."""
    img_size: int = 96
    """Square input size in pixels; every model of a run uses the same one."""
    split: tuple[float, float, float] = (0.7, 0.1, 0.2)
    """Train/val/test fractions of each class (stratified)."""
    seed: int = 0
    """Seed of the split."""
    split_by: str = "file"
    """`file`: each file goes to train, val or test on its own. `sequence`: each class's files, in name order,
    are cut into ten runs of consecutive files and whole runs are assigned, so images taken one after another
    do not sit on both sides (a guard for captures named in order; on NEU-DET subsets it did not bring the
    test figure closer to the one on the folder's other files: docs/experiments/small-data.md)."""
    cache: bool = True
    """Decode every image once and keep it in memory (NEU-DET is about 90 MB at 128 px)."""

    def __post_init__(self) -> None:
        _check(16 <= self.img_size <= 1024, f"data.img_size={self.img_size} must be in [16, 1024]")
        _check(len(self.split) == 3, f"data.split needs 3 fractions (train, val, test), got {self.split}")
        _check(
            all(0 < f < 1 for f in self.split), f"data.split={self.split}: each fraction must be in (0, 1)"
        )
        _check(abs(sum(self.split) - 1) < 1e-6, f"data.split={self.split} must sum to 1")
        _check_choice("data.split_by", self.split_by, ("file", "sequence"))


@dataclass(frozen=True)
class ModelConfig:
    teacher: str = "resnet18"
    """timm name of the teacher."""
    teacher_pretrained: bool = False
    """Start the teacher from timm's pretrained weights (needs internet or a filled HF cache)."""
    teacher_weights: str | None = None
    """Local weights file (.safetensors, .pth, .bin) to start the teacher from."""
    teacher_kwargs: dict = field(default_factory=dict)
    """Extra keyword arguments for timm.create_model (e.g. drop_path_rate)."""
    student: str = "vit_tiny_patch16_224"
    """timm name of the student (a ViT; `deit_*_distilled_*` for the distillation-token loss)."""
    student_stem: str = "conv"
    """Token stem of the student: `patch` (timm's patch projection) or `conv` (3x3 conv stack)."""
    student_attention: str = "plain"
    """Attention of the student: `plain` (timm's) or `locality` (a learned temperature, no attention to
    itself: Lee et al. 2021, for small datasets; exported as standard ONNX ops, not the fused kernel)."""
    student_pretrained: bool = False
    """Start the student from timm's pretrained weights."""
    student_weights: str | None = None
    """Local weights file to start the student from."""
    student_kwargs: dict = field(default_factory=dict)
    """Extra keyword arguments for timm.create_model (e.g. drop_path_rate)."""

    def __post_init__(self) -> None:
        _check(bool(self.teacher), "model.teacher must name a timm model")
        _check(bool(self.student), "model.student must name a timm model")
        _check_choice("model.student_stem", self.student_stem, ("patch", "conv"))
        _check_choice("model.student_attention", self.student_attention, ("plain", "locality"))
        _check(isinstance(self.teacher_kwargs, dict), "model.teacher_kwargs must be a mapping")
        _check(isinstance(self.student_kwargs, dict), "model.student_kwargs must be a mapping")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 40
    """Student epochs."""
    teacher_epochs: int = 25
    """Teacher epochs."""
    batch_size: int = 64
    """Global batch size (split across processes when distributed)."""
    lr: float = 1e-3
    """Peak learning rate of the student (AdamW)."""
    teacher_lr: float = 2e-3
    """Peak learning rate of the teacher."""
    weight_decay: float = 0.05
    """AdamW weight decay (not applied to norms, biases, tokens, position embeddings)."""
    warmup_epochs: float = 2.0
    """Linear warm-up before the cosine decay."""
    min_lr_ratio: float = 0.01
    """Final learning rate as a fraction of the peak."""
    label_smoothing: float = 0.1
    """Label smoothing of the cross-entropy."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this value; 0 disables."""
    ema: bool = False
    """Keep an exponential moving average of the weights and select/evaluate on it."""
    ema_decay: float = 0.998
    """Largest decay of the EMA per step; it warms up from 0 (timm's `use_warmup`: 1 - (1 + step)^-2/3), so
    the random initialisation does not linger in a short from-scratch training."""
    precision: str = "auto"
    """Autocast precision: `auto`, `no`, `bf16`, or `fp16` (fp16 only on GPU). `auto` is bf16 where the
    hardware computes it natively (GPUs, CPUs with AVX-512 BF16 / AMX; measured 1.7-2.3x faster per
    training step on a 2-core AVX-512 BF16 CPU) and fp32 elsewhere: on AVX2-only CPUs bf16 is emulated
    and was measured about 20x slower."""
    channels_last: bool = True
    """Train in channels-last memory format (faster convolutions with oneDNN/cuDNN)."""
    crop: str = "pad"
    """Spatial augmentation: `pad` (pad-and-crop), `rrc` (random resized crop), or `none`. `pad` keeps the
    scale: on NEU-DET `rrc` cost 5 points, its zoom changing the size of the marks that tell classes apart."""
    crop_padding: int = 8
    """Padding in pixels for `pad` crops."""
    rrc_scale: tuple[float, float] = (0.5, 1.0)
    """Area range of `rrc` crops."""
    flips: bool = True
    """Random horizontal and vertical flips."""
    rot90: bool = True
    """Random 90-degree rotations (defect textures have no up)."""
    augment: str = "none"
    """Photometric and geometric augmentation policy before the crop: `none`, `trivial` (torchvision's
    TrivialAugmentWide: one random op at a random strength per image; Mueller & Hutter 2021) or `randaugment`
    (RandAugment, 2 ops at magnitude 9). Every training reads it: teacher, student and fine-tunes."""
    mixup: float = 0.0
    """Mixup alpha; 0 disables."""
    cutmix: float = 0.0
    """CutMix alpha; 0 disables."""
    threads: int = 0
    """torch intra-op threads for training; 0 keeps torch's default (all cores)."""
    seed: int = 0
    """Seed of initialisation, shuffling and augmentation."""
    balance: str = "auto"
    """Class balance of the training batches: `sampler` draws each epoch's images with replacement so
    every class comes equally often (teacher, student and fine-tunes); `none` uses every image once per
    epoch; `logit` uses every image once per epoch with a logit-adjusted label loss (Menon et al. 2021:
    the cross-entropy sees the logits plus log(training class prior), so the model's own logits are
    class-balanced; the distillation term is unchanged; the logged training loss is the adjusted one);
    `auto` is `sampler` when the largest training class has 1.5x the images of the smallest or more, else
    `none` (a balanced dataset trains exactly as before). On the imbalanced NEU-DET subsets `logit` gave
    better students than `sampler` but worse pruned models (README, "Imbalanced data"), so `auto` keeps
    the sampler."""
    steps_floor_images: int = 0
    """Give a training split smaller than this many images as many optimizer steps as this many would
    get: the epochs of the teacher, the student and the fine-tune caps are multiplied by this / the
    training images (rounded). 0 keeps the epochs as set. The `neu-det` preset sets 1260 (NEU-DET's
    training split), so its recipe keeps its number of steps on a smaller dataset: on a 546-image subset
    a 30-epoch ResNet-18 teacher reached 85.9% test accuracy, the same teacher with NEU-DET's steps
    (71 epochs) 95.5%."""
    resize_from: int = 0
    """Progressive resizing of the teacher's and the student's training (not the pruning fine-tunes): the
    first epoch trains on batches downscaled to this many pixels, the size grows linearly, in steps of
    16 px, to data.img_size at `train.resize_until` of the epochs, and the rest train at full size.
    Validation always runs at full size. 0 trains every epoch at data.img_size."""
    resize_until: float = 0.75
    """Fraction of a training's epochs after which every epoch runs at data.img_size (`train.resize_from`)."""
    patience: int = 0
    """Stop a training when its best validation epoch is this many epochs old; 0 never stops early.
    Under the cosine schedule validation keeps improving until the learning rate is low, so the default
    recipe spends its time through a shorter schedule instead (docs/decisions.md)."""
    select_from: float = 0.0
    """Which epochs of the student's training (and its no-distillation twin's) compete for the kept weights:
    those after this fraction of the epochs, the best on validation among them; 0 lets every epoch compete,
    1 keeps the last epoch. On few validation images the best of many epochs is partly luck: a spike while
    the learning rate is still high can win by one image and lose on new ones (docs/experiments/
    epoch-selection.md). The teacher keeps its best validation epoch; the pruning fine-tunes have their
    own rule (`prune.select_from`, `prune.recover`)."""

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, f"train.epochs={self.epochs} must be >= 1")
        _check(self.teacher_epochs >= 1, f"train.teacher_epochs={self.teacher_epochs} must be >= 1")
        _check(self.batch_size >= 1, f"train.batch_size={self.batch_size} must be >= 1")
        _check(0 < self.lr < 1, f"train.lr={self.lr} must be in (0, 1)")
        _check(0 < self.teacher_lr < 1, f"train.teacher_lr={self.teacher_lr} must be in (0, 1)")
        _check(self.weight_decay >= 0, f"train.weight_decay={self.weight_decay} must be >= 0")
        _check(self.warmup_epochs >= 0, f"train.warmup_epochs={self.warmup_epochs} must be >= 0")
        _check(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        _check(
            0 <= self.label_smoothing < 1, f"train.label_smoothing={self.label_smoothing} must be in [0, 1)"
        )
        _check(self.grad_clip >= 0, f"train.grad_clip={self.grad_clip} must be >= 0")
        _check(0 < self.ema_decay < 1, f"train.ema_decay={self.ema_decay} must be in (0, 1)")
        _check_choice("train.precision", self.precision, ("auto", "no", "bf16", "fp16"))
        _check_choice("train.crop", self.crop, ("pad", "rrc", "none"))
        _check_choice("train.augment", self.augment, ("none", "trivial", "randaugment"))
        _check(self.crop_padding >= 0, f"train.crop_padding={self.crop_padding} must be >= 0")
        lo, hi = self.rrc_scale
        _check(0 < lo <= hi <= 1, f"train.rrc_scale={self.rrc_scale} must satisfy 0 < min <= max <= 1")
        _check(self.mixup >= 0 and self.cutmix >= 0, "train.mixup and train.cutmix must be >= 0")
        _check(self.threads >= 0, f"train.threads={self.threads} must be >= 0")
        _check_choice("train.balance", self.balance, ("auto", "none", "sampler", "logit"))
        _check(self.patience >= 0, f"train.patience={self.patience} must be >= 0")
        _check(0 <= self.select_from <= 1, f"train.select_from={self.select_from} must be in [0, 1]")
        _check(
            self.resize_from == 0 or (self.resize_from >= 16 and self.resize_from % 16 == 0),
            f"train.resize_from={self.resize_from} must be 0 (off) or a multiple of 16 px (the ViT's patch)",
        )
        _check(0 < self.resize_until <= 1, f"train.resize_until={self.resize_until} must be in (0, 1]")
        _check(
            self.steps_floor_images >= 0, f"train.steps_floor_images={self.steps_floor_images} must be >= 0"
        )


DISTILL_LOSSES = ("none", "soft", "hard", "token")


@dataclass(frozen=True)
class DistillConfig:
    loss: str = "soft"
    """`none`, `soft` (KL at temperature T), `hard` (DeiT hard labels), `token` (DeiT distillation token)."""
    alpha: float = 0.7
    """Weight of the distillation term; 1 - alpha goes to the label cross-entropy."""
    temperature: float = 2.0
    """Softmax temperature of the `soft` loss."""
    ablation: bool = False
    """Also train the same student without distillation, for the report's paired comparison (opt-in: it
    costs as much as the student itself, ~25% of the default pipeline)."""
    teacher_logits: str = "cached"
    """`cached`: the teacher runs once per training image before a training starts, on each of the
    flips/rotations the augmentation draws from (8 with `train.flips` and `train.rot90`), and the
    student learns from the logits averaged over them; the training steps then run no teacher. `live`:
    the teacher runs on every augmented batch (always so with mixup/cutmix, whose mixed images have no
    per-image logits)."""

    def __post_init__(self) -> None:
        _check_choice("distill.loss", self.loss, DISTILL_LOSSES)
        _check(0 <= self.alpha <= 1, f"distill.alpha={self.alpha} must be in [0, 1]")
        _check(self.temperature > 0, f"distill.temperature={self.temperature} must be > 0")
        _check_choice("distill.teacher_logits", self.teacher_logits, ("cached", "live"))


@dataclass(frozen=True)
class PruneConfig:
    ratio: float = 0.2
    """Fraction of channels to remove from each pruned group."""
    round_to: int = 8
    """Keep pruned widths multiples of this (SIMD-friendly)."""
    importance: str = "taylor"
    """Importance criterion: `taylor`, `l2`, or `random`."""
    global_pruning: bool = False
    """Rank channels across layers (global) instead of pruning each layer by the same ratio; the global
    threshold keeps at most as many block weights as the uniform plan, so `ratio` means about the same."""
    iterative_steps: int = 1
    """Prune in this many steps (Taylor importance is re-estimated between steps)."""
    prune_heads: bool = True
    """Remove whole heads where the ratio allows, besides head dimensions."""
    prune_embed: bool = True
    """Also prune the embedding width (residual stream)."""
    taylor_batches: int = 4
    """Training batches used to estimate Taylor importance."""
    finetune_epochs: int = 10
    """Most fine-tuning epochs after pruning (with distillation, see `teacher`); see `recover`."""
    recover: bool = True
    """Stop each fine-tune (main and sweep) after the first trained epoch that is the best so far and
    whose validation balanced accuracy is back to the student's, less `recover_tolerance`;
    `finetune_epochs` / `sweep_epochs` are the cap. A pruned model that ties the student before any
    training (a small validation split cannot tell them apart) is still fine-tuned, for at least
    `finetune_floor` of its epochs and until `recover_agreement`. False always runs the full count."""
    recover_tolerance: float = 0.0
    """Validation balanced-accuracy points (in %) a fine-tune may stay below the student and count as
    recovered."""
    recover_agreement: float = 99.0
    """With `recover`: a fine-tune counts as recovered only once its best epoch also names the student's
    class on this share (%) of the validation images and their flips and 180-degree rotation (4 views
    each). Validation accuracy saturates on a small split (18 images: every pruned model at 100% after
    one epoch); agreement with the student on 4x the views saturates later (README, "Small datasets")."""
    finetune_floor: float = 0.5
    """With `recover`: a fine-tune runs at least this fraction of its epochs (after
    `train.steps_floor_images` raised them for a small split) before it may stop as recovered, so a
    small dataset's fine-tune gets at least half the optimizer steps NEU-DET's does."""
    select_from: float = 0.0
    """Only the epochs after this fraction of each fine-tune's epochs (main and sweep) compete for its kept
    weights, and `recover` may stop it from the first of them on: `train.select_from` for the fine-tunes.
    0: every trained epoch (what slimvit did before this key existed); 1: the epoch it ends at, its cap.
    On a small validation split accuracy ties across epochs and the tie goes to the epoch closest to the
    student, often an early one: a 780-image NEU-DET subset's r=0.2 fine-tune ran its 23 epochs and kept
    epoch 2, throwing away the steps `finetune_floor` asked for. The `neu-det` preset's choice is 1: on
    validation images the choice did not see (split halves, `scripts/finetune_levers.py`) the last epoch
    scored 1.0 point above the best-epoch pick over NEU-DET and its subsets (docs/decisions.md)."""
    finetune_lr: float = 5e-4
    """Peak learning rate of the fine-tuning."""
    teacher: str = "teacher"
    """Whom each fine-tune distils from: `teacher`, the run's teacher (what slimvit did before this key
    existed, so a run folder made then is read as such), or `student`, the unpruned distilled student the
    pruned model came from (what the fine-tune must recover; the `neu-det` preset's choice: there it is
    also the more accurate of the two on validation, 98.9% against the ResNet-18 teacher's 95.6%)."""
    sweep: tuple[float, ...] = ()
    """Ratios for `slimvit prune --sweep` (empty: no sweep in `slimvit run`)."""
    sweep_epochs: int = 5
    """Fine-tuning epochs of each sweep point."""
    sweep_from: str = "previous"
    """`previous`: prune each sweep ratio from the model of the next lower ratio (iterative; the main
    pruned model stands for its own ratio); `student`: every ratio from the distilled student."""
    depths: tuple[int, ...] = ()
    """Depth pruning: for each ratio of the sweep, also a candidate cut to each of these numbers of
    transformer blocks (whole blocks removed, `vit_pruning.block_drop_order`, then fine-tuned for
    `sweep_epochs`), in `sweep/r<ratio>-d<depth>`. At batch 1 a small ViT's latency is mostly per-layer
    overhead, which only fewer layers remove. Empty: widths only."""

    def __post_init__(self) -> None:
        _check(0 < self.ratio < 1, f"prune.ratio={self.ratio} must be in (0, 1)")
        _check(self.round_to >= 1, f"prune.round_to={self.round_to} must be >= 1")
        _check_choice("prune.importance", self.importance, ("taylor", "l2", "random"))
        _check(self.iterative_steps >= 1, f"prune.iterative_steps={self.iterative_steps} must be >= 1")
        _check(self.taylor_batches >= 1, f"prune.taylor_batches={self.taylor_batches} must be >= 1")
        _check(self.finetune_epochs >= 0, f"prune.finetune_epochs={self.finetune_epochs} must be >= 0")
        _check(
            0 <= self.recover_tolerance < 100,
            f"prune.recover_tolerance={self.recover_tolerance} must be in [0, 100) (points)",
        )
        _check(0 < self.finetune_lr < 1, f"prune.finetune_lr={self.finetune_lr} must be in (0, 1)")
        _check(
            0 <= self.recover_agreement <= 100,
            f"prune.recover_agreement={self.recover_agreement} must be in [0, 100] (%)",
        )
        _check(0 <= self.finetune_floor <= 1, f"prune.finetune_floor={self.finetune_floor} must be in [0, 1]")
        _check(0 <= self.select_from <= 1, f"prune.select_from={self.select_from} must be in [0, 1]")
        _check(all(0 < r < 1 for r in self.sweep), f"prune.sweep={self.sweep}: every ratio must be in (0, 1)")
        _check(self.sweep_epochs >= 0, f"prune.sweep_epochs={self.sweep_epochs} must be >= 0")
        _check_choice("prune.sweep_from", self.sweep_from, ("previous", "student"))
        _check(
            all(isinstance(d, int) and d >= 1 for d in self.depths),
            f"prune.depths={self.depths}: every depth must be a whole number of blocks >= 1",
        )
        _check(
            not self.depths or self.sweep,
            f"prune.depths={self.depths} cuts sweep models: set a prune.sweep, or prune.depths=[]",
        )
        _check_choice("prune.teacher", self.teacher, ("teacher", "student"))


@dataclass(frozen=True)
class QuantizeConfig:
    opset: int = 18
    """ONNX opset of the export (>= 17; 18 is what the torch.export-based exporter writes natively)."""
    fuse_attention: bool = True
    """Export ViT attention as ONNX Runtime's fused `com.microsoft.Attention` op (needed for INT8
    attention; much faster at batch 1); false writes standard ONNX ops only."""
    modes: tuple[str, ...] = ("fp16", "int8-dynamic", "int8-static", "int8-mixed")
    """Variants to build from the pruned model."""
    calibration: str = "minmax"
    """Static calibration method: `minmax`, `percentile`, or `entropy`."""
    calibration_images: int = 128
    """Training images used to calibrate static INT8."""
    static_op_types: tuple[str, ...] = ("MatMul", "Conv")
    """Op types quantized by static INT8 (the rest stays float); `int8-mixed` takes those not in
    `dynamic_op_types` from here."""
    dynamic_op_types: tuple[str, ...] = ("MatMul", "Attention")
    """Op types quantized by dynamic INT8."""
    per_channel: bool = True
    """Per-channel weight scales for static INT8."""
    static_activations: str = "uint8"
    """Activation type of static INT8: `uint8` (asymmetric; the fast u8s8 kernels on x86) or `int8`."""
    reduce_range: bool = True
    """7-bit weights (|w| <= 64) in every int8 product. x86 CPUs without VNNI (AVX2, AVX-512 without
    VNNI) multiply uint8 x int8 with VPMADDUBSW, whose sum of two products saturates at 16 bits:
    255 x 127 x 2 overflows, 255 x 64 x 2 does not. With full 8-bit weights a model validated on a VNNI
    CPU lost 8 points on an AVX2 one; false keeps 8-bit weights, and such variants are marked
    VNNI-only (`portable: false`) and never deployed."""
    optimize: bool = True
    """Run ONNX Runtime's transformer fusions on exported ViTs (BiasGelu; residual add + LayerNorm is
    left unfused, see `runtime.SLOW_FUSIONS`) and its graph optimisations (`quant_pre_process`)
    before static calibration."""

    def __post_init__(self) -> None:
        _check(self.opset >= 17, f"quantize.opset={self.opset} must be >= 17")
        for m in self.modes:
            _check_choice("quantize.modes entry", m, ("fp16", "int8-dynamic", "int8-static", "int8-mixed"))
        _check_choice("quantize.calibration", self.calibration, ("minmax", "percentile", "entropy"))
        _check_choice("quantize.static_activations", self.static_activations, ("uint8", "int8"))
        _check(
            self.calibration_images >= 8,
            f"quantize.calibration_images={self.calibration_images} must be >= 8",
        )
        _check(len(self.static_op_types) > 0, "quantize.static_op_types must not be empty")
        _check(len(self.dynamic_op_types) > 0, "quantize.dynamic_op_types must not be empty")


@dataclass(frozen=True)
class BenchConfig:
    threads: int = 2
    """Intra-op threads for every timed runtime (PyTorch and ONNX Runtime alike)."""
    warmup: int = 20
    """Untimed runs before timing."""
    runs: int = 200
    """Timed batch-1 runs per variant (split across rounds). 200 (was 300): a p50 of 200 calls, its standard
    error 1.2x that of 300, for a third less of the bench stage's time."""
    rounds: int = 10
    """Interleaved rounds: each round times every variant once (a short block of runs), so drift and
    slow spells of a shared machine hit all variants alike."""
    block_warmup: int = 10
    """Untimed batch-1 calls opening each block. Here the first calls after switching from one ORT
    session to another ran up to 2-3x slower (median by position in the block over 30 rounds) and
    settled after 5-8 calls; a deployed model runs alone."""
    throughput_batch: int = 32
    """Batch size of the throughput measurement."""
    throughput_runs: int = 3
    """Timed batches per variant for throughput (each of `throughput_batch` images, the median kept)."""
    unlabeled: str | None = None
    """A folder of images without labels (production images; `--unlabeled DIR`): every candidate's
    agreement with the student is also measured on them (at most `unlabeled_max`, a seeded sample),
    beside the validation images and their flips/rotations. None: validation views only."""
    unlabeled_max: int = 2000
    """Most unlabeled images read (a seeded sample of a larger folder)."""

    def __post_init__(self) -> None:
        _check(self.unlabeled_max >= 1, f"bench.unlabeled_max={self.unlabeled_max} must be >= 1")
        _check(self.threads >= 1, f"bench.threads={self.threads} must be >= 1")
        _check(self.warmup >= 0, f"bench.warmup={self.warmup} must be >= 0")
        _check(self.runs >= 1, f"bench.runs={self.runs} must be >= 1")
        _check(self.rounds >= 1, f"bench.rounds={self.rounds} must be >= 1")
        _check(self.block_warmup >= 0, f"bench.block_warmup={self.block_warmup} must be >= 0")
        _check(self.throughput_batch >= 1, f"bench.throughput_batch={self.throughput_batch} must be >= 1")
        _check(self.throughput_runs >= 1, f"bench.throughput_runs={self.throughput_runs} must be >= 1")


@dataclass(frozen=True)
class DeployConfig:
    """What `slimvit bench` / `slimvit deploy` deploy: chosen on validation accuracy, never on test."""

    budget_ms: float | None = None
    """Batch-1 latency budget in ms (p50 measured by the bench at `bench.threads`); None: no budget."""
    budget_mb: float | None = None
    """File size budget in MB; None: no budget."""
    max_drop: float = 0.5
    """Validation accuracy points a deployed model may lose against the distilled student (at least one
    validation image is always allowed: with 180 images one image is 0.56 points)."""
    min_agreement: float = 95.0
    """Share (%) of the validation images, their flips/rotations and any `--unlabeled` images on which a
    deployed model must name the same class as the distilled student. A label-free check that does not
    saturate: on a small validation split every candidate can score 100% while the most compressed ones
    disagree with the student on a third of new images (README, "Small datasets")."""
    min_speedup: float = 2.0
    """When validation cannot tell the candidates apart (`deploy.saturated`), the least compressed candidate
    that is at least this many times faster at batch 1 than the student's ONNX FP32 file is deployed: the
    smallest cut that still buys what compression is for (1 or less: no speed floor, the least compressed)."""

    review_rate: float | None = None
    """Send at most this fraction of images to a person (`--review-rate 0.05`): the deployed model labels
    an image `review` when its calibrated confidence is below a threshold chosen on validation. None: no
    review."""
    target_accuracy: float | None = None
    """Instead of `review_rate`: the lowest confidence threshold whose accepted validation images reach this
    accuracy (%, `--target-accuracy 99.5`); the rest go to review."""

    def __post_init__(self) -> None:
        _check(
            self.review_rate is None or (math.isfinite(self.review_rate) and 0 <= self.review_rate < 1),
            f"deploy.review_rate={self.review_rate} must be a fraction in [0, 1) (0.05 sends 5% to review)",
        )
        _check(
            self.target_accuracy is None
            or (math.isfinite(self.target_accuracy) and 0 < self.target_accuracy <= 100),
            f"deploy.target_accuracy={self.target_accuracy} must be in (0, 100] (%)",
        )
        _check(
            self.review_rate is None or self.target_accuracy is None,
            "deploy.review_rate and deploy.target_accuracy choose the same threshold: give one of them",
        )
        for name in ("budget_ms", "budget_mb"):
            v = getattr(self, name)
            _check(v is None or (math.isfinite(v) and v > 0), f"deploy.{name}={v} must be a number > 0")
        _check(
            math.isfinite(self.max_drop) and 0 <= self.max_drop <= 100,
            f"deploy.max_drop={self.max_drop} must be in [0, 100] (accuracy points)",
        )
        _check(
            math.isfinite(self.min_agreement) and 0 <= self.min_agreement <= 100,
            f"deploy.min_agreement={self.min_agreement} must be in [0, 100] (%)",
        )
        _check(
            math.isfinite(self.min_speedup) and self.min_speedup >= 0,
            f"deploy.min_speedup={self.min_speedup} must be a number >= 0 (times the student's ONNX FP32 speed)",
        )


@dataclass(frozen=True)
class Config:
    preset: str = "neu-det"
    """Name of the preset this config started from (informational)."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)

    def to_dict(self) -> dict:
        """Plain dict (tuples become lists) that `from_dict` turns back into an equal Config."""
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        return _build(cls, d, "")

    def replace(self, **sections: Any) -> Config:
        return dataclasses.replace(self, **sections)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if f.name != "preset")


def _to_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


_YAML11_BOOLS = {w: True for w in ("yes", "y", "on")} | {w: False for w in ("no", "n", "off")}


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Turn a YAML value into the annotated type, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: bad value {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}={value!r} must be a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], name) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{name}={list(value)} must have {len(args)} entries")
        return tuple(_coerce(v, a, name) for v, a in zip(value, args, strict=True))
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}={value!r} must be a mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _YAML11_BOOLS:  # from --set, kept as typed
            return _YAML11_BOOLS[value.lower()]
        raise ConfigError(f"{name}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name}={value!r} must be an integer")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{name}={value!r} must be a number")
        if not math.isfinite(number):  # .inf / nan pass every range check below and fail much later
            raise ConfigError(f"{name}={value!r} must be a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):
            raise ConfigError(
                f"{name}={value!r} must be a string; YAML reads an unquoted no/yes/off/on as a boolean: "
                f'quote it ({name.rsplit(".", 1)[-1]}: "no")'
            )
        raise ConfigError(f"{name}={value!r} must be a string")
    raise ConfigError(f"{name}: unsupported type {_type_name(tp)}")


def _build(cls: type, d: Any, prefix: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in d if k not in names]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, names, n=1)
        hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(names)}"
        raise ConfigError(f"unknown config key '{prefix}{k}'{hint}")
    kwargs = {}
    for name in names:
        if name not in d:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, d[name] if d[name] is not None else {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(d[name], tp, f"{prefix}{name}")
    return cls(**kwargs)


def _deep_merge(base: dict, upd: dict) -> dict:
    out = dict(base)
    for k, v in upd.items():
        if (
            isinstance(v, dict)
            and isinstance(out.get(k), dict)
            and k not in ("teacher_kwargs", "student_kwargs")
        ):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def preset_names() -> list[str]:
    files = resources.files("slimvit") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in files.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, source: str) -> dict:
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            f"{source} is not valid YAML ({getattr(e, 'problem', None) or 'parse error'}{where})"
        ) from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{source} must hold a mapping of sections, got {type(d).__name__}")
    return _nest_dotted(d)


def _nest_dotted(d: dict) -> dict:
    """``train.epochs: 5`` at the top of a config file means ``train: {epochs: 5}``."""
    out: dict = {}
    for k, v in d.items():
        if isinstance(k, str) and "." in k.strip("."):
            section, _, key = k.partition(".")
            v = _nest_dotted({key: v})
            k = section
        out = _deep_merge(out, {k: v})
    return out


def load_preset(name: str) -> dict:
    names = preset_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown preset '{name}'; available: {', '.join(names)}.{hint}")
    text = (resources.files("slimvit") / "presets" / f"{name}.yaml").read_text()
    d = _read_yaml(text, f"preset '{name}'")
    d.setdefault("preset", name)
    return d


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value``; the value is read as YAML (so 0.2, true, [1, 2] work)."""
    if "=" not in item:
        raise ConfigError(f"--set '{item}' must look like section.key=value")
    key, _, raw = item.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if len(parts) < 2:
        raise ConfigError(f"--set '{item}': the key must be section.key, e.g. train.epochs=10")
    if parts[0] not in SECTIONS:
        close = difflib.get_close_matches(parts[0], SECTIONS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; sections: {', '.join(SECTIONS)}"
        raise ConfigError(f"--set '{item}': unknown section '{parts[0]}'{hint}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
        value = raw.strip()  # `train.precision=no` means the word; a true/false key still takes it (_coerce)
    return parts, value


DEFAULT_PRESET = "neu-det"


def load_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: typing.Sequence[str] = (),
    data_path: str | None = None,
) -> Config:
    """Preset, then user YAML file, then ``--set`` overrides, then the dataset path; validated.

    Args:
        preset: the base; None means the config file's ``preset:`` if it has one, else `DEFAULT_PRESET`.
            A file holding only ``train.teacher_epochs: 25`` changes that one value of the preset.
        data_path: ``--data``, taken literally as ``data.path`` (never read as YAML: ``null``, ``2024``
            or ``#mine`` are folder names).
    """
    user: dict = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        user = _read_yaml(path.read_text(), f"config file '{path}'")
    base = preset or user.get("preset") or DEFAULT_PRESET
    if not isinstance(base, str):
        raise ConfigError(f"config file '{config_file}': preset={base!r} must be a preset name")
    d = _deep_merge(load_preset(base), user)
    d["preset"] = base
    _set(d, overrides)
    if data_path is not None:
        data = d.setdefault("data", {})
        if not isinstance(data, dict):
            raise ConfigError(f"config section 'data' must be a mapping, got {data!r}")
        data["path"] = str(data_path)
    return Config.from_dict(d)


def save_config(cfg: Config, path: Path) -> None:
    from slimvit.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _set(d: dict, overrides: typing.Sequence[str]) -> None:
    """``--set section.key=value`` items written into the nested dict `d`."""
    for item in overrides:
        parts, value = parse_override(item)
        node = d
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set '{item}': '{p}' is not a section")
        node[parts[-1]] = value


def read_config(path: Path, overrides: typing.Sequence[str] = ()) -> Config:
    """A run folder's saved config.yaml as the run was made, then `overrides` (``section.key=value``).

    Not over today's preset (as `load_config` reads a user's file): a key the file lacks was added in a
    newer slimvit, and takes its dataclass default, the value that reproduces the old behaviour (the same
    reading as manifest.input_changes). A preset changed since cannot change what an old run was."""
    d = _read_yaml(Path(path).read_text(), str(path))
    _set(d, overrides)
    return Config.from_dict(d)


# --------------------------------------------------------------------------- the keys, described


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (PEP 257 attribute docstrings, read from the source:
    Python keeps none at run time)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    out = {}
    for node, nxt in zip(body, [*body[1:], None], strict=True):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            out[node.target.id] = " ".join(nxt.value.value.split())
    return out


def describe_keys(preset: str | None = None) -> list[dict]:
    """Every `section.key`: its type, default (the dataclass's), the preset's value, and its description
    (the field's docstring), in the order the dataclasses declare them."""
    chosen = Config.from_dict({**load_preset(preset or DEFAULT_PRESET), "preset": preset or DEFAULT_PRESET})
    defaults = Config()
    rows = []
    for section in SECTIONS:
        cls = type(getattr(defaults, section))
        docs = _field_docs(cls)
        for f in dataclasses.fields(cls):
            rows.append(
                {
                    "key": f"{section}.{f.name}",
                    "type": str(f.type),
                    "default": _to_plain(getattr(getattr(defaults, section), f.name)),
                    "preset": _to_plain(getattr(getattr(chosen, section), f.name)),
                    "doc": docs.get(f.name, ""),
                }
            )
    return rows


def select_keys(rows: list[dict], key: str | None) -> list[dict]:
    """The rows of one key or one section (`train`, `train.`); ConfigError with a suggestion otherwise."""
    if not key:
        return rows
    if key.rstrip(".") in SECTIONS:
        return [r for r in rows if r["key"].startswith(key.rstrip(".") + ".")]
    hit = [r for r in rows if r["key"] == key]
    if hit:
        return hit
    close = difflib.get_close_matches(key, [r["key"] for r in rows], n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; sections: {', '.join(SECTIONS)}"
    raise ConfigError(f"unknown config key '{key}'{hint}")
