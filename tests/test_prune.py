"""Structured pruning of a tiny 3-head ViT: shapes, widths, ONNX, save/load, bad input."""

import dataclasses
import math

import pytest
import torch

from slimvit import models
from slimvit.config import PruneConfig
from slimvit.errors import ConfigError, ModelError
from slimvit.spec import BlockWidths, Widths
from slimvit.timing import count_macs_params
from slimvit.vit import apply_widths, check_attention, read_widths
from slimvit.vit_pruning import block_drop_order, drop_blocks, heads_to_remove, prune_model

CLASSES = ["a", "b", "c", "d"]
TINY = {"depth": 2, "embed_dim": 96, "num_heads": 3}  # head_dim 32, MLP 384


def tiny_vit(stem="conv", name="vit_tiny_patch16_224", size=32, attention="plain"):
    spec = models.make_spec(name, len(CLASSES), CLASSES, size, stem, TINY, attention)
    torch.manual_seed(0)
    return models.build(spec).eval(), spec


def batches(size=32, n=2):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 3, size, size, generator=g), torch.randint(0, len(CLASSES), (8,), generator=g))
        for _ in range(n)
    ]


@pytest.mark.parametrize("ratio", [0.2, 0.5])
@pytest.mark.parametrize("importance", ["taylor", "l2", "random"])
def test_prune_shapes_widths_and_forward(ratio, importance):
    model, spec = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    out_before = model(x)
    macs0, params0 = count_macs_params(model, spec.input_size)
    cfg = PruneConfig(ratio=ratio, importance=importance, round_to=8)
    widths = prune_model(model, x[:1], cfg, batches=batches())
    out_after = model(x)
    assert out_after.shape == out_before.shape and torch.isfinite(out_after).all()
    assert widths == read_widths(model)
    assert widths.embed_dim % 8 == 0 and widths.embed_dim < 96
    for name, b in widths.blocks.items():
        assert b.head_dim % 8 == 0 and b.mlp_hidden % 8 == 0
        assert b.head_dim < 32 and b.mlp_hidden < 384
        assert b.num_heads == 3 - heads_to_remove(3, ratio, True)  # one whole head goes only at 0.5
        check_attention(model.get_submodule(f"{name}.attn"), name)
    assert model.head.out_features == len(CLASSES)  # the classifier keeps its outputs
    macs1, params1 = count_macs_params(model, spec.input_size)
    assert params1 < 0.85 * params0 and macs1 < 0.85 * macs0
    # timm's own fused attention path still runs (no patched forward)
    assert all(blk.attn.fused_attn for blk in model.blocks)


def test_heads_to_remove():
    assert heads_to_remove(3, 0.2, True) == 0
    assert heads_to_remove(3, 0.34, True) == 1
    assert heads_to_remove(3, 0.99, True) == 2  # at least one head stays
    assert heads_to_remove(12, 0.5, True) == 6
    assert heads_to_remove(3, 0.5, False) == 0


@pytest.mark.parametrize("importance", ["taylor", "l2"])
def test_criteria_remove_dead_channels_first(importance):
    """MLP channels with zero weights carry nothing: a real criterion removes exactly those, random does not."""

    def surviving_dead(imp: str) -> int:
        model, _ = tiny_vit()
        fc1, fc2 = model.blocks[0].mlp.fc1, model.blocks[0].mlp.fc2
        dead = torch.arange(0, 384, 3)[:128]  # 128 of 384 channels; ratio 0.25 removes 96
        with torch.no_grad():
            fc1.weight[dead] = 0
            fc1.bias[dead] = 0
            fc2.weight[:, dead] = 0
        x = torch.randn(1, 3, 32, 32)
        cfg = PruneConfig(ratio=0.25, importance=imp, prune_embed=False, prune_heads=False)
        prune_model(model, x, cfg, batches=batches(n=2))
        return int((model.blocks[0].mlp.fc1.weight.abs().sum(1) == 0).sum())

    assert surviving_dead(importance) == 128 - 96  # every removed channel was a dead one
    assert surviving_dead("random") > 128 - 96


def test_global_and_iterative_pruning():
    model, _ = tiny_vit()
    x = torch.randn(1, 3, 32, 32)
    cfg = PruneConfig(ratio=0.4, importance="l2", global_pruning=True, iterative_steps=2)
    widths = prune_model(model, x, cfg)
    assert model(x).shape == (1, len(CLASSES))
    assert all(b.head_dim % 8 == 0 for b in widths.blocks.values())


@pytest.mark.parametrize("ratio", [0.2, 0.4])
def test_global_pruning_removes_what_uniform_removes(ratio):
    """One threshold over all layers, but (at most) the block weights the uniform plan keeps."""

    def block_weights(w: Widths) -> int:
        return sum(w.embed_dim * (4 * b.attn_dim + 2 * b.mlp_hidden) for b in w.blocks.values())

    def prune(global_pruning: bool) -> dict:
        model, _ = tiny_vit()
        with torch.no_grad():  # layers of different magnitude, so the global ranking is uneven
            for i, blk in enumerate(model.blocks):
                blk.mlp.fc1.weight.mul_(1 + 0.5 * i)
        cfg = PruneConfig(ratio=ratio, importance="l2", global_pruning=global_pruning)
        return prune_model(model, torch.randn(1, 3, 32, 32), cfg)

    uniform, glob = prune(False), prune(True)
    assert 0.9 * block_weights(uniform) <= block_weights(glob) <= block_weights(uniform)
    assert glob != uniform  # the ranking did move channels between groups


def test_global_keep_threshold():
    from slimvit.vit_pruning import global_keep

    scores = {"a": torch.tensor([5.0, 4.0, 1.0, 0.5]), "b": torch.tensor([3.0, 2.0, 0.1, 0.0])}
    cost = {"a": 10, "b": 1}

    def size(keep):
        return sum(cost[k] * n for k, n in keep.items())

    # budget 10*2 + 1*2 = 22: threshold 2.0 keeps a 5, 4 and b 3, 2 (22); 1.0 would add 10
    assert global_keep(scores, size, {"a": 2, "b": 2}, {"a": 4, "b": 4}, 1) == {"a": 2, "b": 2}
    # budget 10*1 + 1*4 = 14: b's 2.0 cannot come without a's 4.0 (21), so the threshold stays at 5.0
    # (every layer keeps at least one channel)
    assert global_keep(scores, size, {"a": 1, "b": 4}, {"a": 4, "b": 4}, 1) == {"a": 1, "b": 1}
    # nothing fits: the narrowest widths, not an empty layer
    assert global_keep(scores, size, {"a": 0, "b": 0}, {"a": 4, "b": 4}, 1) == {"a": 1, "b": 1}


def test_patch_stem_and_distilled_model_prune():
    for name, stem in (("vit_tiny_patch16_224", "patch"), ("deit_tiny_distilled_patch16_224", "conv")):
        model, _ = tiny_vit(stem=stem, name=name)
        x = torch.randn(1, 3, 32, 32)
        prune_model(model, x, PruneConfig(ratio=0.2, importance="l2"))
        assert model(x).shape == (1, len(CLASSES))


def test_save_load_round_trip(tmp_path):
    model, spec = tiny_vit()
    x = torch.randn(3, 3, 32, 32)
    widths = prune_model(model, x[:1], PruneConfig(ratio=0.5, importance="l2"))
    models.save(model, spec.with_widths(widths), tmp_path / "p")
    loaded, spec2 = models.load(tmp_path / "p")
    assert spec2.widths == widths
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    a = loaded.blocks[0].attn
    assert math.isclose(a.scale, a.head_dim**-0.5) and a.attn_dim == a.num_heads * a.head_dim


def test_a_locality_vit_prunes_keeps_its_temperatures_and_reloads(tmp_path):
    """Locality attention's temperature is its own parameter: pruning leaves it and the kept q rows as they
    are (plain attention's q is rescaled to keep 1/sqrt(old head_dim)), says nothing about it, and the
    artifact rebuilds the same function."""
    import warnings

    model, spec = tiny_vit(attention="locality")
    with torch.no_grad():
        for i, blk in enumerate(model.blocks):
            blk.attn.log_scale.fill_(-1.0 - i)  # as if learned
    q_before = [blk.attn.qkv.weight[: blk.attn.attn_dim].clone() for blk in model.blocks]
    x = torch.randn(3, 3, 32, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        widths = prune_model(
            model, x[:1], PruneConfig(ratio=0.5, importance="l2", prune_embed=False), batches=batches()
        )
    assert not [w for w in caught if "nwrapped" in str(w.message)]
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        assert a.head_dim < 32 and a.log_scale.item() == -1.0 - i
        q = a.qkv.weight[: a.attn_dim]
        # every kept q row is an original row, unscaled (the embedding keeps its width: rows keep their length)
        assert all(any(torch.equal(row, old) for old in q_before[i]) for row in q)
    models.save(model, spec.with_widths(widths), tmp_path / "p")
    assert '"attention": "locality"' in (tmp_path / "p" / "model.json").read_text()
    loaded, spec2 = models.load(tmp_path / "p")
    assert spec2.attention == "locality" and spec2.widths == widths
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_wrong_widths_are_refused(tmp_path):
    model, spec = tiny_vit()
    widths = prune_model(model, torch.randn(1, 3, 32, 32), PruneConfig(ratio=0.5, importance="l2"))
    models.save(model, spec.with_widths(widths), tmp_path / "p")
    js = tmp_path / "p" / "model.json"
    import json

    meta = json.loads(js.read_text())
    meta["widths"]["blocks"]["blocks.0"]["mlp_hidden"] += 8
    js.write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=r"blocks\.0\.mlp\.fc1\.weight.*widths"):
        models.load(tmp_path / "p")
    meta["widths"]["blocks"]["blocks.0"]["attn_dim"] = 5
    js.write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="attn_dim=5 is not num_heads x head_dim"):
        models.load(tmp_path / "p")
    from safetensors.torch import load_file, save_file

    models.save(model, spec.with_widths(widths), tmp_path / "q")
    weights = load_file(str(tmp_path / "q" / "model.safetensors"))
    save_file(
        {**weights, "blocks.9.attn.qkv.weight": torch.zeros(1)}, str(tmp_path / "q" / "model.safetensors")
    )
    with pytest.raises(ModelError, match=r"unexpected blocks\.9\.attn\.qkv\.weight"):
        models.load(tmp_path / "q")
    fresh, _ = tiny_vit()
    with pytest.raises(ModelError, match="unknown layer 'blocks.7'"):
        apply_widths(fresh, Widths(32, {"blocks.7": BlockWidths(1, 8, 8)}))
    with pytest.raises(ModelError, match="'blocks.0' must have exactly the keys"):
        Widths.from_json({"format": 1, "embed_dim": 32, "blocks": {"blocks.0": {}}})
    blocks = read_widths(fresh).blocks
    with pytest.raises(ModelError, match=r"blocks\.1\.mlp_hidden=0 must be a positive integer"):
        apply_widths(fresh, Widths(32, {**blocks, "blocks.1": BlockWidths(1, 8, 0)}))


def test_pruned_model_exports_to_onnx(tmp_path):
    import onnxruntime as ort

    model, _ = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    prune_model(model, x[:1], PruneConfig(ratio=0.2, importance="l2"))
    path = tmp_path / "p.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["input"], verbose=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), model(x).detach(), rtol=1e-4, atol=1e-4)


def test_bad_input():
    model, _ = tiny_vit()
    x = torch.randn(1, 3, 32, 32)
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ConfigError, match="must be"):
            prune_model(model, x, dataclasses.replace(PruneConfig(importance="l2")), ratio=bad)
        with pytest.raises(ConfigError, match=r"prune.ratio"):
            PruneConfig(ratio=bad)
    with pytest.raises(ConfigError, match="needs training batches"):
        prune_model(model, x, PruneConfig(ratio=0.2, importance="taylor"))
    cnn = models.build(models.make_spec("resnet10t", 4, CLASSES, 32))
    with pytest.raises(ModelError, match="cannot prune a ResNet"):
        prune_model(cnn, x, PruneConfig(ratio=0.2, importance="l2"))
    # a ViT whose attention has q/k norm: the error names the layer
    spec = models.make_spec("vit_tiny_patch16_224", 4, CLASSES, 32, "patch", {**TINY, "qk_norm": True})
    with pytest.raises(ModelError, match=r"cannot prune layer 'blocks.0.attn'"):
        prune_model(models.build(spec), x, PruneConfig(ratio=0.2, importance="l2"))


# --------------------------------------------------------------------------- depth


def deeper_vit(depth=4):
    spec = models.make_spec(
        "vit_tiny_patch16_224", len(CLASSES), CLASSES, 32, "conv", {**TINY, "depth": depth}
    )
    torch.manual_seed(0)
    return models.build(spec).eval(), spec


def _silence(block):
    """Make a block an identity: both residual branches output zero."""
    with torch.no_grad():
        block.attn.proj.weight.zero_()
        block.attn.proj.bias.zero_()
        block.mlp.fc2.weight.zero_()
        block.mlp.fc2.bias.zero_()


def test_block_drop_order_removes_blocks_that_do_nothing_first():
    model, _ = deeper_vit(4)
    _silence(model.blocks[1])
    _silence(model.blocks[3])
    xs = [x for x, _ in batches(n=2)]
    fresh = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        before = model(fresh)
    order = block_drop_order(model, xs, depth=2)
    assert sorted(order) == [1, 3]  # skipping them changes nothing; skipping any other block does
    assert len(model.blocks) == 4  # scoring leaves the model whole
    with torch.no_grad():  # and computing: its stem, replayed while scoring, runs on new images again
        assert torch.equal(model(fresh), before)


def test_block_drop_order_scores_as_a_full_forward_of_each_skip(caplog):
    """The scorer reuses the tokens entering each block; a plain forward per skipped block must agree."""
    import logging

    import torch.nn.functional as F
    from torch import nn

    model, _ = deeper_vit(5)
    with torch.no_grad():  # blocks that matter unequally, so the order is not a tie
        for i, b in enumerate(model.blocks):
            b.mlp.fc2.weight.mul_(1 + i)
    xs = [x for x, _ in batches(n=2)]
    blocks = list(model.blocks)
    with torch.no_grad():
        ref = [F.log_softmax(model(x), -1) for x in xs]
        kept, expected, expected_kl = list(range(5)), [], []
        while len(kept) > 2:
            scores = []
            for i in kept:
                model.blocks = nn.Sequential(*(blocks[j] for j in kept if j != i))
                kl = sum(
                    F.kl_div(F.log_softmax(model(x), -1), r, log_target=True, reduction="batchmean").item()
                    for x, r in zip(xs, ref, strict=True)
                ) / len(xs)
                scores.append((kl, i))
            kl, least = min(scores)
            kept.remove(least)
            expected.append(least)
            expected_kl.append(kl)
        model.blocks = nn.Sequential(*blocks)
    with caplog.at_level(logging.INFO, logger="slimvit.vit_pruning"):
        assert block_drop_order(model, xs, depth=2) == expected
    logged = [
        float(r.getMessage().split("KL ")[1].split()[0]) for r in caplog.records if "KL" in r.getMessage()
    ]
    assert logged == pytest.approx([round(k, 4) for k in expected_kl], abs=1e-4)
    assert list(model.blocks) == blocks  # scoring leaves the model whole


def test_drop_blocks_saves_loads_and_computes_without_the_blocks(tmp_path):
    model, spec = deeper_vit(4)
    model = model.eval()
    x = torch.randn(3, 3, 32, 32)
    kept = [model.blocks[0], model.blocks[2]]
    with torch.no_grad():  # what the model computes with blocks 1 and 3 skipped
        t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for b in kept:
            t = b(t)
        expected = model.forward_head(model.norm(t))
    widths = drop_blocks(model, [3, 1])
    assert list(widths.blocks) == ["blocks.0", "blocks.1"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    pspec = dataclasses.replace(spec.with_widths(widths), kwargs={**spec.kwargs, "depth": 2})
    models.save(model, pspec, tmp_path / "d")
    loaded, spec2 = models.load(tmp_path / "d")
    assert len(loaded.blocks) == 2 and spec2.kwargs["depth"] == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    # width pruning still works on the shallower model
    w2 = prune_model(loaded, x[:1], PruneConfig(ratio=0.5, importance="l2"))
    assert len(w2.blocks) == 2


def test_depth_bad_input():
    model, _ = deeper_vit(4)
    for depth in (0, 4, 5):
        with pytest.raises(ConfigError, match=rf"depth={depth} must be in \[1, 3\]"):
            block_drop_order(model, [torch.randn(2, 3, 32, 32)], depth=depth)
    with pytest.raises(ConfigError, match="cannot remove blocks"):
        drop_blocks(model, [0, 1, 2, 3])
    with pytest.raises(ConfigError, match="cannot remove blocks"):
        drop_blocks(model, [7])
    with pytest.raises(ConfigError, match="depths"):
        PruneConfig(sweep=(0.3,), depths=(0,))
    with pytest.raises(ConfigError, match="needs|set a prune.sweep"):
        PruneConfig(depths=(6,))


def test_candidates_are_the_points_of_the_last_sweep(tmp_path):
    import json

    from slimvit.export import candidates

    for name in ("r0.3", "r0.3-d6", "r0.3-d4", "r0.5", "r0.5-d6"):
        (tmp_path / "sweep" / name).mkdir(parents=True)
        (tmp_path / "sweep" / name / "model.json").write_text("{}")
    # no sweep summary yet: every sweep folder, in ratio order, fewer blocks later
    assert candidates(tmp_path) == [
        "pruned",
        "sweep/r0.3",
        "sweep/r0.3-d6",
        "sweep/r0.3-d4",
        "sweep/r0.5",
        "sweep/r0.5-d6",
    ]
    # a later sweep of 0.2 (the main model) and 0.5 with depth 6: the other folders are no candidates
    points = [{"model": m} for m in ("pruned", "sweep/r0.5-d6", "sweep/r0.5")]
    (tmp_path / "prune_sweep.json").write_text(json.dumps({"points": points}))
    assert candidates(tmp_path) == ["pruned", "sweep/r0.5", "sweep/r0.5-d6"]
    assert (tmp_path / "sweep" / "r0.3-d4").is_dir()  # kept on disk for a sweep that has it again
