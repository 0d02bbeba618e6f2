"""ONNX Runtime sessions and the metadata slimvit embeds in every ONNX file.

numpy + onnxruntime only (no torch): `slimvit predict` runs on an edge box through this module,
and `bench`/`quantize` use the very same session settings, so what is measured is what ships.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from slimvit.errors import ModelError, first_line

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
    """The slimvit metadata of a session's model, checked; ModelError if absent or incomplete."""
    return _parse_metadata(sess.get_modelmeta().custom_metadata_map.get(META_KEY))


def proto_metadata(model_proto: Any) -> dict:
    """The slimvit metadata of an onnx.ModelProto, checked like `metadata`."""
    return _parse_metadata({p.key: p.value for p in model_proto.metadata_props}.get(META_KEY))


def _parse_metadata(raw: str | None) -> dict:
    if raw is None:
        raise ModelError(
            "the ONNX model has no slimvit metadata (classes, input size, mean/std); "
            "use a model written by `slimvit export`/`slimvit bench` (e.g. runs/<name>/deploy/model.onnx)"
        )
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise ModelError("the ONNX model's slimvit metadata is not valid JSON; re-export the model") from None
    missing = [k for k in META_FIELDS if k not in meta]
    if missing:
        raise ModelError(f"the ONNX model's slimvit metadata lacks {', '.join(missing)}; re-export the model")
    return meta


def run_logits(sess, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Logits for a float32 (N, 3, H, W) array, in batches."""
    name = sess.get_inputs()[0].name
    try:
        outs = [sess.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    except Exception as e:  # onnxruntime's own exception types (missing kernel, bad shape, ...)
        raise ModelError(f"ONNX Runtime failed to run the model ({first_line(e)})") from None
    return np.concatenate(outs).astype(np.float32) if outs else np.zeros((0, 0), np.float32)


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
