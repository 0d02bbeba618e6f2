"""The torch-free ONNX Runtime wrapper: session settings, running a model, the slimvit metadata (parsed,
checked, embedded, updated) and the runner a deployed model is opened with. The model is the tiny
brightness classifier of tests/tiny_onnx.py, whose logits have a closed form."""

import json

import numpy as np
import onnx
import pytest
from tiny_onnx import CLASSES, SIZE, write_tiny_onnx

from slimvit import runtime
from slimvit.errors import ModelError

CENTERS = np.linspace(-1.5, 1.5, len(CLASSES))


def _tiny_logits(x: np.ndarray) -> np.ndarray:
    """What the tiny model computes: logit_j = 2 c_j m - c_j^2 for the mean m over pixels and channels,
    i.e. -(m - c_j)^2 up to a constant per image."""
    m = x.astype(np.float64).mean((1, 2, 3))[:, None]
    return 2 * CENTERS * m - CENTERS**2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_onnx(tmp_path_factory.mktemp("tiny") / "model.onnx")


def _x(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, SIZE, SIZE), dtype=np.float32)


# --------------------------------------------------------------------------- sessions


def test_session_options_are_fixed_and_sequential():
    import onnxruntime as ort

    so = runtime.session_options(3)
    assert so.intra_op_num_threads == 3 and so.inter_op_num_threads == 1
    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_session_is_cpu_and_uses_the_thread_count(tiny):
    sess = runtime.session(tiny, threads=1)
    assert sess.get_providers() == ["CPUExecutionProvider"]
    assert sess.get_session_options().intra_op_num_threads == 1
    so = runtime.session_options(2)
    assert runtime.session(str(tiny), options=so).get_session_options().intra_op_num_threads == 2


def test_session_errors_are_one_line(tmp_path):
    with pytest.raises(ModelError, match=r"ONNX model '.*missing\.onnx' does not exist"):
        runtime.session(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(ModelError, match="is not an ONNX model ONNX Runtime can run") as e:
        runtime.session(bad)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- running


def test_run_logits_computes_the_model_in_batches(tiny):
    sess = runtime.session(tiny, 1)
    x = _x(7)
    x[:2] -= 1.5  # dark and bright images: different classes
    x[-2:] += 1.5
    got = runtime.run_logits(sess, x, batch_size=3)  # 3 + 3 + 1
    assert got.shape == (7, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, _tiny_logits(x), rtol=1e-5, atol=1e-5)
    assert got[:2].argmax(1).tolist() == [0, 0] and got[-2:].argmax(1).tolist() == [2, 2]
    np.testing.assert_array_equal(runtime.run_logits(sess, x, batch_size=64), got)


def test_run_logits_of_no_images_keeps_the_class_axis(tiny):
    from slimvit.evaluate import metrics_from_logits

    got = runtime.run_logits(runtime.session(tiny, 1), _x(0))
    assert got.shape == (0, len(CLASSES))
    assert metrics_from_logits(got, np.zeros(0, int), CLASSES)["n"] == 0


@pytest.mark.parametrize(
    "x,match",
    [
        (np.zeros((1, 3, 16, 16), np.float32), "invalid dimensions"),
        (np.zeros((1, 3, SIZE, SIZE), np.float64), "data type"),
    ],
)
def test_predictor_turns_runtime_errors_into_one_line(tiny, x, match):
    predict = runtime.predictor(runtime.session(tiny, 1))
    with pytest.raises(ModelError, match=f"ONNX Runtime failed to run the model.*{match}") as e:
        predict(x)
    assert "\n" not in str(e.value)


def test_softmax_is_stable_and_shift_invariant():
    z = np.array([[1.0, 2.0, 3.0], [1000.0, 1000.0, -1000.0]])
    p = runtime.softmax(z)
    e = np.exp([1.0, 2.0, 3.0])
    np.testing.assert_allclose(p[0], e / e.sum())
    np.testing.assert_allclose(p[1], [0.5, 0.5, 0.0], atol=1e-12)  # no overflow to nan
    np.testing.assert_allclose(runtime.softmax(z[:1] - 50.0), p[:1])
    np.testing.assert_allclose(p.sum(1), 1.0)


# --------------------------------------------------------------------------- metadata


def test_metadata_of_a_session_and_of_the_proto_agree(tiny):
    meta = runtime.metadata(runtime.session(tiny, 1))
    assert meta["format"] == runtime.META_FORMAT and meta["classes"] == CLASSES
    assert meta["input_size"] == [3, SIZE, SIZE] and meta["std"] == [0.25] * 3 and meta["stage"] == "pruned"
    assert runtime.proto_metadata(onnx.load(str(tiny))) == meta


def _meta_error(tmp_path, **kw) -> str:
    path = write_tiny_onnx(tmp_path / "m.onnx", **kw)
    with pytest.raises(ModelError) as e:
        runtime.metadata(runtime.session(path, 1))
    with pytest.raises(ModelError) as e2:
        runtime.proto_metadata(onnx.load(str(path)))  # the same check without a session
    # the same problem either way (a dynamic batch axis reads None in the proto, 'batch' in a session)
    assert str(e.value)[:70] == str(e2.value)[:70] and "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize(
    "meta,field",
    [
        ({"classes": ["a", "a", "b"]}, "classes"),  # duplicate names
        ({"classes": ["a", "", "b"]}, "classes"),
        ({"classes": []}, "classes"),
        ({"input_size": [1, SIZE, SIZE]}, "input_size"),  # not RGB
        ({"input_size": [3, SIZE, SIZE + 1]}, "input_size"),  # not square
        ({"input_size": [3, True, True]}, "input_size"),  # booleans are no sizes
        ({"mean": [0.5, float("nan"), 0.5]}, "mean"),
        ({"std": [0.25, 0.25, -0.25]}, "std"),
        ({"temperature": 0}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": "1.5"}, "temperature"),
        ({"review_threshold": 1.5}, "review_threshold"),
        ({"review_threshold": -0.1}, "review_threshold"),
    ],
)
def test_bad_metadata_fields_are_named(tmp_path, meta, field):
    msg = _meta_error(tmp_path, meta=meta)
    assert msg.startswith(f"the ONNX model's slimvit metadata field '{field}'") and "re-export" in msg


def test_metadata_must_fit_the_graph(tmp_path):
    # four outputs for three names; the graph's input is 32 px, the metadata says 16
    assert "must name one class per model output (4 outputs)" in _meta_error(tmp_path, n_outputs=4)
    msg = _meta_error(tmp_path, meta={"input_size": [3, 16, 16]})
    assert "field 'input_size' must match the model's input" in msg and "32" in msg


def test_metadata_that_is_absent_or_no_json_object(tmp_path):
    assert "is not valid JSON" in _meta_error(tmp_path, raw_meta="{classes: ")
    assert "not a JSON object" in _meta_error(tmp_path, raw_meta='["a"]')
    assert "lacks input_size, format" in _meta_error(
        tmp_path, raw_meta=json.dumps({"classes": CLASSES, "mean": [0] * 3, "std": [1] * 3})
    )
    path = write_tiny_onnx(tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    with pytest.raises(ModelError, match="no slimvit metadata"):
        runtime.proto_metadata(proto)


def test_optional_fields_at_their_limits_are_accepted(tmp_path):
    for fields in ({"temperature": 1e-3, "review_threshold": 0}, {"temperature": 7, "review_threshold": 1.0}):
        path = write_tiny_onnx(tmp_path / "m.onnx", meta=fields)
        meta = runtime.metadata(runtime.session(path, 1))
        assert {k: meta[k] for k in fields} == fields
    path = write_tiny_onnx(tmp_path / "m.onnx", meta={"temperature": None, "review_threshold": None})
    assert runtime.metadata(runtime.session(path, 1))["temperature"] is None


def test_embed_metadata_replaces_its_own_entry_and_keeps_others(tiny):
    proto = onnx.load(str(tiny))
    other = proto.metadata_props.add()
    other.key, other.value = "producer_note", "keep me"
    runtime.embed_metadata(proto, {"classes": ["x"]})
    runtime.embed_metadata(proto, {"classes": ["y", "z"]})
    props = {p.key: p.value for p in proto.metadata_props}
    assert [p.key for p in proto.metadata_props].count(runtime.META_KEY) == 1
    assert props["producer_note"] == "keep me"
    assert json.loads(props[runtime.META_KEY]) == {"format": runtime.META_FORMAT, "classes": ["y", "z"]}


def test_update_metadata_merges_fields_into_a_copy_or_in_place(tmp_path, tiny):
    before = tiny.read_bytes()
    dst = tmp_path / "out" / "deployed.onnx"
    dst.parent.mkdir()
    runtime.update_metadata(tiny, dst, temperature=1.7, runtime="onnxruntime")
    assert tiny.read_bytes() == before  # the source is not touched
    meta = runtime.metadata(runtime.session(dst, 1))
    assert meta["temperature"] == 1.7 and meta["runtime"] == "onnxruntime" and meta["classes"] == CLASSES
    runtime.update_metadata(dst, dst, temperature=0.9)  # in place: earlier fields stay, the new one wins
    meta = runtime.metadata(runtime.session(dst, 1))
    assert meta["temperature"] == 0.9 and meta["runtime"] == "onnxruntime"
    assert sorted(p.name for p in dst.parent.iterdir()) == ["deployed.onnx"]  # no temporary file left
    x = _x(4, seed=3)
    np.testing.assert_array_equal(
        runtime.run_logits(runtime.session(dst, 1), x), runtime.run_logits(runtime.session(tiny, 1), x)
    )


# --------------------------------------------------------------------------- runner


def test_runner_returns_the_model_and_its_metadata(tiny):
    predict, meta = runtime.runner(tiny, 1)
    x = _x(2)
    np.testing.assert_allclose(predict(x), _tiny_logits(x), rtol=1e-5, atol=1e-5)
    assert meta["classes"] == CLASSES and "runtime" not in meta


def test_runner_reads_deploy_json_for_a_model_deployed_without_onnx(tmp_path):
    dep = tmp_path / "deploy"
    path = write_tiny_onnx(dep / "model.onnx", meta={"temperature": 2.5})
    (dep / "deploy.json").write_text(
        json.dumps({"runtime": "onnxruntime", "temperature": 9.0, "review_threshold": 0.8})
    )
    _, meta = runtime.runner(path, 1)
    # what the file says wins; deploy.json fills in what it lacks
    assert meta["temperature"] == 2.5 and meta["runtime"] == "onnxruntime" and meta["review_threshold"] == 0.8
    (dep / "deploy.json").write_text("{not json")
    _, meta = runtime.runner(path, 1)  # a broken record is no reason not to run
    assert meta["temperature"] == 2.5 and "runtime" not in meta


def test_runner_refuses_openvino_where_it_is_missing(tmp_path, monkeypatch):
    from slimvit import openvino_runtime

    path = write_tiny_onnx(tmp_path / "model.onnx", meta={"runtime": "openvino", "temperature": 1.0})
    monkeypatch.setattr(openvino_runtime, "available", lambda: (False, "OpenVINO is not installed"))
    with pytest.raises(
        ModelError, match=r"'.*model\.onnx' was deployed on OpenVINO: OpenVINO is not installed"
    ):
        runtime.runner(path, 1)


def test_running_a_model_imports_no_torch(tiny):
    """The edge path: opening and running a model through the wrapper must not pull torch in."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np; from slimvit import runtime; "
        f"predict, meta = runtime.runner({str(tiny)!r}, 1); "
        f"print(predict(np.zeros((1, 3, {SIZE}, {SIZE}), np.float32)).shape, 'torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["(1,", "3)", "False"]
