"""INT8 (dynamic, static QDQ) and FP16 variants of the pruned ONNX model (`slimvit quantize`).

Every mode is a registry entry ``(src, dst, cfg, calibration images) -> facts``; each variant is
then run by ONNX Runtime on the full test split. What each mode does on a CPU:

- ``int8-dynamic``: int8 weights; activations are quantized per batch at run time. MatMul becomes
  ``MatMulInteger`` (fused by ORT into one int8 GEMM with float output) and the fused attention
  becomes ``QAttention``. No calibration, so no calibration error.
- ``int8-static``: QDQ format, per-channel int8 weights, activation ranges calibrated on training
  images (minmax / percentile / entropy). ORT has no static int8 attention kernel, so with the
  fused attention export the attention block stays float; static ranges save the run-time
  min/max pass but add quantize/dequantize nodes.
- ``int8-mixed``: each op the way it runs best: the ops that only the static list names (the conv
  stem, by default) static QDQ, which ORT runs as int8 convolutions (dynamic ``ConvInteger`` is
  slower than float conv), then the dynamic list (MatMul, the fused attention) dynamic. Smaller
  than ``int8-dynamic`` (the stem's weights are int8 too) and as fast.
- ``fp16``: weights and compute in half, float32 inputs/outputs. Ops without an fp16 kernel in
  ORT's CPU provider are kept in float32 (found by trying), and the casts cost time: on an x86 CPU
  without AVX-512 FP16, FP16 shrinks the file but does not speed anything up.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from slimvit import runtime
from slimvit.config import QuantizeConfig
from slimvit.errors import ConfigError, ModelError, first_line
from slimvit.io import atomic_path, atomic_write_json, is_main_process, read_json
from slimvit.layout import EXPORT, ONNX, QUANTIZE, candidates, onnx_file
from slimvit.spec import ModelSpec, read_spec

log = logging.getLogger(__name__)

ModeFn = Callable[[Path, Path, QuantizeConfig, "np.ndarray | None"], dict]
MODES: dict[str, tuple[ModeFn, bool]] = {}
"""name -> (function, needs calibration images)."""

INT8_OPS = {
    "MatMulInteger",
    "ConvInteger",
    "QAttention",
    "QLinearMatMul",
    "QLinearConv",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
}
QDQ_COMPUTE = {"MatMul", "Gemm", "Conv"}
"""Ops that ORT runs as int8 kernels when both their data and weight inputs come through DequantizeLinear."""
PLUMBING = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Cast", "Shape", "Constant"}

FLOAT_REASONS = {
    "LayerNormalization": "normalisation needs the float range of its input (statistics, then a divide)",
    "SkipLayerNormalization": "normalisation needs the float range of its input",
    "Softmax": "exponentials over attention logits; int8 would flatten the small probabilities",
    "Erf": "GELU's non-linearity, cheap elementwise work",
    "Gelu": "non-linearity, cheap elementwise work",
    "BiasGelu": "bias + GELU non-linearity, cheap elementwise work",
    "Concat": "data movement (the class token), no arithmetic",
    "Expand": "data movement (the class token), no arithmetic",
    "Reshape": "data movement, no arithmetic",
    "Transpose": "data movement, no arithmetic",
    "Gather": "data movement (the class token's output), no arithmetic",
    "Add": "residual adds and biases: int8 would re-quantize the residual stream in every block",
    "Mul": "elementwise scaling, cheap",
    "Div": "elementwise, cheap",
    "Attention": "ORT has no static int8 attention kernel (QAttention is dynamic only)",
    "Gemm": "the classifier: not in the mode's op list (one small matrix), kept exact",
    "Conv": "not in the mode's op list (quantize.dynamic_op_types / quantize.static_op_types)",
    "MatMul": "activation x activation product, or not in the mode's op list",
    "Relu": "fused into the preceding op",
}


def register_mode(name: str, needs_calibration: bool = False):
    def deco(fn: ModeFn) -> ModeFn:
        MODES[name] = (fn, needs_calibration)
        return fn

    return deco


def _load(path: Path):
    import onnx

    return onnx.load(str(path))


def _save(model, dst: Path) -> None:
    import onnx

    with atomic_path(dst) as tmp:
        onnx.save_model(model, str(tmp))


# --------------------------------------------------------------------------- modes


@register_mode("int8-dynamic")
def quantize_dynamic(src: Path, dst: Path, cfg: QuantizeConfig, calib=None) -> dict:
    import onnx
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    with atomic_path(dst) as tmp:
        ort_quantize_dynamic(
            str(src),
            str(tmp),
            op_types_to_quantize=list(cfg.dynamic_op_types),
            weight_type=QuantType.QInt8,
            reduce_range=cfg.reduce_range,
            # The fused Attention op is from ORT's contrib domain, which onnx shape inference skips.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True},
        )
    return {
        "op_types": list(cfg.dynamic_op_types),
        "weights": "int8 per-tensor" + (", 7-bit range" if cfg.reduce_range else ""),
        "activations": "int8 at run time",
    }


class _Calibration:
    """An onnxruntime CalibrationDataReader over float32 (N, 3, H, W) images, one image per call."""

    def __init__(self, images: np.ndarray, input_name: str) -> None:
        self.images, self.name, self.i = images, input_name, 0

    def get_next(self):
        if self.i >= len(self.images):
            return None
        self.i += 1
        return {self.name: self.images[self.i - 1 : self.i]}

    def rewind(self) -> None:
        self.i = 0


CALIBRATION_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}


@register_mode("int8-static", needs_calibration=True)
def quantize_static(src: Path, dst: Path, cfg: QuantizeConfig, calib: np.ndarray | None) -> dict:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calib is None or len(calib) == 0:
        raise ConfigError("int8-static needs calibration images")
    act = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[cfg.static_activations]
    with atomic_path(dst.with_suffix(".pre.onnx")) as pre:
        # Shape inference + ORT's basic graph optimisations, as ORT recommends before calibrating.
        quant_pre_process(str(src), str(pre), skip_optimization=not cfg.optimize, skip_symbolic_shape=False)
        keep_float = _image_convs(pre)
        with atomic_path(dst) as tmp:
            ort_quantize_static(
                str(pre),
                str(tmp),
                _Calibration(calib, _input_name(src)),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(cfg.static_op_types),
                per_channel=cfg.per_channel,
                activation_type=act,
                weight_type=QuantType.QInt8,
                reduce_range=cfg.reduce_range,
                nodes_to_exclude=keep_float,
                calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[cfg.calibration]),
                extra_options={
                    "DefaultTensorType": onnx.TensorProto.FLOAT,
                    "MatMulConstBOnly": True,
                    "ActivationSymmetric": cfg.static_activations == "int8",
                },
            )
    dst.with_suffix(".pre.onnx").unlink(missing_ok=True)
    return {
        "op_types": list(cfg.static_op_types),
        "weights": "int8 "
        + ("per-channel" if cfg.per_channel else "per-tensor")
        + (", 7-bit range" if cfg.reduce_range else ""),
        "activations": f"{cfg.static_activations} calibrated ({cfg.calibration}, {len(calib)} training images)",
        "format": "QDQ",
        "kept_float": keep_float,
    }


def _image_convs(path: Path) -> list[str]:
    """Convolutions that read the image itself: kept in float by static INT8.

    Their input has 3 channels (a 3x3 kernel sums 27 products), so int8 saves almost no time there, and
    7-bit weights (`reduce_range`) lose the most: on the r=0.5 NEU-DET model, quantizing the first conv
    cost 2.2 test points (96.67% -> 94.72%); keeping it float gave 96.39% and ran 5% faster.
    """
    g = _load(path).graph
    inputs = {i.name for i in g.input}
    return [n.name for n in g.node if n.op_type == "Conv" and n.input and n.input[0] in inputs]


@register_mode("int8-mixed", needs_calibration=True)
def quantize_mixed(src: Path, dst: Path, cfg: QuantizeConfig, calib: np.ndarray | None) -> dict:
    static_only = tuple(op for op in cfg.static_op_types if op not in cfg.dynamic_op_types)
    if not static_only:
        raise ConfigError(
            "int8-mixed needs an op type in quantize.static_op_types that is not in quantize.dynamic_op_types "
            "(by default Conv)"
        )
    mid = dst.with_suffix(".static.onnx")
    try:
        static = quantize_static(src, mid, dataclasses.replace(cfg, static_op_types=static_only), calib)
        quantize_dynamic(mid, dst, cfg)
    finally:
        mid.unlink(missing_ok=True)  # the intermediate model is not an artifact
    return {
        "op_types": [*static_only, *cfg.dynamic_op_types],
        "weights": f"int8 ({static['weights'].split()[1].rstrip(',')} for {', '.join(static_only)}, per-tensor "
        "for the rest)" + (", 7-bit range" if cfg.reduce_range else ""),
        "activations": f"{static['activations']} for {', '.join(static_only)}; int8 at run time for "
        f"{', '.join(cfg.dynamic_op_types)}",
        "format": "QDQ + dynamic",
    }


_MISSING_KERNEL = re.compile(r"Could not find an implementation for (\w+)\(")


@register_mode("fp16")
def to_fp16(src: Path, dst: Path, cfg: QuantizeConfig, calib=None) -> dict:
    """Half weights and compute; ops the CPU provider cannot run in fp16 stay float32 (found by trying)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    blocked: list[str] = []
    for _ in range(16):
        model = convert_float_to_float16(_load(src), keep_io_types=True, op_block_list=blocked or None)
        _save(model, dst)
        try:
            runtime.session(dst, 1)
            return {"weights": "fp16", "kept_float32": blocked}
        except ModelError as e:
            m = _MISSING_KERNEL.search(str(e))
            if not m or m.group(1) in blocked:
                dst.unlink(missing_ok=True)
                raise ModelError(f"ONNX Runtime cannot run the fp16 model on this CPU ({e})") from None
            blocked.append(m.group(1))
            log.info("fp16: ONNX Runtime's CPU provider has no fp16 %s; keeping it in float32", m.group(1))
    raise ModelError("fp16: too many ops without an fp16 CPU kernel")


def _stamp(path: Path, mode: str) -> None:
    """Carry the exported model's slimvit metadata into the variant, with its own precision."""
    try:
        runtime.update_metadata(path, path, precision=mode)
    except ModelError as e:
        raise ModelError(
            f"the {mode} model lost the slimvit metadata of the model it was built from ({e})"
        ) from None


def _input_name(path: Path) -> str:
    return _load(path).graph.input[0].name


# --------------------------------------------------------------------------- portability

SAFE_WEIGHT = 64
"""Largest int8 weight magnitude that x86's non-VNNI u8 x s8 kernels (VPMADDUBSW: two products summed
into a saturating int16) never saturate on: 2 x 255 x 64 = 32,640 <= 32,767. A signed activation is
shifted to uint8 on those CPUs, so the bound holds for both activation types."""

_WEIGHT_INPUT = {
    "MatMulInteger": 1,
    "ConvInteger": 1,
    "QAttention": 1,
    "DynamicQuantizeMatMul": 1,
    "MatMulIntegerToFloat": 1,
    "QLinearMatMul": 3,
    "QLinearConv": 3,
}
"""Int8 product ops -> the input index of their weight."""

SAFE_EVERYWHERE = ("x86-64 AVX2", "x86-64 AVX-512", "x86-64 AVX-512 VNNI / AMX", "ARM64")
SAFE_WITH_VNNI = ("x86-64 AVX-512 VNNI / AMX", "ARM64")


def int8_products(model_or_path) -> list[dict]:
    """Every int8 matrix product of a quantized model with its weight tensor's value range.

    Products are the int8 ops of `_WEIGHT_INPUT`, and QDQ MatMul / Conv / Gemm whose weight comes
    through a DequantizeLinear of an int8 initializer.
    """
    from onnx import numpy_helper

    model = _load(Path(model_or_path)) if isinstance(model_or_path, (str, Path)) else model_or_path
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}

    def weight_range(name: str) -> tuple[int, int] | None:
        t = inits.get(name)
        if t is None or t.data_type != 3:  # onnx.TensorProto.INT8
            return None
        w = numpy_helper.to_array(t)
        return int(w.min()), int(w.max())

    out = []
    for n in g.node:
        if n.op_type in _WEIGHT_INPUT and len(n.input) > _WEIGHT_INPUT[n.op_type]:
            rng = weight_range(n.input[_WEIGHT_INPUT[n.op_type]])
        elif n.op_type in QDQ_COMPUTE and len(n.input) >= 2:
            dq = producer.get(n.input[1])
            rng = weight_range(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        else:
            continue
        if rng is not None:
            out.append({"node": n.name, "op": n.op_type, "weight_min": rng[0], "weight_max": rng[1]})
    return out


def portability(model_or_path) -> dict:
    """Whether every int8 product of a model is exact on every CPU class ONNX Runtime runs on.

    Checked on the graph, so the answer does not depend on the CPU running the check.
    """
    products = int8_products(model_or_path)
    peak = max((max(-p["weight_min"], p["weight_max"]) for p in products), default=0)
    portable = peak <= SAFE_WEIGHT
    return {
        "portable": portable,
        "int8_products": len(products),
        "max_abs_weight": peak,
        "safe_on": list(SAFE_EVERYWHERE if portable else SAFE_WITH_VNNI),
        "why": (
            f"every int8 weight within +-{SAFE_WEIGHT}: no 16-bit saturation in x86's non-VNNI u8 x s8 kernels"
            if portable
            else f"int8 weights up to {peak} (> {SAFE_WEIGHT}) saturate x86's non-VNNI u8 x s8 kernels "
            "(AVX2, AVX-512 without VNNI); exact only with VNNI/AMX or on ARM64"
        ),
    }


# --------------------------------------------------------------------------- what stayed float


def op_census(path: Path) -> dict:
    """Compute nodes of an ONNX model by type, split into int8, fp16 and float32 ones."""
    model = _load(path)
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    fp16_values = {
        v.name for v in list(g.value_info) + list(g.output) if v.type.tensor_type.elem_type == 10
    } | {t.name for t in g.initializer if t.data_type == 10}
    out = {"int8": Counter(), "fp16": Counter(), "float32": Counter()}

    def from_op(name: str, *types: str) -> bool:
        return name in producer and producer[name].op_type in types

    def rescale(n) -> bool:
        """Part of a dynamic int8 MatMul: `Cast(MatMulInteger) * scale`, or the product of two scales."""
        via_cast = any(from_op(i, "Cast") and from_op(producer[i].input[0], *INT8_OPS) for i in n.input)
        return n.op_type == "Mul" and (via_cast or any(from_op(i, "DynamicQuantizeLinear") for i in n.input))

    for n in g.node:
        if n.op_type in PLUMBING or rescale(n):
            continue
        from_dq = len(n.input) >= 2 and all(
            producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in n.input[:2]
        )
        if n.op_type in INT8_OPS or (n.op_type in QDQ_COMPUTE and from_dq):
            out["int8"][n.op_type] += 1
        elif any(i in fp16_values for i in n.input):
            out["fp16"][n.op_type] += 1
        else:
            out["float32"][n.op_type] += 1
    return {k: dict(v.most_common()) for k, v in out.items()}


def float_reasons(census: dict) -> dict[str, str]:
    return {
        op: FLOAT_REASONS.get(op, "no int8 kernel for it in this mode") for op in census.get("float32", {})
    }


# --------------------------------------------------------------------------- the stage


def evaluate_onnx(path: Path, x: np.ndarray, labels: np.ndarray, classes: list[str], threads: int) -> tuple:
    """Metrics and logits of an ONNX model on float32 inputs (same numpy metrics as PyTorch)."""
    from slimvit.evaluate import metrics_from_logits

    logits = runtime.run_logits(runtime.session(path, threads), x)
    return metrics_from_logits(logits, labels, classes), logits


def calibration_images(data, spec: ModelSpec, n: int, seed: int) -> np.ndarray:
    """`n` training images (never test images), normalised for the model."""
    from slimvit.preprocess import normalize

    images, _ = data.arrays("train")
    if len(images) < n:  # a small dataset: calibrate on what there is, rather than refuse after training
        log.info(
            "quantize: calibrating on all %d training images (quantize.calibration_images=%d is more than the "
            "training split has)",
            len(images),
            n,
        )
        n = len(images)
    idx = np.sort(np.random.default_rng(seed).choice(len(images), n, replace=False))
    return normalize(images[idx], spec.mean, spec.std)


def run_quantize(cfg, run_dir: str | Path, data=None) -> dict:
    """Build every configured variant of every candidate's FP32 ONNX model; measure val and test accuracy.

    quantize.json: ``{"validated_on": {...}, "models": {stage: {"fp32": {...}, mode: {...}}}}`` with the
    pruned model first, then the sweep models. Validation accuracy is what the deploy step reads; test
    accuracy is reported only.
    """
    from slimvit.data import load_data

    run_dir = Path(run_dir)
    if not (run_dir / EXPORT).exists():
        raise ModelError(
            f"no exported models in '{run_dir / ONNX}'; run `slimvit export` (or `slimvit run`) first"
        )
    unknown = [m for m in cfg.quantize.modes if m not in MODES]
    if unknown:
        raise ConfigError(f"quantize.modes: unknown mode '{unknown[0]}'; known: {', '.join(MODES)}")
    exported = read_json(run_dir / EXPORT)
    missing = [s for s in candidates(run_dir) if s not in exported]
    if missing:
        raise ModelError(
            f"the {missing[0]} model was not exported (onnx/export.json); run `slimvit export --force` first"
        )
    data = data or load_data(cfg.data, run_dir)
    models_out = {}
    for stage in candidates(run_dir):
        models_out[stage] = quantize_candidate(cfg, run_dir, stage, exported[stage]["file"], data)
    results = {"validated_on": validated_on(), "models": models_out}
    if is_main_process():
        atomic_write_json(run_dir / QUANTIZE, results)
    return {
        f"{stage}/{mode}": {
            "size_mb": v["size_mb"],
            "accuracy": v["accuracy"],
            "val_accuracy": v["val_accuracy"],
        }
        for stage, variants in models_out.items()
        for mode, v in variants.items()
    }


def quantize_candidate(cfg, run_dir: Path, stage: str, fp32_file: str, data) -> dict:
    """Every mode of one candidate: ``{"fp32": {...}, mode: {...}}``."""
    from slimvit.preprocess import normalize

    src = run_dir / fp32_file
    if not src.exists():
        raise ModelError(f"no exported {stage} model at '{src}'; run `slimvit export --force` first")
    spec = read_spec(run_dir / stage)
    images, labels = data.arrays("test")
    x = normalize(images, spec.mean, spec.std)
    val_images, val_labels = data.arrays("val")
    xv = normalize(val_images, spec.mean, spec.std)
    threads = cfg.bench.threads
    base, base_logits = evaluate_onnx(src, x, labels, data.classes, threads)
    base_val, _ = evaluate_onnx(src, xv, val_labels, data.classes, threads)
    results: dict = {
        "fp32": {
            "file": str(src.relative_to(run_dir)),
            "size_mb": src.stat().st_size / 1e6,
            "accuracy": base["accuracy"],
            "macro_f1": base["macro_f1"],
            "val_accuracy": base_val["accuracy"],
            "ops": op_census(src),
        }
    }
    log.info(
        "quantize %s: fp32 ONNX accuracy: validation %.4f, test %.4f",
        stage,
        base_val["accuracy"],
        base["accuracy"],
    )
    calib = None
    for mode in cfg.quantize.modes:
        if MODES[mode][1] and calib is None:  # a mode that needs calibration images
            calib = calibration_images(data, spec, cfg.quantize.calibration_images, cfg.train.seed)
        dst = run_dir / onnx_file(stage, mode)
        info, seconds = _build(mode, src, dst, cfg.quantize, calib)
        try:
            m, logits = evaluate_onnx(dst, x, labels, data.classes, threads)
            mv, _ = evaluate_onnx(dst, xv, val_labels, data.classes, threads)
        except ModelError as e:
            dst.unlink(missing_ok=True)
            raise ModelError(
                f"ONNX Runtime cannot run the {mode} model on this machine: {e}{_leave_out(mode, cfg.quantize)}"
            ) from None
        census = op_census(dst)
        results[mode] = {
            **info,
            "file": str(dst.relative_to(run_dir)),
            "size_mb": dst.stat().st_size / 1e6,
            "accuracy": m["accuracy"],
            "macro_f1": m["macro_f1"],
            "val_accuracy": mv["accuracy"],
            "agreement_fp32": float(np.mean(logits.argmax(1) == base_logits.argmax(1))),
            "max_abs_diff_fp32": float(np.abs(logits - base_logits).max()),
            **({"portability": portability(dst)} if mode.startswith("int8") else {}),
            "ops": census,
            "float_reasons": float_reasons(census),
            "seconds": seconds,
        }
        log.info(
            "quantize %s %s: %.2f MB (%.2fx of fp32), accuracy: validation %.4f, test %.4f (fp32 %.4f), "
            "agreement with fp32 %.2f%%",
            stage,
            mode,
            results[mode]["size_mb"],
            results[mode]["size_mb"] / results["fp32"]["size_mb"],
            mv["accuracy"],
            m["accuracy"],
            base["accuracy"],
            100 * results[mode]["agreement_fp32"],
        )
    return results


def _build(
    mode: str, src: Path, dst: Path, qcfg: QuantizeConfig, calib: np.ndarray | None
) -> tuple[dict, float]:
    """Write one mode's variant of `src` to `dst`: (what the mode did, seconds). A failure removes `dst`
    and says how to leave the mode out."""
    fn, _ = MODES[mode]
    t0 = time.perf_counter()
    try:
        info = fn(src, dst, qcfg, calib)
        _stamp(dst, mode)
    except Exception as e:
        dst.unlink(missing_ok=True)
        if isinstance(e, ModelError):
            raise ModelError(f"{e}{_leave_out(mode, qcfg)}") from None
        raise ModelError(
            f"quantization mode '{mode}' failed ({type(e).__name__}: {first_line(e)}){_leave_out(mode, qcfg)}"
        ) from e
    return info, time.perf_counter() - t0


def _leave_out(mode: str, qcfg: QuantizeConfig) -> str:
    """The end of a failed mode's message: the config that runs without it."""
    others = ",".join(m for m in qcfg.modes if m != mode)
    return f"; leave it out with --set quantize.modes=[{others}]"


def validated_on() -> dict:
    """The CPU and runtime the accuracies were measured with: a quantized model's numbers hold there."""
    import onnxruntime as ort

    from slimvit.timing import ISA_FLAGS, cpu_flags, cpu_name

    return {
        "cpu": cpu_name(),
        "isa": sorted(set(ISA_FLAGS) & cpu_flags(), key=ISA_FLAGS.index),
        "onnxruntime": ort.__version__,
    }
