"""ONNX Runtime sessions and the metadata slimvit embeds in every ONNX file.

numpy + onnxruntime only (no torch): `slimvit predict` runs on an edge box through this module,
and `bench`/`quantize` use the very same session settings, so what is measured is what ships.
"""

from __future__ import annotations

import json
import math
import typing
from pathlib import Path
from typing import Any

import numpy as np

from slimvit.errors import ModelError, first_line
from slimvit.layout import DEPLOY_RECORD

META_KEY = "slimvit"
"""Key of the JSON metadata in an ONNX model's `metadata_props`."""
META_FORMAT = "slimvit-onnx/1"
META_FIELDS = ("classes", "input_size", "mean", "std")


SLOW_FUSIONS = ("SkipLayerNormFusion",)
"""ORT load-time fusions left off. Residual Add + LayerNormalization -> SkipLayerNormalization:
ORT 1.32's CPU SkipLayerNormalization took 43 us for one (1, 65, 152) block at 1 thread against
9 us for the Add + LayerNormalization it replaces (25 us vs 9 at 2 threads); without it the pruned
ViT's batch-1 time fell by 17% in FP32 and 24% in INT8 here (AMD EPYC, 2 threads), and by 16% and
13% on an Intel Xeon with ORT 1.30. The export leaves the pair unfused as well
(`export.transformer_fusions`)."""


def session_options(threads: int = 2):
    """The SessionOptions every slimvit session uses: all graph optimisations, fixed intra-op threads."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


def session(path: str | Path, threads: int = 2, options=None):
    """An ONNX Runtime CPU session with `session_options(threads)` (or `options`), minus `SLOW_FUSIONS`."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"ONNX model '{path}' does not exist")
    try:
        return ort.InferenceSession(
            str(path),
            options or session_options(threads),
            providers=["CPUExecutionProvider"],
            disabled_optimizers=list(SLOW_FUSIONS),
        )
    except Exception as e:  # onnxruntime raises its own exception types for bad files
        raise ModelError(f"'{path}' is not an ONNX model ONNX Runtime can run ({first_line(e)})") from None


def metadata(sess) -> dict:
    """The slimvit metadata of a session's model, checked against its input and output shapes; ModelError
    naming the field if absent, malformed or inconsistent."""
    return _parse_metadata(
        sess.get_modelmeta().custom_metadata_map.get(META_KEY),
        output_shape=sess.get_outputs()[0].shape,
        input_shape=sess.get_inputs()[0].shape,
    )


def proto_metadata(model_proto: Any) -> dict:
    """The slimvit metadata of an onnx.ModelProto, checked like `metadata`."""
    graph = model_proto.graph

    def dims(values) -> list | None:
        if not values:
            return None
        return [
            d.dim_value if d.HasField("dim_value") else None for d in values[0].type.tensor_type.shape.dim
        ]

    return _parse_metadata(
        {p.key: p.value for p in model_proto.metadata_props}.get(META_KEY),
        output_shape=dims(graph.output),
        input_shape=dims(graph.input),
    )


def _parse_metadata(
    raw: str | None, output_shape: list | None = None, input_shape: list | None = None
) -> dict:
    """Parse and check the metadata JSON; each problem is one ModelError line naming the field.

    Args:
        output_shape / input_shape: the model's first output and input shapes (ints where static); the
            number of classes must equal the output width and `input_size` the input's (C, H, W).
    """
    if raw is None:
        raise ModelError(
            "the ONNX model has no slimvit metadata (classes, input size, mean/std); "
            "use a model written by `slimvit export`/`slimvit bench` (e.g. runs/<name>/deploy/model.onnx)"
        )
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise ModelError("the ONNX model's slimvit metadata is not valid JSON; re-export the model") from None
    if not isinstance(meta, dict):
        raise ModelError("the ONNX model's slimvit metadata is not a JSON object; re-export the model")
    missing = [k for k in META_FIELDS if k not in meta] + (["format"] if "format" not in meta else [])
    if missing:
        raise ModelError(f"the ONNX model's slimvit metadata lacks {', '.join(missing)}; re-export the model")
    if meta["format"] != META_FORMAT:
        _bad_field(
            "format", meta["format"], f"must be {META_FORMAT!r} (this version of slimvit reads only that)"
        )
    classes = meta["classes"]
    if not (
        isinstance(classes, list)
        and classes
        and all(isinstance(c, str) and c for c in classes)
        and len(set(classes)) == len(classes)
    ):
        _bad_field("classes", classes, "must be a list of distinct, non-empty class names")
    size = meta["input_size"]
    if not (
        isinstance(size, list)
        and len(size) == 3
        and all(_is_int(v) and v > 0 for v in size)
        and size[0] == 3
        and size[1] == size[2]
    ):
        _bad_field("input_size", size, "must be [3, H, W] with H = W (positive integers)")
    for key in ("mean", "std"):
        v = meta[key]
        if not (isinstance(v, list) and len(v) == 3 and all(_is_number(x) and math.isfinite(x) for x in v)):
            _bad_field(key, v, "must be 3 finite numbers (one per RGB channel)")
    if any(x <= 0 for x in meta["std"]):
        _bad_field("std", meta["std"], "must be 3 positive numbers")
    t = meta.get("temperature")
    if t is not None and not (_is_number(t) and math.isfinite(t) and t > 0):
        _bad_field("temperature", t, "must be a positive number (the calibration temperature)")
    r = meta.get("review_threshold")
    if r is not None and not (_is_number(r) and 0 <= r <= 1):
        _bad_field("review_threshold", r, "must be a confidence in [0, 1]")
    if output_shape is not None and len(output_shape) == 2:
        width = output_shape[1]
        if _is_int(width) and width > 0 and width != len(classes):
            _bad_field(
                "classes", f"{len(classes)} names", f"must name one class per model output ({width} outputs)"
            )
    if input_shape is not None and len(input_shape) == 4:
        if any(_is_int(d) and d > 0 and d != s for d, s in zip(input_shape[1:], size, strict=True)):
            _bad_field("input_size", size, f"must match the model's input (N, C, H, W) = {list(input_shape)}")
    return meta


def _bad_field(key: str, value: Any, rule: str) -> typing.NoReturn:
    shown = value if isinstance(value, str) else json.dumps(value)
    raise ModelError(
        f"the ONNX model's slimvit metadata field '{key}' {rule}, got {shown[:120]}; re-export the model"
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def predictor(sess):
    """float32 (N, 3, H, W) -> logits of a session in one call; ORT's own errors become one-line ModelErrors.

    The one way slimvit runs a session: bench, its runtime workers, predict and verify alike.
    """
    name = sess.get_inputs()[0].name

    def predict(x: np.ndarray) -> np.ndarray:
        try:
            return sess.run(None, {name: x})[0]
        except Exception as e:  # onnxruntime's own exception types (missing kernel, bad shape, ...)
            raise ModelError(f"ONNX Runtime failed to run the model ({first_line(e)})") from None

    return predict


def update_metadata(src: str | Path, dst: str | Path, **fields: Any) -> None:
    """Copy the ONNX model `src` to `dst` (atomically; may be the same file) with `fields` added to its
    slimvit metadata. Needs the onnx package (the `train` extra)."""
    import onnx

    from slimvit.io import atomic_path

    model = onnx.load(str(src))
    embed_metadata(model, {**proto_metadata(model), **fields})
    with atomic_path(dst) as tmp:
        onnx.save_model(model, str(tmp))


def run_logits(sess, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Logits for a float32 (N, 3, H, W) array, in batches."""
    predict = predictor(sess)
    outs = [predict(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    # no images: ask the model itself, so the class axis is kept ((0, classes), as ONNX Runtime returns)
    return np.concatenate(outs).astype(np.float32) if outs else predict(x[:0]).astype(np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def embed_metadata(model_proto: Any, meta: dict) -> None:
    """Write `meta` (JSON) into an onnx.ModelProto's metadata_props, replacing an older copy."""
    keep = [p for p in model_proto.metadata_props if p.key != META_KEY]
    del model_proto.metadata_props[:]
    model_proto.metadata_props.extend(keep)
    entry = model_proto.metadata_props.add()
    entry.key = META_KEY
    entry.value = json.dumps({"format": META_FORMAT, **meta})


def runner(path: str | Path, threads: int = 2):
    """(float32 NCHW -> logits, checked slimvit metadata) of an ONNX file, on the runtime it was deployed for.

    ONNX Runtime, unless the deploy step chose OpenVINO for it (`runtime: openvino` in the model's
    metadata, or in the `deploy.json` beside a file deployed without the onnx package).
    """
    sess = session(path, threads)
    meta = metadata(sess)
    rec = Path(path).parent / DEPLOY_RECORD
    if rec.is_file() and not {"runtime", "temperature"} <= set(meta):
        # a model deployed without the onnx package: deploy.json beside it says what its metadata would
        try:
            d = json.loads(rec.read_text())
            meta.setdefault("runtime", d.get("runtime", "onnxruntime"))
            meta.setdefault("temperature", d.get("temperature"))
            meta.setdefault("review_threshold", d.get("review_threshold"))
        except (json.JSONDecodeError, OSError, AttributeError):
            pass
    if meta.get("runtime") == "openvino":
        from slimvit import openvino_runtime

        ok, why = openvino_runtime.available()
        if not ok:
            raise ModelError(f"'{path}' was deployed on OpenVINO: {why}")
        predict, _ = openvino_runtime.compile_model(path, threads)
        return predict, meta
    return predictor(sess), meta
