"""Latency helpers shared by the benchmark and the pruning sweep."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


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
