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


def torch_latency_ms(
    model, input_size: tuple[int, int, int], threads: int, runs: int = 50, warmup: int = 10
) -> dict:
    """Batch-1 eager FP32 latency of a PyTorch model: p50/p90 in ms."""
    import torch

    set_torch_threads(threads)
    model.eval()
    x = torch.randn(1, *input_size)
    with torch.inference_mode():
        t = time_calls(lambda: model(x), runs, warmup)
    return {"p50": float(np.median(t)), "p90": float(np.percentile(t, 90)), "runs": runs, "threads": threads}
