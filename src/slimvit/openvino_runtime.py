"""OpenVINO as a second CPU runtime for the same ONNX files (`pip install slimvit[openvino]`).

OpenVINO reads the exported ONNX model directly; on CPUs with AVX-512 BF16 or AMX it runs float
models in bf16 by itself (its default inference precision hint), so the precision that actually ran
is read back from the compiled model and recorded. The static INT8 (QDQ) files run as int8 through
OpenVINO's low-precision transformations. Files with ONNX Runtime's dynamic-quantization contrib ops
(QAttention, DynamicQuantizeLinear) do not load and are skipped with the reason.

numpy + openvino only: `slimvit predict` and `slimvit verify` use it for a model deployed on OpenVINO.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from slimvit.errors import ModelError, first_line

PRECISIONS = ("fp32", "int8-static")
"""Variants of each candidate that are also run on OpenVINO: the float model, and the QDQ one."""


def available() -> tuple[bool, str]:
    """Whether OpenVINO can be imported, and if not why (one line)."""
    try:
        import openvino  # noqa: F401
    except ImportError as e:
        return False, f"OpenVINO is not installed ({first_line(e)}); pip install 'slimvit[openvino]'"
    return True, ""


def ov_reason(e: BaseException, limit: int = 300) -> str:
    """OpenVINO's own words in one of its errors: the innermost message, after the stack of "Exception from
    <file>:<line>:" lines it opens with (e.g. "Supported primitive descriptors list is empty for node: ...")."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    said = [line for line in lines if not line.startswith("Exception from ")]
    return said[-1][:limit] if said else first_line(e, limit)


def compile_model(path: str | Path, threads: int = 2) -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
    """A batch-1-latency CPU compilation of an ONNX file: (float32 NCHW -> logits, facts).

    Facts: `openvino` version and `ran_precision`, the inference precision OpenVINO chose on this CPU.
    """
    import openvino as ov

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"ONNX model '{path}' does not exist")
    core = ov.Core()
    try:
        compiled = core.compile_model(
            core.read_model(str(path)),
            "CPU",
            {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1},
        )
    except Exception as e:  # OpenVINO raises RuntimeError with pages of context
        raise ModelError(f"OpenVINO cannot run '{path.name}' ({ov_reason(e)})") from None
    request = compiled.create_infer_request()
    out = compiled.output(0)

    def predict(x: np.ndarray) -> np.ndarray:
        return np.asarray(request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})[out]).copy()

    ran = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    ran = {"<Type: 'bfloat16'>": "bf16", "<Type: 'float32'>": "fp32", "<Type: 'float16'>": "fp16"}.get(
        ran, ran
    )
    return predict, {"openvino": ov.__version__, "ran_precision": ran}
