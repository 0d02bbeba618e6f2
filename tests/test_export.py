"""ONNX export: parity with PyTorch, fused attention, metadata, dynamic batch, bad input."""

import json

import numpy as np
import onnx
import pytest
import torch

from slimvit import models, runtime
from slimvit.config import PruneConfig
from slimvit.errors import ModelError
from slimvit.export import export_onnx, for_export, parity
from slimvit.vit_pruning import prune_model

CLASSES = ["a", "b", "c"]
TINY = {"depth": 2, "embed_dim": 96, "num_heads": 3}


def tiny(pruned: bool = False, name="vit_tiny_patch16_224", attention="plain"):
    spec = models.make_spec(name, 3, CLASSES, 32, "conv", TINY, attention)
    torch.manual_seed(0)
    model = models.build(spec).eval()
    if pruned:
        widths = prune_model(model, torch.randn(1, 3, 32, 32), PruneConfig(ratio=0.2, importance="l2"))
        spec = spec.with_widths(widths)
    return model, spec


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("pruned", [False, True])
def test_parity_and_metadata(tmp_path, fuse, pruned):
    model, spec = tiny(pruned)
    path = tmp_path / "m.onnx"
    info = export_onnx(model, spec, path, stage="pruned", fuse_attention=fuse)
    proto = onnx.load(str(path))
    ops = {n.op_type for n in proto.graph.node}
    assert ("Attention" in ops) == fuse and info["fused_attention"] == (2 if fuse else 0)
    # ORT's transformer fusions: bias + GELU becomes one node; residual add + LayerNorm stays two
    # (ORT's CPU SkipLayerNormalization is the slower of the two forms)
    assert "BiasGelu" in ops and "Erf" not in ops and info["transformer_fusions"]["BiasGelu"] == 2
    assert "SkipLayerNormalization" not in ops and "LayerNormalization" in ops
    assert info["opset"] >= 17
    x = torch.randn(7, 3, 32, 32)  # a batch size never seen at export: the batch axis is dynamic
    check = parity(model, path, x, threads=1)
    assert check["agreement"] == 1.0 and check["max_abs_diff"] < 1e-4
    sess = runtime.session(path, 1)
    meta = runtime.metadata(sess)
    assert meta["classes"] == CLASSES and meta["input_size"] == [3, 32, 32]
    assert meta["mean"] == list(spec.mean) and meta["stage"] == "pruned" and meta["precision"] == "fp32"
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("attention", ["plain", "locality"])
def test_an_unfused_export_declares_the_contrib_domain_its_fusions_write(tmp_path, attention):
    """Attention left as standard ops (`fuse_attention=false`, or locality attention, which the fused kernels
    cannot express): ORT's fusions still write BiasGelu, a contrib op, so the file must import its domain
    or onnx's shape inference (the fp16 conversion) refuses it."""
    from slimvit.config import QuantizeConfig
    from slimvit.quantize import to_fp16

    model, spec = tiny(True, attention=attention)
    path = tmp_path / "m.onnx"
    info = export_onnx(model, spec, path, stage="pruned", fuse_attention=attention == "locality")
    proto = onnx.load(str(path))
    assert info["fused_attention"] == 0 and "Attention" not in {n.op_type for n in proto.graph.node}
    assert "com.microsoft" in {o.domain for o in proto.opset_import}
    x = torch.randn(5, 3, 32, 32)
    check = parity(model, path, x, threads=1)
    assert check["agreement"] == 1.0 and check["max_abs_diff"] < 1e-4
    to_fp16(path, tmp_path / "h.onnx", QuantizeConfig())
    half = runtime.run_logits(runtime.session(tmp_path / "h.onnx", 1), x.numpy())
    assert np.abs(half - runtime.run_logits(runtime.session(path, 1), x.numpy())).max() < 0.05


def test_locality_attention_is_never_fused(tmp_path):
    model, spec = tiny(attention="locality")
    assert for_export(model, fuse_attention=True)[1] == 0  # ORT's kernels have no diagonal mask


def test_export_without_optimisation_keeps_standard_ops(tmp_path):
    model, spec = tiny(False)
    info = export_onnx(
        model, spec, tmp_path / "m.onnx", stage="student", fuse_attention=False, optimize=False
    )
    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert info["transformer_fusions"] == {} and "LayerNormalization" in ops and "Erf" in ops
    assert not ops & {"SkipLayerNormalization", "BiasGelu", "Attention"}  # standard ONNX only


def test_sessions_do_not_fuse_skip_layer_norm(tmp_path):
    """What ORT actually runs (its optimised graph) keeps LayerNormalization, not SkipLayerNormalization."""
    import onnxruntime as ort

    model, spec = tiny(False)
    src = tmp_path / "m.onnx"
    export_onnx(model, spec, src, stage="student", optimize=False)

    def ops_run(open_session, name):
        so = runtime.session_options(1)
        so.optimized_model_filepath = str(tmp_path / name)
        open_session(so)
        return {n.op_type for n in onnx.load(str(tmp_path / name)).graph.node}

    plain = ops_run(
        lambda so: ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"]), "a.onnx"
    )
    ours = ops_run(lambda so: runtime.session(src, options=so), "b.onnx")
    assert "SkipLayerNormalization" in plain  # ORT fuses it on load by default ...
    assert "SkipLayerNormalization" not in ours and "LayerNormalization" in ours  # ... slimvit does not


def test_fused_copy_matches_and_leaves_original(tmp_path):
    model, _ = tiny(pruned=True)
    copy, n = for_export(model)
    assert n == 2
    assert type(model.blocks[0].attn).__name__ == "Attention"  # the original is untouched
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(copy(x), model(x), rtol=1e-5, atol=1e-5)


def test_distilled_token_model_exports_averaged_heads(tmp_path):
    model, spec = tiny(name="deit_tiny_distilled_patch16_224")
    path = tmp_path / "d.onnx"
    export_onnx(model, spec, path, stage="student")
    x = torch.randn(2, 3, 32, 32)
    check = parity(model, path, x, threads=1)
    assert check["agreement"] == 1.0 and check["max_abs_diff"] < 1e-4


def test_cnn_teacher_exports(tmp_path):
    spec = models.make_spec("resnet10t", 3, CLASSES, 32)
    model = models.build(spec).eval()
    path = tmp_path / "t.onnx"
    info = export_onnx(model, spec, path, stage="teacher")
    assert info["fused_attention"] == 0
    assert parity(model, path, torch.randn(4, 3, 32, 32), threads=1)["max_abs_diff"] < 1e-4


def test_session_and_metadata_errors(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(ModelError, match="not an ONNX model"):
        runtime.session(bad)
    with pytest.raises(ModelError, match="does not exist"):
        runtime.session(tmp_path / "missing.onnx")
    # a valid ONNX model without slimvit metadata
    model, spec = tiny()
    path = tmp_path / "m.onnx"
    export_onnx(model, spec, path, stage="student", fuse_attention=False)
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "plain.onnx"))
    with pytest.raises(ModelError, match="no slimvit metadata"):
        runtime.metadata(runtime.session(tmp_path / "plain.onnx"))
    with pytest.raises(ModelError, match="no slimvit metadata"):
        runtime.proto_metadata(proto)  # the same check without a session
    assert runtime.proto_metadata(onnx.load(str(path)))["classes"] == CLASSES
    runtime.embed_metadata(proto, {"classes": CLASSES})
    onnx.save(proto, str(tmp_path / "partial.onnx"))
    with pytest.raises(ModelError, match="lacks input_size"):
        runtime.metadata(runtime.session(tmp_path / "partial.onnx"))
    assert json.loads(proto.metadata_props[-1].value)["format"] == runtime.META_FORMAT


def test_softmax_rows_sum_to_one():
    p = runtime.softmax(np.array([[1000.0, 0.0], [1.0, 1.0]], dtype=np.float32))
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(p[1], [0.5, 0.5])
