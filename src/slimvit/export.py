"""ONNX export with slimvit metadata embedded, and the parity check against PyTorch (`slimvit export`).

ViT attention is exported as ONNX Runtime's fused ``com.microsoft.Attention`` op (one node per
block instead of ~30 reshape/slice/transpose/matmul nodes). At batch 1 a ViT-Tiny is bound by
per-node overhead, so this is what lets INT8 pay: dynamic quantization turns the fused op into
``QAttention``, an int8 kernel for the q/k/v projection and both attention products. Set
``quantize.fuse_attention=false`` for a graph of standard ONNX ops only (any runtime).

The export works on a copy: each timm ``Attention`` of the copy is replaced by
:class:`FusedAttention` holding the same weights, whose forward calls the custom op
``slimvit::attention`` (a plain PyTorch implementation, so the copy still runs and is checked
against the original before export); the exporter translates that op to the ORT node. No timm
class is patched. Locality attention (:class:`slimvit.vit.LocalityAttention`) stays standard ops: the
fused op's only mask input is dropped by the conversion to ``QAttention``.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slimvit import models, runtime
from slimvit.errors import ModelError, first_line
from slimvit.io import atomic_path, atomic_write_json, is_main_process
from slimvit.layout import EXPORT, PRUNED, SPEC, STUDENT, TEACHER, candidates, onnx_file
from slimvit.spec import ModelSpec
from slimvit.vit import plain_attention

log = logging.getLogger(__name__)

STAGES = (TEACHER, STUDENT, PRUNED)
"""Models of a run that are always exported, in this order (then the other candidates, layout.candidates)."""


# --------------------------------------------------------------------------- fused attention


@torch.library.custom_op("slimvit::attention", mutates_args=())
def fused_attention(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_heads: int, scale: float
) -> torch.Tensor:
    """Multi-head self-attention with packed q/k/v weights, as ORT's Attention op defines it.

    x: (B, N, C); weight: (C, 3 * A), columns q | k | v; bias: (3 * A,). Returns (B, N, A).
    """
    B, N, _ = x.shape
    qkv = (x @ weight + bias).reshape(B, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, H, N, D) each
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(1, 2).reshape(B, N, -1)


@fused_attention.register_fake
def _(x, weight, bias, num_heads, scale):
    return x.new_empty(x.shape[0], x.shape[1], weight.shape[1] // 3)


def _attention_translation():
    """onnxscript translation of ``slimvit::attention`` to ``com.microsoft.Attention``."""
    import onnx.defs
    import onnxscript

    if not onnx.defs.has("Attention", "com.microsoft"):
        # onnxscript needs a schema to build a node; ORT's contrib ops are not in onnx's registry.
        # This declares the three inputs and the one output that slimvit uses.
        S = onnx.defs.OpSchema
        onnx.defs.register_schema(
            S(
                "Attention",
                "com.microsoft",
                1,
                doc="ONNX Runtime multi-head self-attention with packed q/k/v weights",
                inputs=[S.FormalParameter(n, "T") for n in ("input", "weights", "bias")],
                outputs=[S.FormalParameter("output", "T")],
                type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float tensors")],
                attributes=[
                    S.Attribute("num_heads", S.AttrType.INT, "number of heads"),
                    S.Attribute("scale", S.AttrType.FLOAT, "scale of q.k (1/sqrt(head_dim))"),
                ],
            )
        )
    msft = onnxscript.values.Opset(domain="com.microsoft", version=1)

    def attention(x, weight, bias, num_heads: int, scale: float):
        return msft.Attention(x, weight, bias, num_heads=num_heads, scale=scale)

    return {torch.ops.slimvit.attention.default: attention}


class FusedAttention(nn.Module):
    """A timm ``Attention`` (without q/k norm or gating) as one fused op plus its output projection."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.num_heads = int(attn.num_heads)
        self.scale = float(attn.scale)
        self.weight = nn.Parameter(attn.qkv.weight.detach().t().contiguous(), requires_grad=False)
        bias = attn.qkv.bias if attn.qkv.bias is not None else torch.zeros(attn.qkv.out_features)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.proj = attn.proj

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ModelError("the fused attention export supports unmasked self-attention only")
        return self.proj(torch.ops.slimvit.attention(x, self.weight, self.bias, self.num_heads, self.scale))


def _fusable(attn: nn.Module) -> bool:
    from timm.layers import Attention

    return type(attn) is Attention and plain_attention(attn)


def for_export(model: nn.Module, fuse_attention: bool = True) -> tuple[nn.Module, int]:
    """An eval-mode copy of `model` ready for export, and how many attention modules it fuses."""
    m = copy.deepcopy(model).eval()
    fused = 0
    if fuse_attention:
        for blk in getattr(m, "blocks", []):
            if _fusable(getattr(blk, "attn", None)):
                blk.attn = FusedAttention(blk.attn)
                fused += 1
    return m, fused


# --------------------------------------------------------------------------- export


def onnx_metadata(spec: ModelSpec, stage: str, precision: str = "fp32") -> dict:
    """What `slimvit predict` needs to use the model, plus where it came from."""
    return {
        "stage": stage,
        "precision": precision,
        "name": spec.name,
        "classes": list(spec.classes),
        "input_size": list(spec.input_size),
        "mean": list(spec.mean),
        "std": list(spec.std),
        "interpolation": spec.interpolation,
    }


def export_onnx(
    model: nn.Module,
    spec: ModelSpec,
    path: str | Path,
    *,
    stage: str,
    opset: int = 18,
    fuse_attention: bool = True,
    optimize: bool = True,
) -> dict:
    """Export `model` to `path` (atomically) with a dynamic batch axis and slimvit metadata.

    Args:
        optimize: for a ViT, also run ONNX Runtime's transformer fusions (bias + GELU -> BiasGelu;
            not residual add + LayerNorm, see `transformer_fusions`) on the exported graph.

    Returns:
        Facts about the export: opset, fused attention blocks, transformer fusions, seconds, file size.
    """
    import onnx

    t0 = time.perf_counter()
    m, fused = for_export(model, fuse_attention)
    x = torch.randn(2, *spec.input_size)  # batch 2: torch.export would specialise a batch of 1
    if fused:
        with torch.no_grad():
            diff = float((m(x) - model.eval()(x)).abs().max())
        if diff > 1e-3:
            raise ModelError(f"the fused-attention copy of the {stage} model differs from it by {diff:.3g}")
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        program = torch.onnx.export(
            m,
            (x,),
            dynamo=True,
            opset_version=opset,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            custom_translation_table=_attention_translation() if fused else None,
            verbose=False,
        )
    except Exception as e:
        raise ModelError(
            f"ONNX export of the {stage} model failed ({type(e).__name__}: {first_line(e)})"
        ) from e
    proto = program.model_proto
    fusions = {}
    if optimize and hasattr(m, "blocks"):
        proto, fusions = transformer_fusions(proto)
    runtime.embed_metadata(proto, onnx_metadata(spec, stage))
    with atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp))
    return {
        "file": str(path),
        "opset": int(next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))),
        "fused_attention": fused,
        "transformer_fusions": fusions,
        "size_mb": Path(path).stat().st_size / 1e6,
        "seconds": time.perf_counter() - t0,
    }


def transformer_fusions(proto):
    """ONNX Runtime's offline transformer fusions on a ViT graph; returns the model and what was fused.

    Only the graph-level fusions (opt_level 0): the session applies its own hardware-specific
    optimisations when the file is loaded, so the file stays portable. Residual add + LayerNorm
    stays two nodes: ORT's CPU SkipLayerNormalization is slower than the pair (`runtime.SLOW_FUSIONS`).
    """
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(
        logging.ERROR
    )  # asks for num_heads it does not need
    options = FusionOptions("vit")
    options.enable_skip_layer_norm = False
    # num_heads/hidden_size 0: read from the graph; attention is already one node per block.
    opt = optimize_model(
        proto,
        model_type="vit",
        num_heads=0,
        hidden_size=0,
        opt_level=0,
        use_gpu=False,
        optimization_options=options,
    )
    stats = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    proto = opt.model
    # The fusions write contrib ops (BiasGelu) without declaring their domain; a graph whose attention
    # was not fused to com.microsoft.Attention had no such import, and onnx's shape inference (fp16
    # conversion, quantization) then refuses the file.
    domains = {o.domain for o in proto.opset_import}
    if "com.microsoft" not in domains and any(n.domain == "com.microsoft" for n in proto.graph.node):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return proto, stats


def parity(model: nn.Module, onnx_path: str | Path, x: torch.Tensor, threads: int = 2) -> dict:
    """PyTorch vs ONNX Runtime logits on the same inputs: max |difference| and argmax agreement."""
    from slimvit.evaluate import predict_logits

    ref = predict_logits(model, x)
    sess = runtime.session(onnx_path, threads)
    got = runtime.run_logits(sess, x.numpy())
    return {
        "n": len(x),
        "max_abs_diff": float(np.abs(got - ref).max()),
        "agreement": float(np.mean(got.argmax(1) == ref.argmax(1))),
    }


MIN_AGREEMENT = 0.999


def run_export(cfg, run_dir: str | Path, data=None) -> dict:
    """Export the teacher, the student and every candidate; check each against PyTorch on the test split.

    The parity check compares two runtimes of one model (no selection), so it may read test images.
    """
    from slimvit.data import load_data, to_tensor_batch

    run_dir = Path(run_dir)
    missing = [s for s in STAGES if not (run_dir / s / SPEC).exists()]
    if missing:
        cmd = {"teacher": "slimvit teacher", "student": "slimvit distill", "pruned": "slimvit prune"}[
            missing[0]
        ]
        raise ModelError(
            f"no {missing[0]} model in '{run_dir / missing[0]}'; run `{cmd}` (or `slimvit run`) first"
        )
    data = data or load_data(cfg.data, run_dir)
    images, _ = data.arrays("test")
    q = cfg.quantize
    results = {}
    for stage in dict.fromkeys([*STAGES, *candidates(run_dir)]):
        model, spec = models.load(run_dir / stage)
        path = run_dir / onnx_file(stage, "fp32")
        info = export_onnx(
            model,
            spec,
            path,
            stage=stage,
            opset=q.opset,
            fuse_attention=q.fuse_attention,
            optimize=q.optimize,
        )
        check = parity(model, path, to_tensor_batch(images, spec.mean, spec.std), cfg.bench.threads)
        info.update(check, file=str(path.relative_to(run_dir)))
        log.info(
            "export %s: %s (%.2f MB, opset %d, %d fused attention blocks); parity on %d test images: "
            "max |logit diff| %.2g, argmax agreement %.2f%%",
            stage,
            path,
            info["size_mb"],
            info["opset"],
            info["fused_attention"],
            check["n"],
            check["max_abs_diff"],
            100 * check["agreement"],
        )
        if check["agreement"] < MIN_AGREEMENT:
            raise ModelError(
                f"the ONNX {stage} model agrees with PyTorch on only {100 * check['agreement']:.2f}% of the "
                f"test images (max |logit diff| {check['max_abs_diff']:.3g}); the export is wrong, not kept as done"
            )
        results[stage] = info
    if is_main_process():
        atomic_write_json(run_dir / EXPORT, results)
    return {s: {k: r[k] for k in ("size_mb", "max_abs_diff", "agreement")} for s, r in results.items()}
