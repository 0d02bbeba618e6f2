"""Structured pruning of a timm ViT with Torch-Pruning's dependency graph, and the `prune` stage.

What is pruned, per transformer block: the MLP hidden channels, the attention head dimensions and,
where the ratio allows, whole heads (``floor(ratio * num_heads)`` of them: ViT-Tiny's 3 heads lose
one head only from ratio 1/3 on); optionally the embedding width, i.e. the residual stream from the
stem's last convolution through every norm, token and position embedding to the classifier's
input. The classifier head(s) keep their outputs, and the conv stem's inner convolutions stay.

Torch-Pruning's :class:`~torch_pruning.DependencyGraph` finds every tensor coupled to a channel
(q, k and v rows behind one attention output dim; all residual-stream users of an embedding
channel) and removes them together; its importance criteria score the channels. The widths
themselves are planned here rather than by ``MetaPruner``, so that the whole-head / head-dim split
and ``round_to`` apply exactly: every pruned width (embedding, MLP hidden, head dim) is a multiple
of ``round_to``, and each kept head keeps its own best dims.

After pruning the model is still a plain timm ``VisionTransformer``: each ``Attention`` gets
``num_heads``/``head_dim``/``attn_dim``/``scale`` matching its new weights, so timm's own forward
(fused ``scaled_dot_product_attention``) runs unchanged, and no timm class is patched. The
artifact records the widths in ``model.json``; :func:`slimvit.vit.apply_widths` reshapes a freshly built model
to them so the weights load (``models.load`` calls it).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slimvit import models
from slimvit.config import PruneConfig
from slimvit.errors import ConfigError, ModelError
from slimvit.io import atomic_write_json, atomic_write_text, is_main_process, read_json
from slimvit.spec import BlockWidths, ModelSpec, Widths
from slimvit.timing import compare_latency, count_macs_params
from slimvit.vit import (
    VitParts,
    _set_embed_dim,
    _set_heads,
    check_attention,
    read_widths,
    vit_parts,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- importance criteria


@dataclass(frozen=True)
class Criterion:
    make: Callable[[], Any]
    """Returns a Torch-Pruning importance: group -> one score per channel of the group's root."""
    needs_gradients: bool = False
    """Scores read `.grad`: the loss is back-propagated on training batches before each step."""


IMPORTANCES: dict[str, Criterion] = {}


def register_importance(name: str, needs_gradients: bool = False):
    def deco(fn: Callable[[], Any]):
        IMPORTANCES[name] = Criterion(fn, needs_gradients)
        return fn

    return deco


@register_importance("taylor", needs_gradients=True)
def _taylor():
    """First-order Taylor |w * dL/dw| summed over the coupled group (Molchanov et al. 2019)."""
    import torch_pruning as tp

    return tp.importance.GroupTaylorImportance()


@register_importance("l2")
def _l2():
    """Group L2 norm of the coupled weights."""
    import torch_pruning as tp

    return tp.importance.GroupMagnitudeImportance(p=2)


@register_importance("random")
def _random():
    """Random scores: the baseline a real criterion must beat."""
    import torch_pruning as tp

    return tp.importance.RandomImportance()


def criterion(name: str) -> Criterion:
    if name not in IMPORTANCES:
        raise ConfigError(f"prune.importance={name!r} is not one of {list(IMPORTANCES)}")
    return IMPORTANCES[name]


def check_ratio(ratio: Any) -> float:
    """A pruning ratio in (0, 1), or ConfigError."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise ConfigError(f"pruning ratio {ratio!r} must be a number in (0, 1), e.g. 0.2")
    return float(ratio)


# --------------------------------------------------------------------------- planning the widths


def _round_keep(x: float, current: int, round_to: int) -> int:
    """Channels to keep: `x` rounded down to a multiple of `round_to`, at least one multiple, at most `current`.

    A width of `round_to` or less cannot shrink while staying a multiple of it, so it is kept.
    """
    if current <= round_to:
        return current
    return min(current, max(round_to, int(math.floor(x / round_to + 1e-9)) * round_to))


def uniform_widths(initial: Widths, current: Widths, frac: float, pcfg: PruneConfig) -> Widths:
    """Target widths removing `frac` of every group of `initial`, never wider than `current`.

    Whole heads: ``floor(frac_final * num_heads)`` of them (decided at the first step, at least one
    head stays); head dims then make up the rest of the attention width.
    """
    r = pcfg.round_to
    e0, e_cur = initial.embed_dim, current.embed_dim
    blocks = {}
    for name, b0 in initial.blocks.items():
        bc = current.blocks[name]
        heads = bc.num_heads
        d = _round_keep(b0.attn_dim * (1 - frac) / heads, bc.head_dim, r)
        blocks[name] = BlockWidths(heads, d, _round_keep(b0.mlp_hidden * (1 - frac), bc.mlp_hidden, r))
    embed = _round_keep(e0 * (1 - frac), e_cur, r) if pcfg.prune_embed else e_cur
    return Widths(embed, blocks)


def heads_to_remove(num_heads: int, ratio: float, prune_heads: bool) -> int:
    """Whole heads a block loses at `ratio`: floor(ratio * num_heads), keeping at least one."""
    if not prune_heads:
        return 0
    return max(0, min(num_heads - 1, int(math.floor(ratio * num_heads + 1e-9))))


def _global_keep(
    scores: dict[str, torch.Tensor],
    size: Callable[[dict[str, int]], int],
    uniform: dict[str, int],
    current: dict[str, int],
    r: int,
) -> dict[str, int]:
    """Keep counts from one threshold over all groups' normalised scores.

    The threshold is the lowest whose widths hold at most as many parameters, by `size`, as the
    uniform plan's (fewer where rounding to `r` bites): channels differ in cost (an embedding channel
    runs through every block), so counting channels alone would keep far more parameters.
    """

    def keep_at(t: torch.Tensor) -> dict[str, int]:
        return {k: _round_keep(int((s >= t).sum()), current[k], r) for k, s in scores.items()}

    budget = size(uniform)
    thresholds = torch.cat([s.float().flatten() for s in scores.values()]).unique().flip(0)  # high to low
    lo, hi = 0, len(thresholds) - 1  # size(keep_at(thresholds[i])) grows with i
    if size(keep_at(thresholds[lo])) > budget:
        log.warning("global pruning: even the narrowest widths keep more weights than the uniform plan")
        return keep_at(thresholds[lo])
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if size(keep_at(thresholds[mid])) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return keep_at(thresholds[lo])


# --------------------------------------------------------------------------- pruning


@contextlib.contextmanager
def _tracking(model: nn.Module) -> Iterator[Callable[[], str]]:
    """Yield a function naming the innermost module running now (the culprit when a forward raises)."""
    stack: list[str] = []

    def enter(label: str):
        def hook(_module, _inputs) -> None:
            stack.append(label)

        return hook

    def leave(_module, _inputs, _output) -> None:  # must return None: a value would replace the output
        if stack:
            stack.pop()

    handles = []
    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(enter(name or type(model).__name__)))
        handles.append(m.register_forward_hook(leave))
    try:
        yield lambda: stack[-1] if stack else type(model).__name__
    finally:
        for h in handles:
            h.remove()


def _unwrapped_parameters(model: nn.Module, parts: VitParts) -> list[tuple[nn.Parameter, int]]:
    """Parameters outside Linear/Conv/Norm layers, with the dimension that holds the embedding."""
    out = [(getattr(model, t, None), 2) for t in ("cls_token", "reg_token", "dist_token", "pos_embed")]
    for _, blk in parts.blocks:
        out += [(ls.gamma, 0) for ls in (blk.ls1, blk.ls2) if hasattr(ls, "gamma")]
    return [(p, d) for p, d in out if isinstance(p, nn.Parameter)]


def _build_graph(model: nn.Module, parts: VitParts, example_inputs: torch.Tensor):
    import torch_pruning as tp

    unwrapped = _unwrapped_parameters(model, parts)
    with _tracking(model) as where:
        try:
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=example_inputs, unwrapped_parameters=unwrapped
            )
        except Exception as e:
            raise ModelError(
                f"Torch-Pruning cannot trace the model at layer '{where()}' ({type(e).__name__}: {e}); "
                "prune a standard timm ViT or DeiT student"
            ) from e


def _accumulate_gradients(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Sum the cross-entropy gradients of `batches` into `.grad` (what Taylor importance reads)."""
    model.zero_grad(set_to_none=True)
    for x, y in batches:
        F.cross_entropy(models.eval_logits(model(x)), y).backward()


def _attention_keep(scores: torch.Tensor, drop_heads: int, head_dim: int) -> tuple[list[int], list[int]]:
    """Heads to keep and the flat attention dims (head * d + j) to remove.

    scores: (num_heads, d). The lowest-scoring heads go whole; each kept head keeps its own
    `head_dim` best dims (all heads must end up with the same head_dim).
    """
    h, d = scores.shape
    order = torch.argsort(scores.float().mean(1))
    kept = sorted(int(i) for i in order[drop_heads:])
    drop = [int(i) * d + j for i in order[:drop_heads] for j in range(d)]
    for i in kept:
        best = torch.argsort(scores[i].float(), descending=True)
        drop += [i * d + int(j) for j in best[head_dim:]]
    return kept, sorted(drop)


def _prune_step(
    model: nn.Module,
    example_inputs: torch.Tensor,
    imp: Any,
    pcfg: PruneConfig,
    target: Widths,
    drop_heads: dict[str, int],
) -> None:
    import torch_pruning as tp

    parts = vit_parts(model)
    cur = read_widths(model)
    dg = _build_graph(model, parts, example_inputs)
    names = {m: n for n, m in model.named_modules()}

    def score(root: nn.Module, fn: Callable, n: int) -> torch.Tensor:
        s = imp(dg.get_pruning_group(root, fn, list(range(n))))
        return s.detach().float().cpu()

    # 1. Score every channel of every group before anything changes shape.
    s_embed = None
    if target.embed_dim < cur.embed_dim or pcfg.global_pruning and pcfg.prune_embed:
        s_embed = score(parts.stem_out, tp.prune_conv_out_channels, cur.embed_dim)
    s_attn, s_mlp = {}, {}
    for name, blk in parts.blocks:
        bc = cur.blocks[name]
        s_attn[name] = score(blk.attn.proj, tp.prune_linear_in_channels, bc.attn_dim).view(
            bc.num_heads, bc.head_dim
        )
        s_mlp[name] = score(blk.mlp.fc1, tp.prune_linear_out_channels, bc.mlp_hidden)

    # 2. Global ranking: one threshold over all groups decides how many channels each keeps.
    if pcfg.global_pruning:
        target = _apply_global(target, cur, s_embed, s_attn, s_mlp, drop_heads, pcfg.round_to)

    # 3. Remove the chosen channels, each group through the dependency graph.
    plans: list[tuple[nn.Module, Callable, list[int]]] = []
    heads_after = {}
    for name, blk in parts.blocks:
        bc, bt = cur.blocks[name], target.blocks[name]
        kept, drop = _attention_keep(s_attn[name], drop_heads.get(name, 0), bt.head_dim)
        heads_after[name] = (len(kept), bc.head_dim)
        plans.append((blk.attn.proj, tp.prune_linear_in_channels, drop))
        n_mlp = bc.mlp_hidden - bt.mlp_hidden
        plans.append((blk.mlp.fc1, tp.prune_linear_out_channels, _lowest(s_mlp[name], n_mlp)))
    if s_embed is not None:
        n_embed = cur.embed_dim - target.embed_dim
        plans.append((parts.stem_out, tp.prune_conv_out_channels, _lowest(s_embed, n_embed)))
    for root, fn, idxs in plans:
        if idxs:
            group = dg.get_pruning_group(root, fn, idxs)
            if not dg.check_pruning_group(group):
                raise ModelError(
                    f"Torch-Pruning refuses to prune layer '{names.get(root, root)}' (it would empty it)"
                )
            group.prune()

    # 4. Tell each Attention about its new shape, and the model about its new width.
    for name, blk in parts.blocks:
        num_heads, old_dim = heads_after[name]
        a = blk.attn
        new_dim = a.qkv.out_features // (3 * num_heads)
        if new_dim != old_dim:
            # SDPA scales q.k by 1/sqrt(new head_dim); rescale q so the logits keep the scale they
            # were trained with, 1/sqrt(old head_dim).
            with torch.no_grad():
                a.qkv.weight[: num_heads * new_dim] *= math.sqrt(new_dim / old_dim)
                if a.qkv.bias is not None:
                    a.qkv.bias[: num_heads * new_dim] *= math.sqrt(new_dim / old_dim)
        _set_heads(a, num_heads, new_dim)
        check_attention(a, f"{name}.attn")
    _set_embed_dim(model, parts.stem_out.out_channels)


def _lowest(scores: torch.Tensor, n: int) -> list[int]:
    return sorted(int(i) for i in torch.argsort(scores)[:n]) if n > 0 else []


def _apply_global(target: Widths, cur: Widths, s_embed, s_attn, s_mlp, drop_heads, r) -> Widths:
    scores, uniform, current, heads = {}, {}, {}, {}
    if s_embed is not None:
        scores["embed"], uniform["embed"], current["embed"] = s_embed, target.embed_dim, cur.embed_dim
    for name, s in s_attn.items():
        # Slot j of a head = its j-th best dim; a slot's score is averaged over the heads that stay.
        head_order = torch.argsort(s.mean(1))
        stay = s[head_order[drop_heads.get(name, 0) :]]
        heads[name] = len(stay)
        slots = torch.sort(stay, dim=1, descending=True).values.mean(0)
        scores[f"{name}.attn"] = slots
        uniform[f"{name}.attn"] = target.blocks[name].head_dim
        current[f"{name}.attn"] = cur.blocks[name].head_dim
        scores[f"{name}.mlp"] = s_mlp[name]
        uniform[f"{name}.mlp"] = target.blocks[name].mlp_hidden
        current[f"{name}.mlp"] = cur.blocks[name].mlp_hidden

    def size(keep: dict[str, int]) -> int:
        """Weights of the blocks' matrices at these widths: qkv + proj, fc1 + fc2."""
        e = keep.get("embed", cur.embed_dim)
        return sum(e * (4 * heads[n] * keep[f"{n}.attn"] + 2 * keep[f"{n}.mlp"]) for n in heads)

    keep = _global_keep(scores, size, uniform, current, r)
    blocks = {
        name: replace(bt, head_dim=keep[f"{name}.attn"], mlp_hidden=keep[f"{name}.mlp"])
        for name, bt in target.blocks.items()
    }
    return Widths(keep.get("embed", cur.embed_dim), blocks)


def prune_model(
    model: nn.Module,
    example_inputs: torch.Tensor,
    pcfg: PruneConfig,
    *,
    ratio: float | None = None,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict:
    """Prune `model` in place by `ratio` (default `pcfg.ratio`) and return its new widths.

    Args:
        example_inputs: a (1, 3, H, W) tensor for tracing.
        batches: (images, labels) training batches; needed by criteria that read gradients (taylor).
    """
    ratio = check_ratio(pcfg.ratio if ratio is None else ratio)
    crit = criterion(pcfg.importance)
    if crit.needs_gradients and not batches:
        raise ConfigError(f"prune.importance={pcfg.importance!r} needs training batches for its gradients")
    initial = read_widths(model)  # also checks that the model is a ViT we can prune
    was_training = model.training
    model.eval()  # BatchNorm statistics of the stem stay fixed; dropout off while scoring
    with torch.no_grad():
        out_before = model(example_inputs)
    imp = crit.make()
    drop_heads = {
        name: heads_to_remove(b.num_heads, ratio, pcfg.prune_heads) for name, b in initial.blocks.items()
    }
    for step in range(1, pcfg.iterative_steps + 1):
        frac = ratio * step / pcfg.iterative_steps
        heads = drop_heads if step == 1 else {}
        current = read_widths(model)
        after_heads = Widths(
            current.embed_dim,
            {n: replace(b, num_heads=b.num_heads - heads.get(n, 0)) for n, b in current.blocks.items()},
        )
        target = uniform_widths(initial, after_heads, frac, pcfg)
        if crit.needs_gradients:
            _accumulate_gradients(model, batches)
        _prune_step(model, example_inputs, imp, pcfg, target, heads)
        model.zero_grad(set_to_none=True)
        log.info("prune step %d/%d: %s", step, pcfg.iterative_steps, read_widths(model).describe())
    with _tracking(model) as where, torch.no_grad():
        try:
            out_after = model(example_inputs)
        except Exception as e:
            raise ModelError(f"the pruned model fails in layer '{where()}' ({type(e).__name__}: {e})") from e
    if out_after.shape != out_before.shape:
        raise ModelError(
            f"pruning changed the output shape {tuple(out_before.shape)} -> {tuple(out_after.shape)}"
        )
    model.train(was_training)
    return read_widths(model)


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
    path = Path(run_dir) / "student"
    if not (path / "train.json").exists() or not (path / "model.json").exists():
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
    cfg, student: nn.Module, spec: ModelSpec, data, out: Path, ratio: float, resume, source=("student", 0.0)
) -> tuple:
    """The pruned, not yet fine-tuned model: made now (and saved in out/init/), or read back on resume.

    `source` is (folder, its ratio): the model pruned further, by the step that brings it to `ratio` of
    the student's widths.
    """
    init = out / "init"
    step = 1 - (1 - ratio) / (1 - source[1])
    settings = {
        **_settings(cfg.prune, ratio),
        **({"source": source[0], "step_ratio": step} if source[1] else {}),
    }
    if resume and (init / "pruning.json").exists():
        info = read_json(init / "pruning.json")
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
    model = student
    batches = None
    if criterion(cfg.prune.importance).needs_gradients:
        batches = _taylor_batches(data, spec, cfg.prune.taylor_batches, cfg.train.batch_size, cfg.train.seed)
    t0 = time.perf_counter()
    widths = prune_model(model, torch.randn(1, *spec.input_size), cfg.prune, ratio=step, batches=batches)
    pspec = spec.with_widths(widths)
    from slimvit.evaluate import evaluate_model

    val = evaluate_model(model, data, pspec, "val")
    info = {
        "settings": settings,
        "seconds": time.perf_counter() - t0,
        "val_acc_pruned": val["accuracy"],
        "val_bal_acc_pruned": val["balanced_accuracy"],
    }
    if is_main_process():
        models.save(model, pspec, init)
        atomic_write_json(init / "pruning.json", info)
    return model, pspec, info, False


def run_prune(
    cfg,
    run_dir: str | Path,
    data=None,
    resume: bool | str = False,
    ratio: float | None = None,
    out_name: str = "pruned",
    epochs: int | None = None,
    source: str = "student",
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

    Returns:
        A compact summary (ratio, params/MACs/latency before and after, val/test accuracy).
    """
    from slimvit.data import load_data
    from slimvit.evaluate import evaluate_model
    from slimvit.train import fit, scale_epochs

    ratio = check_ratio(cfg.prune.ratio if ratio is None else ratio)
    epochs = cfg.prune.finetune_epochs if epochs is None else int(epochs)
    if epochs < 0:
        raise ConfigError(f"fine-tuning epochs={epochs} must be >= 0")
    run_dir = Path(run_dir)
    out = run_dir / out_name
    student_dir = run_dir / "student"
    if not (student_dir / "train.json").exists():
        raise ModelError(
            f"no distilled student in '{student_dir}'; run `slimvit distill` (or `slimvit run`) first"
        )
    data = data or load_data(cfg.data, run_dir)
    epochs = scale_epochs(epochs, cfg.train, len(data.split["train"]), f"finetune r={ratio:g}")
    student, spec = load_student(run_dir, data.classes)
    widths_before = read_widths(student)
    macs_before, params_before = count_macs_params(student, spec.input_size)
    reference = copy.deepcopy(student)  # pruning works in place; keep the student for the latency comparison
    src_ratio = 0.0
    if source != "student":
        src_ratio = float(read_json(run_dir / source / "prune.json")["ratio"])
        student, spec = models.load(run_dir / source)
        if src_ratio >= ratio:
            raise ConfigError(f"cannot prune '{source}' (ratio {src_ratio:g}) to the lower ratio {ratio:g}")
    model, pspec, info, resumed = _prune_or_resume(
        cfg, student, spec, data, out, ratio, resume, source=(source, src_ratio)
    )
    macs_after, params_after = count_macs_params(model, pspec.input_size)
    log.info(
        "prune r=%.2f: params %.2fM -> %.2fM (%.2fx), MACs %.1fM -> %.1fM (%.2fx); %s",
        ratio,
        params_before / 1e6,
        params_after / 1e6,
        params_after / params_before,
        macs_before / 1e6,
        macs_after / 1e6,
        macs_after / macs_before,
        pspec.widths.describe(),
    )

    teacher, distill_cfg = None, None
    if epochs > 0 and cfg.distill.loss != "none":
        teacher, distill_cfg = _finetune_teacher(cfg, run_dir, data.classes, pspec), cfg.distill
    target = recovery_target(cfg, student_dir) if cfg.prune.recover else None
    if epochs > 0:
        model, summary = fit(
            model,
            pspec,
            data,
            cfg.train,
            out,
            epochs=epochs,
            lr=cfg.prune.finetune_lr,
            teacher=teacher,
            distill_cfg=distill_cfg,
            resume="auto" if resumed else False,
            desc=f"finetune r={ratio:g}",
            select_initial=True,
            stop_at=target,
        )
        val_acc, val_bal = summary["best_val_acc"], summary["best_val_bal_acc"]
    else:
        if is_main_process():
            models.save(model, pspec, out)
        summary = {"epochs": 0, "epochs_run": 0}
        val_acc, val_bal = info["val_acc_pruned"], info.get("val_bal_acc_pruned", info["val_acc_pruned"])

    test = evaluate_model(model, data, pspec, "test")
    latency = compare_latency({"before": reference, "after": model}, pspec.input_size, cfg.bench)
    result = {
        **info["settings"],
        "params_before": params_before,
        "params_after": params_after,
        "params_ratio": params_after / params_before,
        "macs_before": macs_before,
        "macs_after": macs_after,
        "macs_ratio": macs_after / macs_before,
        "latency_ms_before": latency["before"],
        "latency_ms_after": latency["after"],
        "latency_ratio": latency["after"]["p50"] / latency["before"]["p50"],
        "prune_seconds": info["seconds"],
        "val_acc_pruned": info["val_acc_pruned"],
        "val_acc": val_acc,
        "val_bal_acc": val_bal,
        "test_acc": test["accuracy"],
        "test_bal_acc": test["balanced_accuracy"],
        "test_macro_f1": test["macro_f1"],
        "finetune": {
            **summary,
            "epochs": epochs,
            "lr": cfg.prune.finetune_lr,
            "distill": cfg.distill.loss,
            "recovery_target": target,
        },
        "widths_before": widths_before.to_json(),
        "widths_after": pspec.widths.to_json(),
    }
    if is_main_process():
        atomic_write_json(out / "eval.json", test)
        atomic_write_json(out / "prune.json", result)
    log.info(
        "prune r=%.2f: latency %.2f -> %.2f ms (%.2fx), val acc %.4f (%.4f before fine-tuning), test acc %.4f",
        ratio,
        latency["before"]["p50"],
        latency["after"]["p50"],
        result["latency_ratio"],
        val_acc,
        info["val_acc_pruned"],
        test["accuracy"],
    )
    return _summary(result)


def _finetune_teacher(cfg, run_dir: Path, classes: list[str], pspec: ModelSpec) -> nn.Module:
    """The model a fine-tune distils from (`prune.teacher`), taking the pruned model's inputs."""
    from slimvit.train import Renormalize, load_teacher

    if cfg.prune.teacher == "teacher":
        return load_teacher(run_dir, classes, input_spec=pspec)
    model, spec = load_student(run_dir, classes)
    model.eval()
    if (pspec.mean, pspec.std) != (spec.mean, spec.std):
        model = Renormalize(model, pspec.mean, pspec.std, spec.mean, spec.std).eval()
    return model


def recovery_target(cfg, student_dir: Path) -> float:
    """The validation balanced accuracy a fine-tune stops at: the student's, less `prune.recover_tolerance`."""
    train = read_json(Path(student_dir) / "train.json")
    student = train.get("best_val_bal_acc", train["best_val_acc"])  # older runs kept accuracy only
    return student - cfg.prune.recover_tolerance / 100


def _summary(result: dict) -> dict:
    keys = ("ratio", "params_before", "params_after", "macs_before", "macs_after", "latency_ratio")
    return {
        **{k: result[k] for k in keys},
        "latency_ms_before": result["latency_ms_before"]["p50"],
        "latency_ms_after": result["latency_ms_after"]["p50"],
        "val_acc": result["val_acc"],
        "test_acc": result["test_acc"],
        "finetune_epochs_run": result.get("finetune", {}).get("epochs_run"),
    }


def sweep_dir_name(ratio: float) -> str:
    return f"sweep/r{ratio:g}"


def run_sweep(cfg, run_dir: str | Path, ratios: Sequence[float], data=None) -> list[dict]:
    """Prune + fine-tune (`prune.sweep_epochs`) at each ratio; write prune_sweep.json and .md.

    With `prune.sweep_from: previous` (the default) the ratios are pruned iteratively: each from the model
    of the next lower ratio (the main pruned model stands for its own ratio), so a high ratio starts from
    an already fine-tuned, partly pruned model. `student` prunes every ratio from the student.
    Ratios already done (prune.json and eval.json present) are read back, not redone.
    """
    from slimvit.data import load_data

    ratios = [check_ratio(r) for r in ratios]
    if not ratios:
        raise ConfigError("no ratios to sweep; pass --sweep 0.1,0.2,0.3,0.5 or set prune.sweep")
    run_dir = Path(run_dir)
    rows = []
    chain = cfg.prune.sweep_from == "previous"
    main = run_dir / "pruned" / "prune.json"
    source = "student"
    for r in sorted(set(ratios)):
        out = run_dir / sweep_dir_name(r)
        if chain and abs(r - cfg.prune.ratio) < 1e-9 and main.exists():
            log.info("sweep r=%g: the main pruned model (pruned/) is this point", r)
            rows.append({**_summary(read_json(main)), "model": "pruned"})
            source = "pruned"
            continue
        if (out / "prune.json").exists() and (out / "eval.json").exists():
            log.info("sweep r=%g: done, skipped", r)
            rows.append({**_summary(read_json(out / "prune.json")), "model": sweep_dir_name(r)})
        else:
            data = data or load_data(cfg.data, run_dir)
            summary = run_prune(
                cfg,
                run_dir,
                data,
                resume="auto",
                ratio=r,
                out_name=sweep_dir_name(r),
                epochs=cfg.prune.sweep_epochs,
                source=source,
            )
            rows.append({**summary, "model": sweep_dir_name(r)})
        if chain:
            source = sweep_dir_name(r)
    baseline = _baseline(run_dir, rows)
    if is_main_process():
        atomic_write_json(run_dir / "prune_sweep.json", {"baseline": baseline, "points": rows})
        from slimvit.report import sweep_table

        atomic_write_text(run_dir / "prune_sweep.md", sweep_table(baseline, rows))
    return rows


def _baseline(run_dir: Path, rows: list[dict]) -> dict:
    """The unpruned student's row: sizes and latency from the sweep's own before-measurements."""
    student = run_dir / "student"
    train = read_json(student / "train.json") if (student / "train.json").exists() else {}
    ev = read_json(student / "eval.json") if (student / "eval.json").exists() else {}
    first = rows[0]
    return {
        "ratio": 0.0,
        "params": first["params_before"],
        "macs": first["macs_before"],
        "latency_ms": float(np.median([r["latency_ms_before"] for r in rows])),
        "val_acc": train.get("best_val_acc"),
        "test_acc": ev.get("accuracy"),
    }
