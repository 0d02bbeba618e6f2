"""Each quantization mode yields a runnable ONNX model with the right outputs; bad input is refused."""

import numpy as np
import pytest
import torch
from test_export import tiny
from test_train import synthetic_data

from slimvit import runtime
from slimvit.config import QuantizeConfig
from slimvit.errors import ConfigError
from slimvit.export import export_onnx
from slimvit.preprocess import normalize
from slimvit.quantize import MODES, calibration_images, op_census
from slimvit.spec import ModelSpec


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("q")
    model, spec = tiny(pruned=True)
    export_onnx(model, spec, d / "fp32.onnx", stage="pruned")
    return d, model, spec


@pytest.mark.parametrize("mode", sorted(MODES))
def test_mode_produces_runnable_model(exported, mode):
    d, model, spec = exported
    fn, needs_calib = MODES[mode]
    calib = (
        np.random.default_rng(0).standard_normal((16, 3, 32, 32), dtype=np.float32) if needs_calib else None
    )
    dst = d / f"{mode}.onnx"
    info = fn(d / "fp32.onnx", dst, QuantizeConfig(calibration_images=16), calib)
    x = torch.randn(5, 3, 32, 32)
    got = runtime.run_logits(runtime.session(dst, 1), x.numpy())
    assert got.shape == (5, 3) and np.isfinite(got).all()
    ref = model(x).detach().numpy()
    assert np.abs(got - ref).max() < 0.5  # quantization noise, not a different function
    census = op_census(dst)
    fp32_size = (d / "fp32.onnx").stat().st_size
    if mode.startswith("int8"):
        assert census["int8"], census
        assert dst.stat().st_size < 0.6 * fp32_size
    if mode == "int8-dynamic":
        assert "QAttention" in census["int8"] and "MatMulInteger" in census["int8"]
        assert (
            "Mul" not in census["float32"]
        )  # the rescaling of int8 products is part of them, not float work
    if mode == "int8-static":
        assert (
            "MatMul" in census["int8"] and "Attention" in census["float32"]
        )  # no static int8 attention in ORT
        assert set(census["int8"]) <= {"MatMul", "Conv", "Gemm"}  # residual adds, norms, GELU stay float
        assert "calibrated" in info["activations"]
    if mode == "int8-mixed":  # the conv stem static (QDQ), MatMul and attention dynamic
        assert {"Conv", "MatMulInteger", "QAttention"} <= set(census["int8"]), census
        assert census["float32"].get("Conv") == 1  # only the conv that reads the 3-channel image
        fn_dyn, _ = MODES["int8-dynamic"]
        fn_dyn(d / "fp32.onnx", d / "dyn_ref.onnx", QuantizeConfig(), None)
        assert dst.stat().st_size < (d / "dyn_ref.onnx").stat().st_size  # the stem's weights are int8 too
    if mode == "fp16":
        assert census["fp16"] and dst.stat().st_size < 0.7 * fp32_size
        assert isinstance(info["kept_float32"], list)
    assert not list(d.glob("*.tmp")) and not list(d.glob("*.pre.onnx")) and not list(d.glob("*.static.onnx"))


def test_calibration_uses_training_images_and_adapts_to_too_few():
    data = synthetic_data(n_per_class=8)  # 4 training images per class -> 12
    spec = ModelSpec("vit", 3, ("a", "b", "c"), (3, 32, 32), (0.5,) * 3, (0.5,) * 3)
    calib = calibration_images(data, spec, 8, seed=0)
    assert calib.shape == (8, 3, 32, 32) and calib.dtype == np.float32
    train = {x.tobytes() for x in normalize(data.arrays("train")[0], spec.mean, spec.std)}
    assert all(c.tobytes() in train for c in calib)  # never a val/test image
    assert len({c.tobytes() for c in calib}) == 8
    # more than the training split has: all of them (a small dataset is calibrated, not refused after training)
    everything = calibration_images(data, spec, 100, seed=0)
    assert len(everything) == len(train) == 12 and {c.tobytes() for c in everything} == train


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="quantize.modes entry"):
        QuantizeConfig(modes=("int4",))
    with pytest.raises(ConfigError, match="quantize.calibration="):
        QuantizeConfig(calibration="kl")
    with pytest.raises(ConfigError, match="calibration_images"):
        QuantizeConfig(calibration_images=2)
