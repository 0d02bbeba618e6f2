"""Structured pruning of a timm ViT with Torch-Pruning's dependency graph: the algorithm (importance
criteria, the width plan, one pruning step on a model). The `prune` stage and the sweep, which use it,
are in `slimvit.prune`.

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
(fused ``scaled_dot_product_attention``) runs unchanged, and no timm class is patched (a
:class:`slimvit.vit.LocalityAttention` keeps its learned scale). The
artifact records the widths in ``model.json``; :func:`slimvit.vit.apply_widths` reshapes a freshly built model
to them so the weights load (``models.load`` calls it).

Depth pruning (:func:`block_drop_order`, :func:`drop_blocks`) removes whole transformer blocks; the model
stays a timm ``VisionTransformer`` whose ``depth`` kwarg in the spec rebuilds it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimvit import models
from slimvit.config import PruneConfig
from slimvit.errors import ConfigError, ModelError
from slimvit.spec import BlockWidths, Widths
from slimvit.vit import (
    LocalityAttention,
    VitParts,
    check_attention,
    read_widths,
    set_embed_dim,
    set_heads,
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


def global_keep(
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


_SCALARS_ONLY = (
    r"Unwrapped parameters detected: \['blocks\.\d+\.attn\.log_scale'(, 'blocks\.\d+\.attn\.log_scale')*\]"
)
"""Torch-Pruning's warning when the only parameters outside its layers are locality attention's temperatures."""


def _build_graph(model: nn.Module, parts: VitParts, example_inputs: torch.Tensor):
    import torch_pruning as tp

    unwrapped = _unwrapped_parameters(model, parts)
    with _tracking(model) as where:
        try:
            with warnings.catch_warnings():
                # Locality attention's temperatures have no channel; Torch-Pruning leaves 0-d parameters
                # alone but warns about them (and only about them: the message must list nothing else).
                warnings.filterwarnings("ignore", _SCALARS_ONLY, UserWarning)
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
        if new_dim != old_dim and not isinstance(a, LocalityAttention):
            # SDPA scales q.k by 1/sqrt(new head_dim); rescale q so the logits keep the scale they
            # were trained with, 1/sqrt(old head_dim). Locality attention's scale is its own parameter.
            with torch.no_grad():
                a.qkv.weight[: num_heads * new_dim] *= math.sqrt(new_dim / old_dim)
                if a.qkv.bias is not None:
                    a.qkv.bias[: num_heads * new_dim] *= math.sqrt(new_dim / old_dim)
        set_heads(a, num_heads, new_dim)
        check_attention(a, f"{name}.attn")
    set_embed_dim(model, parts.stem_out.out_channels)


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

    keep = global_keep(scores, size, uniform, current, r)
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
) -> Widths:
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


# --------------------------------------------------------------------------- depth


@torch.no_grad()
def block_drop_order(model: nn.Module, batches: Sequence[torch.Tensor], depth: int) -> list[int]:
    """Which blocks to remove to bring `model` to `depth` blocks, most dispensable first.

    Greedy: at each step, remove the block whose skipping (its residual branch dropped, the tokens passing
    straight through) moves the model's predictions least from the intact model's, as the KL divergence of
    the class distributions over `batches` (training images; no labels read). Each step re-scores the
    remaining blocks with the earlier removals in place, so two blocks that stand in for each other are
    not both removed on the strength of each other.
    """
    n = len(vit_parts(model).blocks)
    if not 1 <= depth < n:
        raise ConfigError(f"depth={depth} must be in [1, {n - 1}]: the model has {n} blocks and keeps fewer")
    was_training = model.training
    model.eval()
    blocks, stem = model.blocks, model.patch_embed
    ref = [F.log_softmax(models.eval_logits(model(x)).float(), -1) for x in batches]
    # the stem's output for each batch, computed once: every later pass replays it (a conv stem is about
    # 30% of a full forward of a pruned 96-px student; what runs after it is unchanged, so are the scores)
    stems = [stem(x) for x in batches]
    kept, order = list(range(n)), []
    try:
        while len(kept) > depth:
            # the tokens entering each kept block, from one pass of the current model: skipping block kept[p]
            # then runs only the blocks after it, on the tokens that entered it (same scores; measured 0.78x the
            # time of a full forward per skip on the 96-px student before the stem was replayed too)
            inputs = _block_inputs(model, [blocks[j] for j in kept], batches, stems)
            scores = []
            for p, i in enumerate(kept):
                kl = 0.0
                for x, s, h, r in zip(batches, stems, inputs[p], ref, strict=True):
                    stem.forward = _returns(s)
                    model.blocks = nn.Sequential(_Replay(h), *(blocks[j] for j in kept[p + 1 :]))
                    logp = F.log_softmax(models.eval_logits(model(x)).float(), -1)
                    kl += F.kl_div(logp, r, log_target=True, reduction="batchmean").item()
                scores.append((kl / len(batches), i))
            kl, least = min(scores)
            log.info(
                "depth: block %d is the most dispensable of %d (KL %.4f when skipped)", least, len(kept), kl
            )
            kept.remove(least)
            order.append(least)
    finally:
        model.blocks = blocks
        stem.__dict__.pop("forward", None)  # the class's forward again
        model.train(was_training)
    return order


class _Replay(nn.Module):
    """Stands first in `model.blocks` and returns the tokens it holds in place of its input."""

    def __init__(self, tokens: torch.Tensor) -> None:
        super().__init__()
        self.tokens = tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens


def _returns(tokens: torch.Tensor):
    """A stand-in for the stem's forward (set on the instance, so its attributes stay): `tokens`, whatever
    the input."""
    return lambda *_args, **_kwargs: tokens


def _block_inputs(model: nn.Module, kept: list[nn.Module], batches, stems) -> list[list[torch.Tensor]]:
    """inputs[p][b]: the tokens entering kept block p for batch b, with `model.blocks` set to `kept` and
    the stem's output for batch b replayed from `stems[b]`."""
    model.blocks = nn.Sequential(*kept)
    inputs: list[list[torch.Tensor]] = [[] for _ in kept]
    hooks = [
        b.register_forward_pre_hook(lambda _m, args, p=p: inputs[p].append(args[0]))
        for p, b in enumerate(kept)
    ]
    try:
        for x, s in zip(batches, stems, strict=True):
            model.patch_embed.forward = _returns(s)
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return inputs


def drop_blocks(model: nn.Module, remove: Sequence[int]) -> Widths:
    """Remove the blocks numbered `remove` from `model` in place; return the new widths (blocks renumbered).

    The model stays a plain timm VisionTransformer of fewer blocks: `models.build` rebuilds it from the
    spec's `depth` kwarg, so its weights load like any pruned artifact's.
    """
    n = len(vit_parts(model).blocks)
    bad = [i for i in remove if not 0 <= i < n]
    if bad or len(set(remove)) == n:
        raise ConfigError(f"cannot remove blocks {sorted(remove)} of a model with {n} blocks")
    model.blocks = nn.Sequential(*(b for i, b in enumerate(model.blocks) if i not in set(remove)))
    if hasattr(model, "feature_info"):  # timm lists one entry per block for features_only users
        model.feature_info = [
            dict(f, module=f"blocks.{k}") for k, f in enumerate(model.feature_info[: len(model.blocks)])
        ]
    return read_widths(model)
