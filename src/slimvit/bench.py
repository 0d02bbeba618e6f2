"""`slimvit bench`: size, params, MACs, accuracy, latency and throughput of every artifact of a run.

All variants are measured in one process with the same thread count, after a warm-up, in
interleaved rounds (each round times every variant once), so a noisy neighbour or a clock change
hits every variant alike; the reported latency is the median (and p90) over all rounds. Inputs
are made before the timed region. Accuracy is measured again here on the full test split, for
PyTorch and ONNX Runtime alike, through the same numpy preprocessing that `slimvit predict` uses.

The deployed model is the fastest pruned ONNX variant whose test accuracy is within
`quantize.accuracy_tolerance` points of the pruned FP32 ONNX model; it is copied to
`deploy/model.onnx`, and `slimvit predict` is run on the test images with it as a final check.
"""

from __future__ import annotations

import logging
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slimvit.errors import ModelError
from slimvit.io import atomic_path, atomic_write_json, atomic_write_text, is_main_process, read_json
from slimvit.timing import ISA_FLAGS, cpu_flags, cpu_name

log = logging.getLogger(__name__)

ROW_KEYS = (
    "stage",
    "runtime",
    "precision",
    "reference",
    "deployed",
    "file",
    "size_mb",
    "params",
    "macs",
    "accuracy",
    "macro_f1",
    "latency_ms_p50",
    "latency_ms_p90",
    "throughput_ips",
    "gmacs_per_s",
)


@dataclass
class Variant:
    """One artifact to measure: how to run it at batch 1 and batch B, and what it is."""

    stage: str
    runtime: str
    precision: str
    file: str
    params: int
    macs: int
    predict: Callable[[np.ndarray], np.ndarray]
    """float32 (N, 3, H, W) -> logits (N, classes)."""
    reference: bool = False
    times: list[float] = field(default_factory=list)
    batch_times: list[float] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.stage}/{self.runtime}/{self.precision}"


def _torch_variant(run_dir: Path, stage: str, reference: bool = False) -> Variant:
    """Eager PyTorch; its thread count is set by `measure`."""
    import torch

    from slimvit import models
    from slimvit.prune import count_macs_params

    model, spec = models.load(run_dir / stage)
    macs, params = count_macs_params(model, spec["input_size"])

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = model(torch.from_numpy(x))
            if isinstance(out, (tuple, list)):
                out = (out[0] + out[1]) / 2
            return out.numpy()

    return Variant(
        stage, "pytorch", "fp32", f"{stage}/model.safetensors", params, macs, predict, reference=reference
    )


def _onnx_variant(run_dir: Path, rel: str, stage: str, precision: str, params: int, macs: int, threads: int):
    from slimvit import runtime

    sess = runtime.session(run_dir / rel, threads)
    name = sess.get_inputs()[0].name
    return Variant(stage, "onnxruntime", precision, rel, params, macs, lambda x: sess.run(None, {name: x})[0])


def collect_variants(run_dir: Path, threads: int) -> list[Variant]:
    """Every artifact of the run: PyTorch teacher/student/pruned, their ONNX exports, the quantized variants."""
    run_dir = Path(run_dir)
    for need, cmd in (("onnx/export.json", "slimvit export"), ("onnx/quantize.json", "slimvit quantize")):
        if not (run_dir / need).exists():
            raise ModelError(f"no '{run_dir / need}'; run `{cmd}` (or `slimvit run`) first")
    out = [_torch_variant(run_dir, s, reference=(s == "student")) for s in ("teacher", "student", "pruned")]
    sizes = {v.stage: (v.params, v.macs) for v in out}
    exported = read_json(run_dir / "onnx" / "export.json")
    for stage, info in exported.items():
        out.append(_onnx_variant(run_dir, info["file"], stage, "fp32", *sizes[stage], threads))
    for mode, info in read_json(run_dir / "onnx" / "quantize.json").items():
        if mode != "fp32":
            out.append(_onnx_variant(run_dir, info["file"], "pruned", mode, *sizes["pruned"], threads))
    return out


def measure(
    variants: list[Variant], input_size, bcfg, progress: bool = True, throughput: bool = True
) -> None:
    """Batch-1 latency (and batch-B throughput) of every variant, in interleaved rounds."""
    import torch
    from tqdm.auto import tqdm

    from slimvit.timing import time_calls

    prev = torch.get_num_threads()
    torch.set_num_threads(bcfg.threads)
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((1, *input_size), dtype=np.float32)
    xb = rng.standard_normal((bcfg.throughput_batch, *input_size), dtype=np.float32)
    per_round = max(1, -(-bcfg.runs // bcfg.rounds))
    try:
        for v in variants:
            time_calls(lambda v=v: v.predict(x1), 0, bcfg.warmup)
            if throughput:
                v.predict(xb)
        # Batch 1 first, in short blocks (`per_round` calls after `block_warmup` untimed ones: the
        # first calls after switching models run slow): a slow spell of a shared machine then falls
        # on every variant instead of on whichever variant's long block it hit.
        bar = tqdm(range(bcfg.rounds), desc="bench rounds", disable=not progress, leave=False)
        for _ in bar:
            for v in variants:
                time.sleep(0.02)  # let the previous runtime's spinning threads go idle
                v.times += time_calls(lambda v=v: v.predict(x1), per_round, bcfg.block_warmup).tolist()
        for _ in range(bcfg.throughput_runs if throughput else 0):
            for v in variants:
                time.sleep(0.02)
                v.batch_times += time_calls(lambda v=v: v.predict(xb), 1, warmup=1).tolist()
    finally:
        torch.set_num_threads(prev)


def row(v: Variant, metrics: dict, size_mb: float, batch: int) -> dict:
    t = np.asarray(v.times)
    p50 = float(np.median(t))
    return {
        "stage": v.stage,
        "runtime": v.runtime,
        "precision": v.precision,
        "reference": v.reference,
        "deployed": False,
        "file": v.file,
        "size_mb": size_mb,
        "params": v.params,
        "macs": v.macs,
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "latency_ms_p50": p50,
        "latency_ms_p90": float(np.percentile(t, 90)),
        "latency_runs": len(t),
        "throughput_ips": batch / (float(np.median(v.batch_times)) / 1e3),
        "gmacs_per_s": v.macs / (p50 / 1e3) / 1e9,
    }


def thread_counts(threads: int) -> list[int]:
    """1, 2, 4, ... below `threads`, then `threads`."""
    out, t = [], 1
    while t < threads:
        out.append(t)
        t *= 2
    return [*out, threads]


def thread_scaling(run_dir: Path, rows: list[dict], input_size, bcfg) -> list[dict]:
    """Batch-1 latency of the pruned FP32 ONNX model and the deployed one at 1, 2, 4, ... threads.

    One pass of its own after the main measurement, every (model, thread count) pair interleaved as
    there, so the speed-ups between thread counts compare like with like. Small int8 kernels gain
    less from a second core than float ones.
    """
    picks = [
        r
        for r in rows
        if r["stage"] == "pruned"
        and r["runtime"] == "onnxruntime"
        and (r["precision"] == "fp32" or r["deployed"])
    ]
    pairs = [(r, t) for t in thread_counts(bcfg.threads) for r in picks]
    vs = [
        _onnx_variant(run_dir, r["file"], "pruned", r["precision"], r["params"], r["macs"], t)
        for r, t in pairs
    ]
    measure(vs, input_size, bcfg, progress=False, throughput=False)
    return [
        {
            "precision": r["precision"],
            "deployed": r["deployed"],
            "threads": t,
            "latency_ms_p50": float(np.median(v.times)),
            "latency_ms_p90": float(np.percentile(v.times, 90)),
        }
        for (r, t), v in zip(pairs, vs, strict=True)
    ]


TIE = 0.05
"""Latencies within this fraction of the fastest count as a tie: run-to-run noise on a shared 2-core
machine is larger than that, so the smaller file wins among them."""


def choose_deployed(rows: list[dict], tolerance_points: float) -> tuple[dict, str]:
    """The fastest pruned ONNX variant within `tolerance_points` accuracy of the pruned FP32 ONNX model.

    Variants within `TIE` of the fastest p50 are a tie, broken by the smaller file.
    """
    cands = [r for r in rows if r["stage"] == "pruned" and r["runtime"] == "onnxruntime"]
    base = next(r for r in cands if r["precision"] == "fp32")
    ok = [r for r in cands if r["accuracy"] >= base["accuracy"] - tolerance_points / 100 - 1e-9]
    fastest = min(r["latency_ms_p50"] for r in ok)
    best = min((r for r in ok if r["latency_ms_p50"] <= fastest * (1 + TIE)), key=lambda r: r["size_mb"])
    others = ", ".join(
        f"{r['precision']} {r['latency_ms_p50']:.2f} ms / {100 * r['accuracy']:.2f}%"
        + ("" if r in ok else " (outside the accuracy bound)")
        for r in cands
        if r is not best
    )
    why = (
        f"fastest pruned ONNX variant within {tolerance_points:g} accuracy points of the pruned FP32 model "
        f"({100 * base['accuracy']:.2f}%), the smallest file among those within {TIE:.0%} of the fastest p50: "
        f"{best['precision']} {best['latency_ms_p50']:.2f} ms / {best['size_mb']:.2f} MB / "
        f"{100 * best['accuracy']:.2f}%; others: {others}"
    )
    return best, why


def bench_table(rows: list[dict]) -> str:
    ref = next(r for r in rows if r["reference"])
    lines = [
        "| stage | runtime | precision | params (M) | size MB | MACs (M) | accuracy % | macro-F1 | "
        "p50 ms | p90 ms | x reference | images/s | GMAC/s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        tag = " (reference)" if r["reference"] else " **(deployed)**" if r["deployed"] else ""
        lines.append(
            f"| {r['stage']}{tag} | {r['runtime']} | {r['precision']} | {r['params'] / 1e6:.2f} | "
            f"{r['size_mb']:.2f} | {r['macs'] / 1e6:.0f} | {100 * r['accuracy']:.2f} | {r['macro_f1']:.4f} | "
            f"{r['latency_ms_p50']:.2f} | {r['latency_ms_p90']:.2f} | "
            f"{r['latency_ms_p50'] / ref['latency_ms_p50']:.2f} | {r['throughput_ips']:.0f} | "
            f"{r['gmacs_per_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def predict_check(model_path: Path, data) -> dict:
    """Run the edge path (`slimvit predict`) on the test image files; its accuracy must match bench's."""
    from slimvit.predict import predict_files

    paths = data.paths("test")
    _, labels = data.arrays("test")
    results, failed = predict_files(model_path, paths, threads=2)
    by_path = {r["path"]: r["class"] for r in results}
    pred = [by_path.get(str(p)) for p in paths]
    correct = sum(p == data.classes[y] for p, y in zip(pred, labels, strict=True))
    return {"n": len(paths), "failed": len(failed), "accuracy": correct / max(1, len(paths))}


def run_bench(cfg, run_dir: str | Path, data=None) -> dict:
    """Measure every artifact, write bench.json/bench.md, and deploy the chosen model to deploy/."""
    from slimvit import models
    from slimvit.data import load_data
    from slimvit.evaluate import metrics_from_logits
    from slimvit.preprocess import normalize

    run_dir = Path(run_dir)
    bcfg = cfg.bench
    variants = collect_variants(run_dir, bcfg.threads)
    data = data or load_data(cfg.data, run_dir)
    spec = models.read_spec(run_dir / "student")
    images, labels = data.arrays("test")
    x_by_norm: dict[tuple, np.ndarray] = {}
    metrics = {}
    for v in variants:
        s = models.read_spec(run_dir / v.stage)
        norm = (tuple(s["mean"]), tuple(s["std"]))
        if norm not in x_by_norm:
            x_by_norm[norm] = normalize(images, *norm)
        x = x_by_norm[norm]
        logits = np.concatenate([v.predict(x[i : i + 64]) for i in range(0, len(x), 64)])
        metrics[v.key] = metrics_from_logits(logits, labels, data.classes)
    log.info("bench: timing %d variants, %d threads, %d rounds", len(variants), bcfg.threads, bcfg.rounds)
    t0 = time.perf_counter()
    measure(variants, spec["input_size"], bcfg)
    rows = [
        row(v, metrics[v.key], (run_dir / v.file).stat().st_size / 1e6, bcfg.throughput_batch)
        for v in variants
    ]
    deployed, why = choose_deployed(rows, cfg.quantize.accuracy_tolerance)
    deployed["deployed"] = True
    scaling = thread_scaling(run_dir, rows, spec["input_size"], bcfg)
    out = {
        "threads": bcfg.threads,
        "cpu": cpu_name(),
        "isa": sorted(set(ISA_FLAGS) & cpu_flags(), key=ISA_FLAGS.index),
        "cores": _cores(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "settings": {
            "warmup": bcfg.warmup,
            "runs": bcfg.runs,
            "rounds": bcfg.rounds,
            "block_warmup": bcfg.block_warmup,
            "throughput_batch": bcfg.throughput_batch,
            "throughput_runs": bcfg.throughput_runs,
            "seconds": time.perf_counter() - t0,
        },
        "versions": versions(),
        "deployed_why": why,
        "rows": [{k: r[k] for k in (*ROW_KEYS, "latency_runs")} for r in rows],
        "thread_scaling": scaling,
        "confusion": {v.key: metrics[v.key]["confusion"] for v in variants},
        "classes": data.classes,
    }
    if is_main_process():
        dst = run_dir / "deploy" / "model.onnx"
        with atomic_path(dst) as tmp:
            shutil.copyfile(run_dir / deployed["file"], tmp)
        check = predict_check(dst, data)
        check["agrees"] = abs(check["accuracy"] - deployed["accuracy"]) < 1e-9 and check["failed"] == 0
        out["predict_check"] = check
        if not check["agrees"]:
            log.warning(
                "slimvit predict gives %.4f on the test images, bench measured %.4f for the deployed model",
                check["accuracy"],
                deployed["accuracy"],
            )
        atomic_write_json(run_dir / "deploy" / "deploy.json", {"source": deployed["file"], "why": why})
        atomic_write_text(run_dir / "bench.md", bench_table(rows))
        atomic_write_json(run_dir / "bench.json", out)
    log.info("bench (%d threads, %s):\n%s", bcfg.threads, out["cpu"], bench_table(rows))
    log.info("deployed: %s", why)
    return {
        "deployed": deployed["file"],
        "deployed_latency_ms": deployed["latency_ms_p50"],
        "deployed_accuracy": deployed["accuracy"],
    }


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("torch", "timm", "torch-pruning", "onnx", "onnxruntime", "accelerate", "numpy", "slimvit"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "-"
    return out
