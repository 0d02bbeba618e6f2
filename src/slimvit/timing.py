"""Machine facts and latency helpers shared by training, the benchmark and the pruning sweep."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "avx512_fp16")
"""CPU features that decide which kernels (int8 VNNI, bf16, fp16) run natively."""


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """Feature flags of the CPU (x86 `flags`, Arm `Features`); empty where /proc/cpuinfo is absent."""
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    return {
        f
        for line in text.splitlines()
        if line.startswith(("flags", "Features"))
        for f in line.split(":", 1)[-1].split()
    }


def cpu_name() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cores() -> int:
    """The CPUs this process may run on (its affinity mask, where the OS has one)."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def package_version(pkg: str) -> str:
    """An installed package's version, "-" where it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "-"


def versions() -> dict[str, str]:
    """The Python version and those of the packages the timings depend on (bench.json's `versions`)."""
    out = {"python": platform.python_version()}
    for pkg in (
        "torch",
        "timm",
        "torch-pruning",
        "onnx",
        "onnxruntime",
        "openvino",
        "accelerate",
        "numpy",
        "slimvit",
    ):
        out[pkg] = package_version(pkg)
    return out


def set_torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def time_calls(fn: Callable[[], object], runs: int, warmup: int = 0) -> np.ndarray:
    """Milliseconds of `runs` calls of `fn` after `warmup` untimed calls; inputs are prepared by the caller."""
    for _ in range(warmup):
        fn()
    out = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        fn()
        out[i] = (time.perf_counter() - t0) * 1e3
    return out


def count_macs_params(model, input_size) -> tuple[int, int]:
    """MACs and parameters of one batch-1 forward (Torch-Pruning's counter, eval mode)."""
    import torch
    import torch_pruning as tp

    was = model.training
    model.eval()
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, torch.randn(1, *input_size))
    model.train(was)
    return int(macs), int(params)


def compare_latency(named: dict, input_size, bcfg) -> dict[str, dict]:
    """Batch-1 FP32 eager latency of several PyTorch models, timed in interleaved rounds (p50/p90 ms)."""
    import torch

    prev = torch.get_num_threads()
    set_torch_threads(bcfg.threads)
    x = torch.randn(1, *input_size)
    per_round = max(1, bcfg.runs // bcfg.rounds)
    times: dict[str, list[np.ndarray]] = {k: [] for k in named}
    try:
        with torch.inference_mode():
            for m in named.values():
                m.eval()
                time_calls(lambda m=m: m(x), 0, bcfg.warmup)
            for _ in range(bcfg.rounds):
                for k, m in named.items():
                    times[k].append(time_calls(lambda m=m: m(x), per_round))
    finally:
        torch.set_num_threads(prev)
    out = {}
    for k, ts in times.items():
        t = np.concatenate(ts)
        out[k] = {
            "p50": float(np.median(t)),
            "p90": float(np.percentile(t, 90)),
            "runs": len(t),
            "threads": bcfg.threads,
        }
    return out
