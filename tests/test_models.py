"""Model creation from timm names, the errors for names and files that do not fit, local weights files,
save/load of the artifact format, and the logits a (distilled) model is judged by."""

import dataclasses
import hashlib
import math

import pytest
import timm
import torch
from torch import nn

from slimvit import models
from slimvit.errors import ModelError
from slimvit.spec import ModelSpec
from slimvit.vit import ConvStem

CLASSES = ["a", "b", "c"]
VIT = "vit_tiny_patch16_224"
TINY = {"depth": 2, "embed_dim": 48, "num_heads": 3}


def _vit(stem: str = "patch", seed: int = 0, num_classes: int = 3, name: str = VIT, **kw):
    spec = models.make_spec(
        name, num_classes, [f"c{i}" for i in range(num_classes)], 32, stem, {**TINY, **kw}
    )
    torch.manual_seed(seed)
    return models.build(spec).eval(), spec


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- names and specs


def test_make_spec_reads_timm_normalisation_and_keeps_the_stem_for_vits_only():
    spec = models.make_spec(VIT, 3, CLASSES, 32, "conv", TINY)
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.5, 0.5, 0.5)  # the augreg ViT's own
    assert spec.input_size == (3, 32, 32) and spec.img_size == 32 and spec.stem == "conv"
    assert spec.classes == tuple(CLASSES) and spec.kwargs == TINY and spec.widths is None
    cnn = models.make_spec("resnet10t", 3, CLASSES, 32, "conv")
    assert cnn.stem == "patch"  # a CNN has no token stem to replace
    assert cnn.mean == pytest.approx(timm.data.IMAGENET_DEFAULT_MEAN)
    assert cnn.std == pytest.approx(timm.data.IMAGENET_DEFAULT_STD)


def test_is_vit():
    assert models.is_vit(VIT) and models.is_vit("deit_tiny_distilled_patch16_224")
    assert not models.is_vit("resnet10t")
    assert not models.is_vit("no_such_model_xyz")  # unknown: not a ViT, and no exception


@pytest.mark.parametrize("call", ["check", "make_spec", "build"])
def test_unknown_model_name_is_named_with_close_matches(call):
    bad = "vit_tiny_patch16_22"
    with pytest.raises(ModelError) as e:
        if call == "check":
            models.check_model_name(bad)
        elif call == "make_spec":
            models.make_spec(bad, 3, CLASSES, 32)
        else:
            models.build(ModelSpec(bad, 3, tuple(CLASSES), (3, 32, 32), (0.5,) * 3, (0.5,) * 3))
    msg = str(e.value)
    assert f"'{bad}'" in msg and "Did you mean" in msg and VIT in msg


def test_a_name_like_nothing_points_to_the_list():
    with pytest.raises(ModelError, match=r"unknown timm model 'qqqq_zzzz'\. See timm\.list_models\(\)"):
        models.check_model_name("qqqq_zzzz")


# --------------------------------------------------------------------------- build


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_build_a_vit_at_the_spec_size_and_classes(stem):
    model, spec = _vit(stem, num_classes=5)
    assert isinstance(model, timm.models.vision_transformer.VisionTransformer)
    assert isinstance(model.patch_embed, ConvStem) == (stem == "conv")
    assert model.patch_embed.grid_size == (2, 2) and len(model.blocks) == 2 and model.embed_dim == 48
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    with pytest.raises((AssertionError, RuntimeError)):  # a fixed-size ViT, at the spec's size
        model(torch.randn(1, 3, 64, 64))


def test_build_a_cnn_without_vit_arguments():
    spec = models.make_spec("resnet10t", 4, list("wxyz"), 32)
    model = models.build(spec).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 48)).shape == (1, 4)  # no img_size passed: any size


def test_build_refuses_an_unknown_stem_and_unknown_arguments():
    import dataclasses

    spec = models.make_spec(VIT, 3, CLASSES, 32, "patch", TINY)
    with pytest.raises(ModelError, match="unknown stem 'wavelet'; known: patch, conv"):
        models.build(dataclasses.replace(spec, stem="wavelet"))
    with pytest.raises(ModelError, match="unknown attention 'sparse'; known: plain, locality"):
        models.build(dataclasses.replace(spec, attention="sparse"))
    with pytest.raises(ModelError, match=f"timm model '{VIT}' does not accept these arguments"):
        models.build(dataclasses.replace(spec, kwargs={**TINY, "no_such_option": 1}))


def test_build_is_deterministic_under_a_seed():
    a, _ = _vit(seed=3)
    b, _ = _vit(seed=3)
    c, _ = _vit(seed=4)
    assert _same_weights(a, b) and not _same_weights(a, c)


# --------------------------------------------------------------------------- local weights


@pytest.mark.parametrize("wrap", [None, "state_dict", "model", "model_state_dict"])
def test_create_from_a_torch_checkpoint(tmp_path, wrap):
    src, spec = _vit(seed=1)
    sd = src.state_dict()
    path = tmp_path / "w.pth"
    torch.save(sd if wrap is None else {wrap: sd, "epoch": 7}, path)
    model = models.create(spec, weights=str(path)).eval()
    assert _same_weights(model, src)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))


def test_create_from_a_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    src, spec = _vit("conv", seed=2)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    assert _same_weights(models.create(spec, weights=tmp_path / "w.safetensors"), src)


def test_weights_files_that_cannot_be_read(tmp_path):
    _, spec = _vit()
    with pytest.raises(ModelError, match="'.*nosuch.pth' does not exist"):
        models.create(spec, weights=str(tmp_path / "nosuch.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read weights file '.*junk.pth'"):
        models.create(spec, weights=str(tmp_path / "junk.pth"))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ModelError, match="cannot read weights file"):
        models.create(spec, weights=str(tmp_path / "junk.safetensors"))
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(ModelError, match="does not hold a state dict"):
        models.create(spec, weights=str(tmp_path / "list.pth"))


def test_weights_file_for_another_architecture_names_the_keys(tmp_path):
    five, _ = _vit(num_classes=5)
    torch.save(five.state_dict(), tmp_path / "five.pth")
    _, spec = _vit()
    with pytest.raises(ModelError, match=r"shape mismatch: head\.weight \(5, 48\) vs \(3, 48\)"):
        models.create(spec, weights=str(tmp_path / "five.pth"))
    deeper, _ = _vit(depth=3)
    torch.save(deeper.state_dict(), tmp_path / "deep.pth")
    with pytest.raises(ModelError, match=r"unexpected: blocks\.2\."):
        models.create(spec, weights=str(tmp_path / "deep.pth"))
    model, _ = _vit()
    partial = {k: v for k, v in deeper.state_dict().items() if not k.startswith("head.")}
    torch.save(partial, tmp_path / "nohead.pth")
    with pytest.raises(ModelError, match=r"missing: head\.weight, head\.bias"):
        models.load_weights_file(model, tmp_path / "nohead.pth")


def test_non_strict_loading_takes_what_fits_but_never_a_wrong_shape(tmp_path):
    src, _ = _vit(seed=5)
    no_head = {k: v for k, v in src.state_dict().items() if not k.startswith("head.")}
    torch.save(no_head, tmp_path / "backbone.pth")
    model, _ = _vit(seed=6)
    head_before = model.head.weight.detach().clone()
    models.load_weights_file(model, tmp_path / "backbone.pth", strict=False)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    assert torch.equal(model.head.weight, head_before)  # missing: left as it was
    five, _ = _vit(num_classes=5)
    torch.save(five.state_dict(), tmp_path / "five.pth")
    with pytest.raises(ModelError, match="shape mismatch"):
        models.load_weights_file(model, tmp_path / "five.pth", strict=False)


def test_pretrained_and_weights_are_exclusive(tmp_path):
    _, spec = _vit()
    with pytest.raises(ModelError, match="not both"):
        models.create(spec, pretrained=True, weights=str(tmp_path / "w.pth"))


# --------------------------------------------------------------------------- pretrained (no network)


def _fake_hub(monkeypatch, fail: bool = False):
    """timm.create_model whose pretrained=True gives seeded weights (or fails as offline), never the network."""
    real = timm.create_model
    calls = []

    def create_model(name, pretrained=False, **kw):
        calls.append((name, pretrained, kw))
        if pretrained and fail:
            raise OSError("We couldn't connect to 'https://huggingface.co'\nsecond line")
        if pretrained:
            torch.manual_seed(123)
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", create_model)
    return calls


def test_pretrained_offline_is_one_line_that_says_what_to_do(monkeypatch):
    _fake_hub(monkeypatch, fail=True)
    _, spec = _vit()
    with pytest.raises(ModelError) as e:
        models.create(spec, pretrained=True)
    msg = str(e.value)
    assert f"'{VIT}'" in msg and "OSError" in msg and "weights: FILE" in msg and "pretrained: false" in msg
    assert "second line" not in msg and "\n" not in msg


def test_pretrained_conv_stem_keeps_the_transformer_and_a_fresh_stem(monkeypatch):
    calls = _fake_hub(monkeypatch)
    _, spec = _vit("conv")
    torch.manual_seed(0)
    model = models.create(spec, pretrained=True)
    name, pretrained, kw = calls[-1]
    assert pretrained and kw["img_size"] == 32 and kw["num_classes"] == 3 and "embed_layer" not in kw
    torch.manual_seed(123)
    pre = timm.create_model(VIT, num_classes=3, img_size=32, **TINY)
    assert isinstance(model.patch_embed, ConvStem)
    for k, v in pre.state_dict().items():
        if not k.startswith("patch_embed."):
            assert torch.equal(model.state_dict()[k], v), k
    # with the patch stem the pretrained model is the model, stem included
    _, spec = _vit("patch")
    model = models.create(spec, pretrained=True)
    assert _same_weights(model, pre)
    # locality attention: every pretrained weight, and the temperatures at their start (1/sqrt(head_dim))
    model = models.create(dataclasses.replace(spec, attention="locality"), pretrained=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in pre.state_dict().items())
    assert all(math.isclose(b.attn.log_scale.exp().item(), 16**-0.5, rel_tol=1e-6) for b in model.blocks)


# --------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_save_load_round_trip(tmp_path, stem):
    model, spec = _vit(stem, seed=7)
    out = models.save(model, spec, tmp_path / "m")
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors"]  # no temp files
    loaded, spec2 = models.load(out)
    assert spec2 == spec and not loaded.training
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    # the folder, its model.json or its safetensors file all name the artifact
    for p in (out / "model.json", out / "model.safetensors"):
        assert _same_weights(models.load(p)[0], loaded)


def test_save_is_byte_for_byte_repeatable(tmp_path):
    model, spec = _vit(seed=8)
    digests = set()
    for i in range(3):
        models.save(model, spec, tmp_path / str(i))
        digests.add(hashlib.sha256((tmp_path / str(i) / "model.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1


def test_load_refuses_incomplete_or_corrupt_artifacts(tmp_path):
    model, spec = _vit()
    models.save(model, spec, tmp_path / "m")
    st = tmp_path / "m" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:100])
    with pytest.raises(ModelError, match="is corrupt, re-run the stage"):
        models.load(tmp_path / "m")
    st.unlink()
    with pytest.raises(ModelError, match="is missing; the artifact is incomplete"):
        models.load(tmp_path / "m")
    with pytest.raises(ModelError, match="no model.json"):
        models.load(tmp_path / "nothing")


def test_load_refuses_weights_of_another_model(tmp_path):
    import shutil

    five, spec5 = _vit(num_classes=5)
    three, spec3 = _vit()
    models.save(five, spec5, tmp_path / "five")
    models.save(three, spec3, tmp_path / "three")
    shutil.copy(tmp_path / "five" / "model.safetensors", tmp_path / "three" / "model.safetensors")
    with pytest.raises(ModelError, match=r"head\.weight: saved \(5, 48\), model\.json widths give \(3, 48\)"):
        models.load(tmp_path / "three")


# --------------------------------------------------------------------------- judged logits


def test_eval_logits_averages_a_pair_and_passes_a_tensor():
    a, b = torch.tensor([[1.0, 3.0]]), torch.tensor([[3.0, -1.0]])
    assert torch.equal(models.eval_logits((a, b)), torch.tensor([[2.0, 1.0]]))
    assert torch.equal(models.eval_logits([a, b]), torch.tensor([[2.0, 1.0]]))
    assert models.eval_logits(a) is a


def test_eval_logits_of_a_distilled_deit_in_training_equal_its_eval_output():
    """timm's distilled DeiT returns (class head, distillation head) while it trains and their mean in eval."""
    spec = models.make_spec("deit_tiny_distilled_patch16_224", 3, CLASSES, 32, "patch", TINY)
    torch.manual_seed(0)
    model = models.build(spec)
    model.set_distilled_training(True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pair = model.train()(x)  # no dropout in this model: train and eval compute the same function
        assert isinstance(pair, tuple) and len(pair) == 2 and not torch.equal(pair[0], pair[1])
        judged = model.eval()(x)
    torch.testing.assert_close(models.eval_logits(pair), judged, rtol=1e-5, atol=1e-6)


def test_count_params():
    assert models.count_params(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2, bias=False))) == 3 * 4 + 4 + 8
    assert models.count_params(nn.BatchNorm2d(5)) == 10  # running statistics are buffers, not parameters
