"""The timm ViT shapes slimvit builds, prunes and reloads: the convolutional token stem, the check that a
model is a plain ViT, and its widths (read from a model, validated, applied to a fresh one so a pruned
artifact's weights load). Torch and timm only: model creation (`models`) and pruning (`vit_pruning`) both
build on it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from timm.layers import Attention
from torch import nn

from slimvit.errors import ModelError
from slimvit.spec import BlockWidths, Widths, widths_error


class ConvStem(nn.Module):
    """Convolutional token stem (Xiao et al. 2021, "Early Convolutions Help Transformers See Better").

    Stride-2 3x3 conv-BN-ReLU layers up to the patch size, then a 1x1 projection to the embedding
    width. Same token grid as the patch projection it replaces; it gives a from-scratch ViT the
    locality prior that small datasets lack. Signature matches timm's `PatchEmbed`.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 192,
        bias: bool = True,
        dynamic_img_pad: bool = False,
        output_fmt: str | None = None,
        strict_img_size: bool = True,
        norm_layer: Any = None,
        flatten: bool = True,
        **_: Any,
    ) -> None:
        super().__init__()
        stages = (
            patch_size.bit_length() - 1 if isinstance(patch_size, int) else patch_size[0].bit_length() - 1
        )
        ps = patch_size if isinstance(patch_size, int) else patch_size[0]
        if 2**stages != ps:
            raise ModelError(f"conv stem needs a power-of-two patch size, got {patch_size}")
        size = img_size if isinstance(img_size, tuple) else (img_size, img_size)
        self.img_size = size
        self.patch_size = (ps, ps)
        self.grid_size = (size[0] // ps, size[1] // ps)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.flatten = flatten
        self.output_fmt = output_fmt
        self.dynamic_img_pad = False
        # Widths double each stage and end at embed_dim: 24-48-96-192 for ViT-Ti.
        widths = [max(8, embed_dim // 2 ** (stages - 1 - i)) for i in range(stages)]
        layers: list[nn.Module] = []
        c = in_chans
        for w in widths:
            layers += [
                nn.Conv2d(c, w, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
            ]
            c = w
        layers.append(nn.Conv2d(c, embed_dim, 1, bias=bias))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def feat_ratio(self, as_scalar: bool = True):
        return self.patch_size[0] if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, C, H/p, W/p)
        if self.output_fmt == "NHWC":
            x = x.permute(0, 2, 3, 1)
        elif self.flatten:
            x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        return self.norm(x)


class LocalityAttention(Attention):
    """Locality self-attention (Lee et al. 2021, "Vision Transformer for Small-Size Datasets"): timm's
    Attention with a learned temperature and each token's attention to itself masked out.

    On small datasets a ViT's attention spreads evenly over the tokens; a learned scale lets it sharpen,
    and without the diagonal a token must take its update from the others. The temperature is one
    parameter a layer (`log_scale`, the log of the multiplier of q.k, starting at 1/sqrt(head_dim)); a
    pruned head dimension leaves it as it is. Always the explicit form: the fused kernels take neither, and
    the export writes standard ONNX ops for it (ONNX Runtime's int8 attention kernel takes no attention bias).
    """

    def __init__(self, dim: int, num_heads: int = 8, **kwargs: Any) -> None:
        super().__init__(dim, num_heads, **kwargs)
        if not plain_attention(self):
            raise ModelError("locality attention takes no q/k norm, scale norm or gating")
        self.log_scale = nn.Parameter(torch.tensor(math.log(self.head_dim**-0.5)))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        if attn_mask is not None or is_causal:
            raise ModelError("locality attention takes no attention mask")
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.log_scale.exp()
        eye = torch.eye(N, dtype=torch.bool, device=x.device)
        attn = attn.masked_fill(eye, float("-inf")).softmax(dim=-1)
        x = self.attn_drop(attn) @ v
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj_drop(self.proj(x))


ATTENTIONS: dict[str, type[nn.Module]] = {"plain": Attention, "locality": LocalityAttention}
"""The student's attention layer by name (`model.student_attention`, `model.json`'s "attention")."""


@contextlib.contextmanager
def any_input_size(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, a timm ViT takes images of any size its patch divides: the token stem keeps the grid and
    timm resamples the position embedding to it (`dynamic_img_size`), as for progressive resizing. Other
    models (a CNN takes any size already) are left as they are. The model's own settings come back on exit,
    so what is saved, exported and pruned is the fixed-size model."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        yield model
        return
    pe = model.patch_embed
    saved = (model.dynamic_img_size, pe.output_fmt, pe.flatten, getattr(pe, "strict_img_size", None))
    model.dynamic_img_size, pe.output_fmt, pe.flatten = True, "NHWC", False
    if saved[3] is not None:
        pe.strict_img_size = False
    try:
        yield model
    finally:
        model.dynamic_img_size, pe.output_fmt, pe.flatten = saved[:3]
        if saved[3] is not None:
            pe.strict_img_size = saved[3]


@contextlib.contextmanager
def explicit_attention(model: nn.Module, on: bool = True) -> Iterator[nn.Module]:
    """Inside (when `on`), timm's attention layers compute softmax(q k^T * scale) v as plain matmuls, not
    with the fused `scaled_dot_product_attention`; the same function, another kernel. For training on a
    CPU: there PyTorch's flash-attention backward is slow for short sequences (36 tokens at 96 px) in bf16,
    44% of a ViT-Ti training step; the explicit form made the step 0.45x as long at 96 px in bf16 and
    0.93-1.03x in fp32 (`scripts/step_cost.py --compare attention`; docs/decisions.md). Inference keeps
    the fused kernel; each layer's own setting comes back on exit."""
    layers = [m for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)] if on else []
    saved = [m.fused_attn for m in layers]
    for m in layers:
        m.fused_attn = False
    try:
        yield model
    finally:
        for m, fused in zip(layers, saved, strict=True):
            m.fused_attn = fused


def plain_attention(attn: nn.Module) -> bool:
    """Whether a timm Attention is the plain kind (no q/k norm, no scale norm, no gating): what pruning
    and the fused attention export both support."""
    return (
        isinstance(getattr(attn, "q_norm", None), nn.Identity)
        and isinstance(getattr(attn, "k_norm", None), nn.Identity)
        and isinstance(getattr(attn, "norm", None), nn.Identity)
        and getattr(attn, "gate", None) is None
    )


# --------------------------------------------------------------------------- ViT structure


@dataclass
class VitParts:
    """The prunable pieces of a timm VisionTransformer."""

    stem_out: nn.Conv2d
    """The convolution whose output channels are the embedding (residual stream)."""
    blocks: list[tuple[str, nn.Module]]


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.Identity))


def vit_parts(model: nn.Module) -> VitParts:
    """Check that `model` is a ViT this module can prune; the error names the first layer that is not."""
    from timm.layers import LayerScale, Mlp, PatchEmbed
    from timm.models.vision_transformer import Block, VisionTransformer

    def refuse(layer: str, what: str) -> ModelError:
        return ModelError(
            f"cannot prune layer '{layer}': {what}. Pruning supports timm VisionTransformer/DeiT models "
            "with standard blocks (Attention without q/k norm or gating, Mlp, LayerNorm)"
        )

    if not isinstance(model, VisionTransformer):
        raise ModelError(
            f"cannot prune a {type(model).__name__}: pruning supports timm VisionTransformer/DeiT students"
        )
    if getattr(model, "attn_pool", None) is not None:
        raise refuse("attn_pool", f"attention pooling (global_pool={model.global_pool!r})")
    pe = model.patch_embed
    if isinstance(pe, ConvStem):
        stem_out = pe.proj[-1]
    elif isinstance(pe, PatchEmbed):
        stem_out = pe.proj
    else:
        raise refuse("patch_embed", f"unknown token stem {type(pe).__name__}")
    if not isinstance(stem_out, nn.Conv2d):
        raise refuse("patch_embed", f"the last stem layer is a {type(stem_out).__name__}, not a Conv2d")
    for name in ("norm_pre", "norm", "fc_norm"):
        if not _is_norm(getattr(model, name, nn.Identity())):
            raise refuse(name, f"{type(getattr(model, name)).__name__} is not a LayerNorm")
    if not _is_norm(getattr(pe, "norm", nn.Identity())):
        raise refuse("patch_embed.norm", "not a LayerNorm")
    for name in ("head", "head_dist"):
        head = getattr(model, name, None)
        if head is not None and not isinstance(head, (nn.Linear, nn.Identity)):
            raise refuse(name, f"{type(head).__name__} is not a Linear classifier")
    blocks = []
    for i, blk in enumerate(model.blocks):
        name = f"blocks.{i}"
        if type(blk) is not Block:
            raise refuse(name, f"{type(blk).__name__} is not timm's Block")
        a = blk.attn
        if type(a) not in (Attention, LocalityAttention):
            raise refuse(f"{name}.attn", f"{type(a).__name__} is not timm's Attention")
        if not plain_attention(a):
            raise refuse(f"{name}.attn", "attention with q/k norm, scale norm or gating")
        if type(blk.mlp) is not Mlp or not isinstance(blk.mlp.fc1, nn.Linear) or not _is_norm(blk.mlp.norm):
            raise refuse(f"{name}.mlp", f"{type(blk.mlp).__name__} is not a plain Linear Mlp")
        for sub in ("norm1", "norm2"):
            if not isinstance(getattr(blk, sub), nn.LayerNorm):
                raise refuse(f"{name}.{sub}", f"{type(getattr(blk, sub)).__name__} is not a LayerNorm")
        for sub in ("ls1", "ls2"):
            if not isinstance(getattr(blk, sub), (LayerScale, nn.Identity)):
                raise refuse(f"{name}.{sub}", f"{type(getattr(blk, sub)).__name__} is not a LayerScale")
        blocks.append((name, blk))
    return VitParts(stem_out, blocks)


def read_widths(model: nn.Module) -> Widths:
    """The current widths of a ViT (what `model.json` stores under "widths")."""
    parts = vit_parts(model)
    blocks = {}
    for name, blk in parts.blocks:
        a = blk.attn
        check_attention(a, name)
        blocks[name] = BlockWidths(int(a.num_heads), int(a.head_dim), int(blk.mlp.fc1.out_features))
    return Widths(int(parts.stem_out.out_channels), blocks)


def check_attention(attn: nn.Module, name: str = "attn") -> None:
    """Raise ModelError unless the Attention's attributes agree with its weights."""
    ok = (
        attn.attn_dim == attn.num_heads * attn.head_dim
        and attn.qkv.out_features == 3 * attn.attn_dim
        and attn.proj.in_features == attn.attn_dim
        and math.isclose(attn.scale, attn.head_dim**-0.5, rel_tol=1e-6)
    )
    if not ok:
        raise ModelError(
            f"'{name}' is inconsistent: num_heads={attn.num_heads}, head_dim={attn.head_dim}, "
            f"attn_dim={attn.attn_dim}, qkv out={attn.qkv.out_features}, proj in={attn.proj.in_features}"
        )


# --------------------------------------------------------------------------- widths -> modules


def validate_widths(widths: Widths, model: nn.Module) -> Widths:
    """Check `widths` against the (unpruned or less pruned) `model`; return them or raise ModelError."""
    cur = read_widths(model)
    sizes = [("embed_dim", widths.embed_dim)] + [
        (f"{n}.{k}", getattr(b, k))
        for n, b in widths.blocks.items()
        for k in ("num_heads", "head_dim", "mlp_hidden")
    ]
    small = [(k, v) for k, v in sizes if not (isinstance(v, int) and v >= 1)]
    if small:
        raise widths_error(f"{small[0][0]}={small[0][1]!r} must be a positive integer")
    if widths.embed_dim > cur.embed_dim:
        raise widths_error(f"embed_dim={widths.embed_dim} must be an integer in [1, {cur.embed_dim}]")
    extra = [k for k in widths.blocks if k not in cur.blocks]
    if extra:
        raise widths_error(
            f"unknown layer '{extra[0]}'; the model has {', '.join(cur.blocks) or 'no blocks'}"
        )
    missing = [k for k in cur.blocks if k not in widths.blocks]
    if missing:
        raise widths_error(f"no widths for layer '{missing[0]}'")
    for name, bw in widths.blocks.items():
        for k in ("num_heads", "head_dim", "mlp_hidden"):
            if getattr(bw, k) > getattr(cur.blocks[name], k):
                raise widths_error(
                    f"{name}.{k}={getattr(bw, k)} is larger than the model's {getattr(cur.blocks[name], k)} "
                    "(widths only shrink)"
                )
    return widths


def _narrow(owner: nn.Module, attr: str, dim: int, size: int) -> None:
    """Keep the first `size` entries of parameter `owner.attr` along `dim`."""
    p = getattr(owner, attr, None)
    if p is None or p.shape[dim] == size:
        return
    setattr(owner, attr, nn.Parameter(p.data.narrow(dim, 0, size).clone(), requires_grad=p.requires_grad))


def _resize_linear(m: nn.Linear, in_features: int | None = None, out_features: int | None = None) -> None:
    if out_features is not None:
        _narrow(m, "weight", 0, out_features)
        _narrow(m, "bias", 0, out_features)
        m.out_features = out_features
    if in_features is not None:
        _narrow(m, "weight", 1, in_features)
        m.in_features = in_features


def _resize_norm(m: nn.Module, size: int) -> None:
    if isinstance(m, nn.LayerNorm):
        _narrow(m, "weight", 0, size)
        _narrow(m, "bias", 0, size)
        m.normalized_shape = (size,)


def _resize_embedding(model: nn.Module, parts: VitParts, e: int) -> None:
    conv = parts.stem_out
    _narrow(conv, "weight", 0, e)
    _narrow(conv, "bias", 0, e)
    conv.out_channels = e
    _resize_norm(getattr(model.patch_embed, "norm", nn.Identity()), e)
    for tok in ("cls_token", "reg_token", "dist_token", "pos_embed"):
        _narrow(model, tok, 2, e)
    for name in ("norm_pre", "norm", "fc_norm"):
        _resize_norm(getattr(model, name, nn.Identity()), e)
    for _, blk in parts.blocks:
        _resize_norm(blk.norm1, e)
        _resize_norm(blk.norm2, e)
        for ls in (blk.ls1, blk.ls2):
            if hasattr(ls, "gamma"):
                _narrow(ls, "gamma", 0, e)
        _resize_linear(blk.attn.qkv, in_features=e)
        _resize_linear(blk.attn.proj, out_features=e)
        _resize_linear(blk.mlp.fc1, in_features=e)
        _resize_linear(blk.mlp.fc2, out_features=e)
    for name in ("head", "head_dist"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            _resize_linear(head, in_features=e)
    set_embed_dim(model, e)


def set_embed_dim(model: nn.Module, e: int) -> None:
    """Record the embedding width `e` in the model's attributes (timm keeps it in up to three)."""
    for attr in ("embed_dim", "num_features", "head_hidden_size"):
        if hasattr(model, attr):
            setattr(model, attr, e)


def set_heads(attn: nn.Module, num_heads: int, head_dim: int) -> None:
    """Make the Attention's attributes describe `num_heads` x `head_dim` (timm keeps all four)."""
    attn.num_heads = num_heads
    attn.head_dim = head_dim
    attn.attn_dim = num_heads * head_dim
    attn.scale = head_dim**-0.5


def apply_widths(model: nn.Module, widths: Widths) -> nn.Module:
    """Reshape a freshly built (unpruned) ViT in place to the pruned `widths`, so its weights load.

    Every parameter keeps its leading entries along the pruned dimension; the real values come
    from the artifact's state dict. Raises ModelError for widths that do not fit the model.
    """
    validate_widths(widths, model)
    parts = vit_parts(model)
    if widths.embed_dim != parts.stem_out.out_channels:
        _resize_embedding(model, parts, widths.embed_dim)
    for name, blk in parts.blocks:
        bw = widths.blocks[name]
        _resize_linear(blk.attn.qkv, out_features=3 * bw.attn_dim)
        _resize_linear(blk.attn.proj, in_features=bw.attn_dim)
        set_heads(blk.attn, bw.num_heads, bw.head_dim)
        _resize_linear(blk.mlp.fc1, out_features=bw.mlp_hidden)
        _resize_linear(blk.mlp.fc2, in_features=bw.mlp_hidden)
    return model
