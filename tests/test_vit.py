"""The ViT helpers: the conv token stem, the input-size and attention switches, the prunability check, and
widths read from, checked against and applied to a model. A ViT reshaped to smaller widths must be the
very ViT that timm builds at those widths, and a reshaped or shortened one must still run and reload."""

import math

import pytest
import torch
from timm.layers import Attention
from torch import nn

from slimvit import models
from slimvit.errors import ModelError
from slimvit.spec import BlockWidths, Widths
from slimvit.vit import (
    ConvStem,
    LocalityAttention,
    any_input_size,
    apply_widths,
    check_attention,
    explicit_attention,
    plain_attention,
    read_widths,
    validate_widths,
    vit_parts,
)

VIT = "vit_tiny_patch16_224"
TINY = {"depth": 2, "embed_dim": 48, "num_heads": 3}  # head_dim 16, mlp hidden 192
CLASSES = ["a", "b", "c"]


def _vit(stem: str = "patch", name: str = VIT, seed: int = 0, attention: str = "plain", **kw) -> nn.Module:
    spec = models.make_spec(name, 3, CLASSES, 32, stem, {**TINY, **kw}, attention)
    torch.manual_seed(seed)
    return models.build(spec).eval()


def _uniform(embed: int, heads: int, head_dim: int, mlp: int, depth: int = 2) -> Widths:
    return Widths(embed, {f"blocks.{i}": BlockWidths(heads, head_dim, mlp) for i in range(depth)})


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return models.eval_logits(model(x))


# --------------------------------------------------------------------------- ConvStem


def test_conv_stem_widths_and_token_grid():
    stem = ConvStem(img_size=32, patch_size=16, embed_dim=192)
    convs = [m for m in stem.proj if isinstance(m, nn.Conv2d)]
    # four stride-2 3x3 conv-BN-ReLU stages (2^4 = 16) doubling up to embed_dim, then a 1x1 projection
    assert [c.out_channels for c in convs] == [24, 48, 96, 192, 192]
    assert [c.stride for c in convs] == [(2, 2)] * 4 + [(1, 1)] and convs[-1].kernel_size == (1, 1)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in stem.proj) == 4
    assert stem.grid_size == (2, 2) and stem.num_patches == 4 and stem.feat_ratio() == 16
    assert stem.dynamic_feat_size((64, 48)) == (4, 3)
    x = torch.randn(2, 3, 32, 32)
    assert stem(x).shape == (2, 4, 192)  # (B, N, C) like timm's PatchEmbed
    stem.output_fmt = "NHWC"
    assert stem(x).shape == (2, 2, 2, 192)
    stem.output_fmt, stem.flatten = None, False
    assert stem(x).shape == (2, 192, 2, 2)
    narrow = ConvStem(32, 8, embed_dim=16).proj
    assert [c.out_channels for c in narrow if isinstance(c, nn.Conv2d)] == [8, 8, 16, 16]  # at least 8, not 4
    assert ConvStem(img_size=(64, 64), patch_size=(8, 8), embed_dim=16).grid_size == (8, 8)


@pytest.mark.parametrize("patch", [12, 3, (6, 6)])
def test_conv_stem_refuses_a_patch_size_not_a_power_of_two(patch):
    with pytest.raises(ModelError, match="power-of-two patch size"):
        ConvStem(img_size=32, patch_size=patch, embed_dim=32)


def test_conv_stem_tokens_are_local():
    """The token of a patch depends on its own neighbourhood only: a change in one corner leaves the
    token of the far corner as it was (stride-2 3x3 convs: a 31-pixel receptive field)."""
    torch.manual_seed(0)
    stem = ConvStem(img_size=64, patch_size=16, embed_dim=32).eval()
    x = torch.randn(1, 3, 64, 64)
    y = x.clone()
    y[:, :, :8, :8] += 5.0  # top-left corner
    with torch.no_grad():
        a, b = stem(x), stem(y)  # (1, 16, 32): a 4 x 4 grid
    assert not torch.allclose(a[:, 0], b[:, 0]) and torch.equal(a[:, 15], b[:, 15])


# --------------------------------------------------------------------------- switches


def test_any_input_size_restores_the_model_after_an_error():
    model = _vit("conv")
    with pytest.raises(ValueError, match="boom"), any_input_size(model):
        assert model.dynamic_img_size and model.patch_embed.output_fmt == "NHWC"
        assert _out(model, torch.randn(1, 3, 48, 48)).shape == (1, 3)  # a 3 x 3 grid
        raise ValueError("boom")
    assert not model.dynamic_img_size and model.patch_embed.output_fmt is None and model.patch_embed.flatten
    with pytest.raises((AssertionError, RuntimeError)):
        model(torch.randn(1, 3, 48, 48))


def test_explicit_attention_restores_after_an_error():
    model = _vit()
    with pytest.raises(ValueError), explicit_attention(model):
        assert not model.blocks[0].attn.fused_attn
        raise ValueError
    assert all(b.attn.fused_attn for b in model.blocks)


def test_plain_attention():
    assert all(plain_attention(b.attn) for b in _vit().blocks)
    assert not plain_attention(_vit(qk_norm=True).blocks[0].attn)
    assert not plain_attention(nn.Linear(2, 2))  # not an attention layer at all


def test_locality_attention_sends_no_token_its_own_value():
    """With two tokens, each one attends to the other alone, whatever q, k and the temperature: a token's
    output is the projection of the other token's value (plain attention mixes in its own)."""
    torch.manual_seed(0)
    attn = LocalityAttention(16, num_heads=2, qkv_bias=True).eval()
    x = torch.randn(3, 2, 16)
    v = attn.qkv(x)[..., 32:]  # (B, N, heads x head_dim): the values, heads side by side
    with torch.no_grad():
        for log_scale in (-3.0, 0.0, 2.0):
            attn.log_scale.fill_(log_scale)
            out = attn(x)
            torch.testing.assert_close(out, attn.proj(v.flip(1)))
        plain = Attention(16, num_heads=2, qkv_bias=True).eval()  # timm's, with the same weights
        plain.load_state_dict({k: w for k, w in attn.state_dict().items() if k != "log_scale"})
        assert not torch.allclose(plain(x), attn.proj(v.flip(1)), atol=1e-3)


def test_locality_attention_learns_its_temperature():
    torch.manual_seed(0)
    attn = LocalityAttention(16, num_heads=2)
    assert math.isclose(attn.log_scale.exp().item(), 8**-0.5, rel_tol=1e-6)  # starts as plain attention's
    x = torch.randn(2, 5, 16)
    attn(x).square().sum().backward()
    assert attn.log_scale.grad is not None and attn.log_scale.grad.abs() > 0
    with torch.no_grad():
        before = attn(x)
        attn.log_scale += 1.0
        assert not torch.allclose(attn(x), before, atol=1e-4)
    with pytest.raises(ModelError, match="locality attention takes no q/k norm"):
        LocalityAttention(16, num_heads=2, qk_norm=True, norm_layer=nn.LayerNorm)


def test_a_locality_vit_is_prunable_and_runs_at_any_input_size():
    model = _vit("conv", attention="locality")
    assert all(type(b.attn) is LocalityAttention for b in model.blocks)
    assert len(vit_parts(model).blocks) == 2 and read_widths(model).blocks["blocks.0"].head_dim == 16
    with explicit_attention(model), any_input_size(model):
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)  # 4x4 tokens: the mask follows the grid


# --------------------------------------------------------------------------- vit_parts / read_widths


def test_vit_parts_finds_the_stem_output_and_the_blocks():
    conv = _vit("conv")
    parts = vit_parts(conv)
    assert parts.stem_out is conv.patch_embed.proj[-1] and [n for n, _ in parts.blocks] == [
        "blocks.0",
        "blocks.1",
    ]
    patch = _vit("patch")
    assert vit_parts(patch).stem_out is patch.patch_embed.proj


def _replace(model, path, new):
    *owner, attr = path.split(".")
    parent = model.get_submodule(".".join(owner)) if owner else model
    setattr(parent, attr, new)
    return model


@pytest.mark.parametrize(
    "change,where",
    [
        (lambda m: _replace(m, "norm", nn.BatchNorm1d(48)), "'norm'"),
        (lambda m: _replace(m, "head", nn.Sequential(nn.Linear(48, 3))), "'head'"),
        (lambda m: _replace(m, "blocks.1", nn.Identity()), "'blocks.1'"),
        (lambda m: _replace(m, "blocks.0.mlp", nn.Sequential()), "'blocks.0.mlp'"),
        (lambda m: _replace(m, "blocks.1.norm2", nn.Identity()), "'blocks.1.norm2'"),
        (lambda m: _replace(m, "blocks.0.ls1", nn.Dropout()), "'blocks.0.ls1'"),
        (lambda m: _replace(m, "patch_embed", nn.Conv2d(3, 48, 16, 16)), "'patch_embed'"),
    ],
)
def test_vit_parts_names_the_first_layer_it_cannot_prune(change, where):
    with pytest.raises(ModelError, match=f"cannot prune layer {where}"):
        vit_parts(change(_vit()))


def test_vit_parts_refuses_other_models_and_other_vits():
    with pytest.raises(ModelError, match="cannot prune a ResNet"):
        vit_parts(models.build(models.make_spec("resnet10t", 3, CLASSES, 32)))
    with pytest.raises(ModelError, match=r"cannot prune layer 'blocks\.0\.attn'.*q/k norm"):
        vit_parts(_vit(qk_norm=True))
    with pytest.raises(ModelError, match="cannot prune layer 'attn_pool'.*'map'"):
        vit_parts(_vit(global_pool="map"))


def test_read_widths_of_a_timm_vit():
    w = read_widths(_vit("conv", depth=3, embed_dim=64, num_heads=4, mlp_ratio=3.0))
    assert w == _uniform(64, 4, 16, 192, depth=3) and w.blocks["blocks.2"].attn_dim == 64


def test_check_attention_catches_attributes_that_disagree_with_the_weights():
    attn = _vit().blocks[0].attn
    check_attention(attn, "blocks.0.attn")  # as timm builds it
    attn.num_heads = 2
    with pytest.raises(ModelError, match=r"'blocks\.0\.attn' is inconsistent: num_heads=2, head_dim=16"):
        check_attention(attn, "blocks.0.attn")
    attn.num_heads = 3
    attn.scale = 1.0  # a head width of 16 needs a scale of 1/4
    with pytest.raises(ModelError, match="inconsistent"):
        check_attention(attn)


# --------------------------------------------------------------------------- validate_widths


def test_validate_widths_returns_widths_that_fit():
    model = _vit()
    for w in (read_widths(model), _uniform(8, 1, 1, 1)):
        assert validate_widths(w, model) is w


@pytest.mark.parametrize(
    "widths,match",
    [
        (_uniform(64, 3, 16, 192), r"embed_dim=64 must be an integer in \[1, 48\]"),
        (
            _uniform(48, 4, 16, 192),
            r"blocks\.0\.num_heads=4 is larger than the model's 3 \(widths only shrink\)",
        ),
        (_uniform(48, 3, 17, 192), r"blocks\.0\.head_dim=17 is larger"),
        (_uniform(48, 3, 16, 193), r"blocks\.0\.mlp_hidden=193 is larger"),
        (_uniform(48, 3, 16, 192, depth=3), "unknown layer 'blocks.2'; the model has blocks.0, blocks.1"),
        (_uniform(48, 3, 16, 192, depth=1), "no widths for layer 'blocks.1'"),
        (_uniform(0, 3, 16, 192), "embed_dim=0 must be a positive integer"),
        (_uniform(48, 3, 0, 192), r"blocks\.0\.head_dim=0 must be a positive integer"),
    ],
)
def test_validate_widths_refuses_widths_that_do_not_fit(widths, match):
    model = _vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelError, match=match):
        apply_widths(model, widths)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # refused before anything changed


# --------------------------------------------------------------------------- apply_widths


@pytest.mark.parametrize(
    "name,kw",
    [
        (VIT, {}),
        (VIT, {"reg_tokens": 2}),
        (VIT, {"init_values": 0.1}),  # LayerScale gammas
        (VIT, {"global_pool": "avg", "fc_norm": True}),
        (VIT, {"pre_norm": True}),
        ("deit_tiny_distilled_patch16_224", {}),  # dist_token and head_dist
    ],
)
def test_narrowed_vit_is_the_vit_timm_builds_at_those_widths(name, kw):
    """Shrink embed 48 -> 16, heads 3x16 -> 2x8, MLP 192 -> 32; then the weights of a ViT that timm
    builds at those widths load into it (strictly) and it computes what that ViT computes."""
    model = apply_widths(_vit(name=name, **kw), _uniform(16, 2, 8, 32))
    native = _vit(name=name, seed=1, **{**kw, "embed_dim": 16, "num_heads": 2, "mlp_ratio": 2.0})
    model.load_state_dict(native.state_dict(), strict=True)
    assert model.embed_dim == 16 and model.num_features == 16
    assert read_widths(model) == read_widths(native) == _uniform(16, 2, 8, 32)
    x = torch.randn(2, 3, 32, 32)
    want = _out(native, x)
    torch.testing.assert_close(_out(model, x), want, rtol=1e-5, atol=1e-5)
    with explicit_attention(model):  # the explicit path uses the attention's own scale
        torch.testing.assert_close(_out(model, x), want, rtol=1e-4, atol=1e-5)


def test_uneven_widths_keep_every_block_consistent_and_trainable():
    widths = Widths(
        40,
        {
            "blocks.0": BlockWidths(3, 8, 50),
            "blocks.1": BlockWidths(1, 16, 10),
            "blocks.2": BlockWidths(2, 5, 7),
        },
    )
    model = apply_widths(_vit("conv", depth=3), widths)
    assert read_widths(model) == widths
    for name, blk in vit_parts(model).blocks:
        check_attention(blk.attn, name)
        assert math.isclose(blk.attn.scale, widths.blocks[name].head_dim ** -0.5)
    x = torch.randn(2, 3, 32, 32)
    fused = _out(model, x)
    assert fused.shape == (2, 3) and torch.isfinite(fused).all()
    with explicit_attention(model):
        torch.testing.assert_close(_out(model, x), fused, rtol=1e-4, atol=1e-5)
    model.train()
    model(x).sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, n


def test_narrowing_keeps_the_leading_entries():
    """apply_widths keeps the first entries of each weight (the artifact's weights replace them on load)."""
    model = _vit()
    fc1 = model.blocks[0].mlp.fc1.weight.detach().clone()  # (192, 48)
    qkv = model.blocks[1].attn.qkv.weight.detach().clone()  # (144, 48)
    apply_widths(model, _uniform(24, 1, 8, 30))
    assert torch.equal(model.blocks[0].mlp.fc1.weight, fc1[:30, :24])
    assert torch.equal(model.blocks[1].attn.qkv.weight, qkv[:24, :24])  # 3 x (1 head x 8) from 24 inputs
    assert model.cls_token.shape == (1, 1, 24) and model.pos_embed.shape == (1, 5, 24)
    assert model.head.in_features == 24 and model.norm.normalized_shape == (24,)


def test_widths_round_trip_through_the_artifact(tmp_path):
    widths = Widths(40, {"blocks.0": BlockWidths(2, 12, 33), "blocks.1": BlockWidths(3, 4, 100)})
    model = apply_widths(_vit("conv", seed=2), widths)
    spec = models.make_spec(VIT, 3, CLASSES, 32, "conv", TINY).with_widths(widths)
    models.save(model, spec, tmp_path / "p")
    loaded, spec2 = models.load(tmp_path / "p")
    assert spec2.widths == widths == read_widths(loaded)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_out(loaded, x), _out(model, x), rtol=0, atol=0)


def test_a_shortened_vit_still_runs_and_reloads_at_its_depth(tmp_path):
    """Depth pruning removes blocks (as the pruning stage does: a shorter `blocks` Sequential); the widths
    read back are renumbered, and a ViT built at the new depth (the spec's `depth` kwarg) with those widths
    takes its weights and computes the same function."""
    model = apply_widths(
        _vit(depth=3),
        Widths(
            48,
            {
                "blocks.0": BlockWidths(3, 16, 192),
                "blocks.1": BlockWidths(2, 16, 50),
                "blocks.2": BlockWidths(1, 8, 20),
            },
        ),
    )
    model.blocks = nn.Sequential(*list(model.blocks)[1:])  # drop the first block
    widths = read_widths(model)
    assert widths == Widths(48, {"blocks.0": BlockWidths(2, 16, 50), "blocks.1": BlockWidths(1, 8, 20)})
    x = torch.randn(2, 3, 32, 32)
    out = _out(model, x)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    spec = models.make_spec(VIT, 3, CLASSES, 32, "patch", {**TINY, "depth": 2})
    models.save(model, spec.with_widths(widths), tmp_path / "d")
    loaded, _ = models.load(tmp_path / "d")
    assert len(loaded.blocks) == 2
    torch.testing.assert_close(_out(loaded, x), out, rtol=0, atol=0)
    # the old (3-block) widths do not fit the shortened model
    with pytest.raises(ModelError, match="unknown layer 'blocks.2'"):
        validate_widths(_uniform(48, 1, 8, 20, depth=3), loaded)
