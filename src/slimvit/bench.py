"""`slimvit bench`: size, params, MACs, accuracy, latency and throughput of every artifact of a run.

All variants are measured in one run with the same thread count, after a warm-up, in interleaved
rounds (each round times every variant once), so a noisy neighbour or a clock change hits every
variant alike; the reported latency is the median (and p90) over all rounds. Each deployable runtime
(ONNX Runtime, OpenVINO) runs in a worker process of its own that imports no torch, as it runs when
deployed (`slimvit.workers`); eager PyTorch rows run in this process. Inputs are made before the
timed region. Accuracy is measured on the full validation and test splits through the same numpy
preprocessing that `slimvit predict` uses; agreement with the student, which needs no labels, on
the views and unlabeled images that `slimvit.fidelity` makes.

The deployment candidates are every ONNX variant of the pruned model and of every sweep model, and the
teacher's ONNX file, on both runtimes; the `deploy` stage (`slimvit.deploy`) chooses among them on
validation accuracy.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slimvit.errors import ModelError
from slimvit.fidelity import fidelity
from slimvit.io import atomic_write_json, atomic_write_text, is_main_process, read_json
from slimvit.labels import pct_ci
from slimvit.layout import (
    BENCH,
    BENCH_TABLE,
    EXPORT,
    LOGITS,
    PRUNE,
    PRUNED,
    QUANTIZE,
    STUDENT,
    TEACHER,
    model_files,
    write_logits,
)
from slimvit.spec import read_spec
from slimvit.timing import ISA_FLAGS, cores, cpu_flags, cpu_name, package_version, versions

log = logging.getLogger(__name__)

ROW_KEYS = (
    "key",
    "stage",
    "ratio",
    "depth",
    "candidate",
    "runtime",
    "precision",
    "reference",
    "file",
    "size_mb",
    "params",
    "macs",
    "accuracy",
    "accuracy_ci",
    "n",
    "balanced_accuracy",
    "macro_f1",
    "val_accuracy",
    "val_accuracy_ci",
    "val_balanced_accuracy",
    "val_n",
    "agreement",
    "agreement_kl",
    "agreement_n",
    "view_accuracy",
    "ran_precision",
    "portable",
    "safe_on",
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
    ratio: float | None = None
    """Pruning ratio of a pruned model."""
    depth: int | None = None
    """Transformer blocks a depth-pruned model kept (None: all of the student's)."""
    candidate: bool = False
    """A deployment candidate (an ONNX variant of the pruned model or of a sweep model, or the teacher's
    ONNX file)."""
    portability: dict | None = None
    """quantize.portability() of an int8 variant."""
    ran_precision: str | None = None
    """The precision the runtime actually computed in (OpenVINO runs float models in bf16 where it can)."""
    remote: tuple | None = None
    """(worker, model key) when the model runs in a runtime worker process (`slimvit.workers`)."""
    times: list[float] = field(default_factory=list)
    batch_times: list[float] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.stage}/{self.runtime}/{self.precision}"

    def time_block(self, x: np.ndarray, runs: int, warmup: int) -> np.ndarray:
        """ms of `runs` calls on `x` after `warmup` untimed ones, timed in the process the model runs in."""
        from slimvit.timing import time_calls

        if self.remote is not None:
            worker, k = self.remote
            return worker.call("time", k, x, runs, warmup)
        return time_calls(lambda: self.predict(x), runs, warmup)

    def logits(self, x: np.ndarray, npy: Path | None = None) -> np.ndarray:
        """Logits of a float32 batch; a remote model reads it from the `npy` file holding `x`."""
        if self.remote is not None and npy is not None:
            worker, k = self.remote
            return worker.call("logits", k, str(npy))
        return np.concatenate([self.predict(x[i : i + 64]) for i in range(0, len(x), 64)])


def _torch_variant(run_dir: Path, stage: str, reference: bool = False) -> Variant:
    """Eager PyTorch; its thread count is set by `measure`."""
    import torch

    from slimvit import models
    from slimvit.timing import count_macs_params

    model, spec = models.load(run_dir / stage)
    macs, params = count_macs_params(model, spec.input_size)

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return models.eval_logits(model(torch.from_numpy(x))).numpy()

    return Variant(
        stage, "pytorch", "fp32", model_files(stage)[0], params, macs, predict, reference=reference
    )


def _onnx_variant(
    run_dir: Path,
    rel: str,
    stage: str,
    precision: str,
    params: int,
    macs: int,
    threads: int,
    workers=None,
    runtime: str = "onnxruntime",
    **kw,
) -> Variant:
    """An ONNX file on ONNX Runtime or OpenVINO, in that runtime's worker process when `workers` is given."""
    from slimvit.workers import load_model

    remote = None
    if workers is not None:
        worker = workers.get(runtime)
        k, facts = worker.load(run_dir / rel, threads)
        remote = (worker, k)
        if facts.get("torch_loaded"):
            log.warning(
                "bench: the %s worker has torch loaded; its timings are not those of a deployment", runtime
            )

        def predict(x: np.ndarray) -> np.ndarray:
            raise RuntimeError("a worker's model runs through Variant.logits / Variant.time_block")

    else:
        predict, facts = load_model(runtime, run_dir / rel, threads)
    if facts.get("ran_precision"):
        kw["ran_precision"] = facts["ran_precision"]
    return Variant(stage, runtime, precision, rel, params, macs, predict, remote=remote, **kw)


def _pruning(run_dir: Path, stage: str) -> dict:
    """{"ratio": width pruning ratio, "depth": blocks kept by depth pruning} of a pruned model (None each
    where not pruned so)."""
    p = run_dir / stage / PRUNE
    info = read_json(p) if p.exists() else {}
    return {"ratio": float(info["ratio"]) if "ratio" in info else None, "depth": info.get("depth")}


def _macs_params(run_dir: Path, stage: str) -> tuple[int, int]:
    from slimvit import models
    from slimvit.timing import count_macs_params

    model, spec = models.load(run_dir / stage)
    return count_macs_params(model, spec.input_size)


def _candidate(
    run_dir: Path,
    stage: str,
    mode: str,
    info: dict,
    size: tuple,
    pruning: dict,
    threads: int,
    workers,
    runtime: str,
) -> Variant:
    """One deployment candidate: a quantize.json variant of a pruned or sweep model (or the teacher's FP32 file), on one runtime."""
    return _onnx_variant(
        run_dir,
        info["file"],
        stage,
        mode,
        *size,
        threads,
        workers,
        runtime=runtime,
        **pruning,
        candidate=True,
        portability=info.get("portability"),
    )


def _openvino_variants(
    run_dir: Path, quantized: dict, sizes: dict, pruning: dict, threads: int, workers=None
) -> tuple[list[Variant], dict]:
    """OpenVINO runs of each candidate's FP32 and static INT8 files, and what happened (bench.json `openvino`)."""
    from slimvit import openvino_runtime as ovr

    ok, why = ovr.available()
    status: dict = {"available": ok, "why": why, "skipped": []}
    if not ok:
        log.warning("bench: OpenVINO skipped: %s", why)
        return [], status
    status["version"] = package_version("openvino")
    out = []
    for stage, variants in quantized.items():
        for mode in ovr.PRECISIONS:
            if mode not in variants:
                continue
            info = variants[mode]
            try:
                out.append(
                    _candidate(
                        run_dir, stage, mode, info, sizes[stage], pruning[stage], threads, workers, "openvino"
                    )
                )
            except ModelError as e:
                status["skipped"].append({"file": info["file"], "why": str(e)})
    return out, status


def collect_variants(run_dir: Path, threads: int, workers=None) -> tuple[list[Variant], dict]:
    """Every artifact of the run: PyTorch teacher/student/pruned, their ONNX exports, and every ONNX variant
    of every deployment candidate (the pruned model, the sweep models, the teacher's FP32 file) on ONNX
    Runtime and OpenVINO.

    With `workers` (a `slimvit.workers.Workers`), each runtime's models live in a process of their own.
    Returns the variants and the OpenVINO status (available, version, files it could not run)."""
    run_dir = Path(run_dir)
    for need, cmd in ((EXPORT, "slimvit export"), (QUANTIZE, "slimvit quantize")):
        if not (run_dir / need).exists():
            raise ModelError(f"no '{run_dir / need}'; run `{cmd}` (or `slimvit run`) first")
    out = [_torch_variant(run_dir, s, reference=(s == STUDENT)) for s in (TEACHER, STUDENT, PRUNED)]
    out[2].ratio = _pruning(run_dir, PRUNED)["ratio"]
    sizes = {v.stage: (v.params, v.macs) for v in out}
    exported = read_json(run_dir / EXPORT)
    quantized = read_json(run_dir / QUANTIZE).get("models", {})
    for stage, info in exported.items():
        if stage not in sizes:
            macs, params = _macs_params(run_dir, stage)
            sizes[stage] = (params, macs)
        if stage not in quantized:  # the student: the reference row; the teacher: a candidate as it is
            out.append(
                _onnx_variant(
                    run_dir,
                    info["file"],
                    stage,
                    "fp32",
                    *sizes[stage],
                    threads,
                    workers,
                    candidate=stage == TEACHER,
                )
            )
    pruning = {stage: _pruning(run_dir, stage) for stage in quantized}
    for stage, variants in quantized.items():
        for mode, info in variants.items():
            out.append(
                _candidate(
                    run_dir, stage, mode, info, sizes[stage], pruning[stage], threads, workers, "onnxruntime"
                )
            )
    teacher = {TEACHER: {"fp32": exported[TEACHER]}} if TEACHER in exported else {}
    unpruned = {TEACHER: {"ratio": None, "depth": None}}
    ov, ov_status = _openvino_variants(
        run_dir, {**teacher, **quantized}, sizes, {**unpruned, **pruning}, threads, workers
    )
    return out + ov, ov_status


def measure(
    variants: list[Variant], input_size, bcfg, progress: bool = True, throughput: bool = True
) -> None:
    """Batch-1 latency (and batch-B throughput) of every variant, in interleaved rounds.

    Each block is timed in the process its model runs in (a runtime worker, or this one for PyTorch).
    """
    import torch
    from tqdm.auto import tqdm

    prev = torch.get_num_threads()
    torch.set_num_threads(bcfg.threads)
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((1, *input_size), dtype=np.float32)
    xb = rng.standard_normal((bcfg.throughput_batch, *input_size), dtype=np.float32)
    per_round = max(1, -(-bcfg.runs // bcfg.rounds))
    try:
        for v in variants:
            v.time_block(x1, 0, bcfg.warmup)
            if throughput:
                v.time_block(xb, 0, 1)
        # Batch 1 first, in short blocks (`per_round` calls after `block_warmup` untimed ones: the
        # first calls after switching models run slow): a slow spell of a shared machine then falls
        # on every variant instead of on whichever variant's long block it hit.
        bar = tqdm(
            range(bcfg.rounds),
            desc="bench rounds",
            disable=not (progress and sys.stderr.isatty()),
            leave=False,
        )
        for _ in bar:
            for v in variants:
                time.sleep(0.02)  # let the previous runtime's spinning threads go idle
                v.times += v.time_block(x1, per_round, bcfg.block_warmup).tolist()
        for _ in range(bcfg.throughput_runs if throughput else 0):
            for v in variants:
                time.sleep(0.02)
                v.batch_times += v.time_block(xb, 1, 1).tolist()
    finally:
        torch.set_num_threads(prev)


def row(
    v: Variant, metrics: dict, size_mb: float, batch: int, val: dict | None = None, fid: dict | None = None
) -> dict:
    t = np.asarray(v.times)
    p50 = float(np.median(t))
    port = v.portability or {}
    return {
        "key": v.key,
        "stage": v.stage,
        "ratio": v.ratio,
        "depth": v.depth,
        "candidate": v.candidate,
        "runtime": v.runtime,
        "precision": v.precision,
        "reference": v.reference,
        "file": v.file,
        "size_mb": size_mb,
        "params": v.params,
        "macs": v.macs,
        "accuracy": metrics["accuracy"],
        "accuracy_ci": metrics["accuracy_ci"],
        "n": metrics["n"],
        "balanced_accuracy": metrics["balanced_accuracy"],
        "macro_f1": metrics["macro_f1"],
        "val_accuracy": val["accuracy"] if val else None,
        "val_accuracy_ci": val["accuracy_ci"] if val else None,
        "val_balanced_accuracy": val["balanced_accuracy"] if val else None,
        "val_n": val["n"] if val else None,
        **{k: (fid or {}).get(k) for k in ("agreement", "agreement_kl", "agreement_n", "view_accuracy")},
        "ran_precision": v.ran_precision,
        "portable": port.get("portable", True),
        "safe_on": port.get("safe_on"),
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


def _variant_at(run_dir: Path, r: dict, threads: int, workers=None) -> Variant:
    """A bench row's model on its own runtime at `threads` intra-op threads."""
    return _onnx_variant(
        run_dir,
        r["file"],
        r["stage"],
        r["precision"],
        r["params"],
        r["macs"],
        threads,
        workers,
        runtime=r["runtime"],
    )


def thread_scaling(run_dir: Path, rows: list[dict], input_size, bcfg, workers=None, pick=None) -> list[dict]:
    """Batch-1 latency of the pruned FP32 ONNX model and the default choice (`pick`) at 1, 2, 4, ... threads.

    One pass of its own after the main measurement, every (model, thread count) pair interleaved as
    there, so the speed-ups between thread counts compare like with like. Small int8 kernels gain
    less from a second core than float ones.
    """
    picks = [
        r
        for r in rows
        if (r["stage"] == "pruned" and r["runtime"] == "onnxruntime" and r["precision"] == "fp32")
        or (pick is not None and r["key"] == pick["key"])
    ]
    pairs = [(r, t) for t in thread_counts(bcfg.threads) for r in picks]
    vs = [_variant_at(run_dir, r, t, workers) for r, t in pairs]
    measure(vs, input_size, bcfg, progress=False, throughput=False)
    return [
        {
            "stage": r["stage"],
            "runtime": r["runtime"],
            "precision": r["precision"],
            "default_choice": pick is not None and r["key"] == pick["key"],
            "threads": t,
            "latency_ms_p50": float(np.median(v.times)),
            "latency_ms_p90": float(np.percentile(v.times, 90)),
        }
        for (r, t), v in zip(pairs, vs, strict=True)
    ]


def precision_label(r: dict) -> str:
    """The variant, and the precision its runtime really computed in when that differs (OpenVINO's bf16)."""
    ran = r.get("ran_precision")
    if not ran or ran == r["precision"] or ran == "fp32":
        return r["precision"]
    return r["precision"] + (
        f" (float parts {ran})" if r["precision"].startswith("int8") else f" (ran {ran})"
    )


def bench_table(rows: list[dict]) -> str:
    """Markdown table of every row; accuracies with their 95% Wilson interval."""
    ref = next(r for r in rows if r["reference"])
    lines = [
        "| stage | runtime | precision | params (M) | size MB | MACs (M) | val accuracy % (95% CI) | "
        "test accuracy % (95% CI) | macro-F1 | p50 ms | p90 ms | x reference | images/s | GMAC/s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        tag = " (reference)" if r["reference"] else " **(deployed)**" if r.get("deployed") else ""
        if r.get("portable") is False:
            tag += " (VNNI only)"
        lines.append(
            f"| {r['stage']}{tag} | {r['runtime']} | {precision_label(r)} | {r['params'] / 1e6:.2f} | "
            f"{r['size_mb']:.2f} | {r['macs'] / 1e6:.0f} | {pct_ci(r.get('val_accuracy'), r.get('val_accuracy_ci'), unit='')} | "
            f"{pct_ci(r['accuracy'], r.get('accuracy_ci'), unit='')} | {r['macro_f1']:.4f} | "
            f"{r['latency_ms_p50']:.2f} | {r['latency_ms_p90']:.2f} | "
            f"{r['latency_ms_p50'] / ref['latency_ms_p50']:.2f} | {r['throughput_ips']:.0f} | "
            f"{r['gmacs_per_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def run_bench(cfg, run_dir: str | Path, data=None) -> dict:
    """Measure every artifact and write bench.json/bench.md; then choose and write `deploy/`."""
    from slimvit.workers import Workers

    with Workers() as workers:
        return _run_bench(cfg, Path(run_dir), data, workers)


def _run_bench(cfg, run_dir: Path, data, workers) -> dict:
    from slimvit.data import load_data

    bcfg = cfg.bench
    variants, ov_status = collect_variants(run_dir, bcfg.threads, workers)
    data = data or load_data(cfg.data, run_dir)
    spec = read_spec(run_dir / STUDENT)
    metrics, val_metrics, preds, all_logits = _accuracies(run_dir, variants, data)
    fid, fid_source = fidelity(
        variants,
        data,
        cfg,
        lambda x: logits_by_variant(run_dir, variants, x),
        val_logits=[all_logits[f"val|{v.key}"] for v in variants],
    )
    calib = _calibrations(variants, all_logits, data)
    log.info(
        "bench: timing %d variants, %d threads, %d rounds; ONNX Runtime and OpenVINO each in a process "
        "of their own (no torch), PyTorch in this one",
        len(variants),
        bcfg.threads,
        bcfg.rounds,
    )
    t0 = time.perf_counter()
    measure(variants, spec.input_size, bcfg)
    rows = [
        row(
            v,
            metrics[v.key],
            (run_dir / v.file).stat().st_size / 1e6,
            bcfg.throughput_batch,
            val_metrics[v.key],
            fid.get(v.key),
        )
        for v in variants
    ]
    scaling = thread_scaling(run_dir, rows, spec.input_size, bcfg, workers, _default_pick(rows, cfg))
    out = {
        **_conditions(bcfg, t0),
        "openvino": ov_status,
        "fidelity": fid_source,
        "rows": [{k: r[k] for k in (*ROW_KEYS, "latency_runs")} for r in rows],
        "thread_scaling": scaling,
        "confusion": {v.key: metrics[v.key]["confusion"] for v in variants},
        "per_class_recall": {v.key: metrics[v.key]["per_class_recall"] for v in variants},
        "per_class_recall_ci": {v.key: metrics[v.key]["per_class_recall_ci"] for v in variants},
        "per_class_support": metrics[variants[0].key]["per_class_support"] if variants else {},
        "classes": data.classes,
        "predictions": preds,
        "calibration": calib,
        "val_labels": [int(y) for y in data.arrays("val")[1]],
        "test_images": _test_images(data),
    }
    if is_main_process():
        atomic_write_text(run_dir / BENCH_TABLE, bench_table(out["rows"]))
        write_logits(run_dir / LOGITS, all_logits)
        atomic_write_json(run_dir / BENCH, out)
    log.info("bench (%d threads, %s):\n%s", bcfg.threads, out["cpu"], bench_table(out["rows"]))
    return {"variants": len(rows), "seconds": out["settings"]["seconds"]}


def _accuracies(run_dir: Path, variants: list[Variant], data) -> tuple[dict, dict, dict, dict]:
    """Every variant on the test and validation splits: (test metrics, validation metrics, test
    predictions, logits as `<split>|<key>` -> float32 array), by variant key."""
    from slimvit.evaluate import metrics_from_logits

    metrics, val_metrics, preds, all_logits = {}, {}, {}, {}
    for split, store in (("test", metrics), ("val", val_metrics)):
        images, labels = data.arrays(split)
        for v, logits in zip(variants, logits_by_variant(run_dir, variants, images), strict=True):
            store[v.key] = metrics_from_logits(logits, labels, data.classes)
            all_logits[f"{split}|{v.key}"] = logits.astype(np.float32)
            if split == "test":
                preds[v.key] = logits.argmax(1).astype(int).tolist()
    return metrics, val_metrics, preds, all_logits


def _calibrations(variants: list[Variant], all_logits: dict, data) -> dict:
    """Each variant's temperature, fitted on validation, and what it does on test (calibrate.calibration)."""
    from slimvit.calibrate import calibration

    y_val, y_test = data.arrays("val")[1], data.arrays("test")[1]
    return {
        v.key: calibration(all_logits[f"val|{v.key}"], y_val, all_logits[f"test|{v.key}"], y_test)
        for v in variants
    }


def _default_pick(rows: list[dict], cfg) -> dict:
    """The row the default rule (no budgets) deploys, else the fastest candidate: the thread-scaling pass
    times it."""
    from slimvit import deploy

    try:
        pick, _ = deploy.choose(
            rows,
            max_drop=cfg.deploy.max_drop,
            min_agreement=cfg.deploy.min_agreement,
            min_speedup=cfg.deploy.min_speedup,
        )
    except deploy.NothingFits:
        pick = min((r for r in rows if r["candidate"]), key=lambda r: r["latency_ms_p50"])
    return pick


def _conditions(bcfg, t0: float) -> dict:
    """What the timings were taken on and how (bench.json's head); `seconds` counts from `t0`."""
    from slimvit.quantize import validated_on

    return {
        "threads": bcfg.threads,
        "cpu": cpu_name(),
        "isa": sorted(set(ISA_FLAGS) & cpu_flags(), key=ISA_FLAGS.index),
        "cores": cores(),
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
        "timed_in": "ONNX Runtime and OpenVINO rows in one worker process per runtime without torch "
        "(as deployed); PyTorch rows in the bench process",
        "validated_on": validated_on(),
    }


def logits_by_variant(run_dir: Path, variants: list[Variant], images: np.ndarray) -> list[np.ndarray]:
    """Logits of every variant on uint8 images, each normalised the way its model expects.

    Models in worker processes read the normalised images from an .npy file (written once per
    normalisation), not through their pipe.
    """
    import tempfile

    from slimvit.preprocess import normalize

    x_by_norm: dict[tuple, tuple[np.ndarray, Path]] = {}
    out = []
    with tempfile.TemporaryDirectory(prefix="slimvit-bench-") as tmp:
        for v in variants:
            s = read_spec(run_dir / v.stage)
            norm = (s.mean, s.std)
            if norm not in x_by_norm:
                x = normalize(images, *norm)
                npy = Path(tmp) / f"x{len(x_by_norm)}-{len(x)}.npy"
                np.save(npy, x)
                x_by_norm[norm] = (x, npy)
            x, npy = x_by_norm[norm]
            out.append(v.logits(x, npy))
    return out


def _test_images(data) -> dict:
    """The test images (relative to the dataset root) and their labels: `slimvit verify` re-reads them."""
    idx = data.split["test"]
    return {
        "root": str(Path(data.index.root).resolve()),
        "paths": [data.index.samples[i].path for i in idx],
        "labels": [data.classes[data.index.samples[i].label] for i in idx],
        # defect boxes (name, xmin, ymin, xmax, ymax) in the image's own pixels, where the layout has them
        "boxes": [[list(b) for b in data.index.samples[i].boxes] for i in idx],
    }
