"""Runtime worker processes: each deployable runtime is timed in a process that imports only itself.

A deployed model runs in a process without torch. Timed inside the benchmark's own process (which
holds PyTorch for the eager rows), ONNX Runtime sessions came out 30-40% slower than the same sessions
in a process of their own (measured on an AVX2 machine). So `slimvit bench` starts one worker per
runtime (`onnxruntime`, `openvino`), each importing numpy, slimvit's torch-free modules and that
runtime only, and asks it to run or time one model at a time. The rounds stay interleaved across
all variants and processes: while one worker times a block, every other process waits on its pipe.

The protocol is a list of (command, args) messages over a `multiprocessing` pipe; a worker answers
each with ("ok", result) or ("error", one-line message).
"""

from __future__ import annotations

import multiprocessing as mp
import sys
from pathlib import Path

import numpy as np

from slimvit.errors import ModelError


def load_model(runtime: str, path: str | Path, threads: int):
    """(float32 NCHW -> logits, facts) of one ONNX file on the runtime named (whatever its metadata says).

    Used inside a worker, and by the bench itself when it runs without workers.
    """
    if runtime == "openvino":
        from slimvit import openvino_runtime

        return openvino_runtime.compile_model(path, threads)
    from slimvit import runtime as ort_runtime

    return ort_runtime.predictor(ort_runtime.session(path, threads)), {}


def serve(conn, runtime: str) -> None:
    """The worker's loop (runs in the child process)."""
    from slimvit.timing import time_calls

    models: dict[int, object] = {}
    arrays: dict[str, np.ndarray] = {}
    while True:
        cmd, args = conn.recv()
        try:
            if cmd == "stop":
                conn.send(("ok", None))
                return
            if cmd == "load":
                k, path, threads = args
                predict, facts = load_model(runtime, path, threads)
                models[k] = predict
                result = {**facts, "torch_loaded": "torch" in sys.modules}
            elif cmd == "logits":  # inputs as an .npy file: large arrays stay off the pipe
                k, path = args
                if path not in arrays:
                    arrays[path] = np.load(path)
                x = arrays[path]
                result = np.concatenate([models[k](x[i : i + 64]) for i in range(0, len(x), 64)])
            elif cmd == "time":
                k, x, runs, warmup = args
                result = time_calls(lambda m=models[k], x=x: m(x), runs, warmup)
            else:
                raise ValueError(f"unknown command {cmd!r}")
            conn.send(("ok", result))
        except Exception as e:  # one line back to the parent; the worker keeps serving
            from slimvit.errors import first_line

            conn.send(("error", f"{type(e).__name__}: {first_line(e)}"))


class Worker:
    """A child process that serves one runtime; models are addressed by the integer key given at `load`."""

    def __init__(self, runtime: str) -> None:
        ctx = mp.get_context("spawn")  # a fresh interpreter: no torch inherited from this process
        self.runtime = runtime
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(child, runtime), daemon=True)
        self.proc.start()
        child.close()
        self._next = 0

    def call(self, cmd: str, *args):
        self.conn.send((cmd, args))
        status, result = self.conn.recv()
        if status == "error":
            raise ModelError(f"{self.runtime} worker: {result}")
        return result

    def load(self, path: str | Path, threads: int) -> tuple[int, dict]:
        k = self._next
        self._next += 1
        facts = self.call("load", k, str(path), threads)
        return k, facts

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.call("stop")
            except (EOFError, OSError, ModelError):
                pass
            self.proc.join(timeout=10)
            if self.proc.is_alive():
                self.proc.kill()
        self.conn.close()


class Workers:
    """One worker per runtime, started on first use; a context manager that closes them all."""

    def __init__(self) -> None:
        self.by_runtime: dict[str, Worker] = {}

    def get(self, runtime: str) -> Worker:
        if runtime not in self.by_runtime:
            self.by_runtime[runtime] = Worker(runtime)
        return self.by_runtime[runtime]

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc) -> None:
        for w in self.by_runtime.values():
            w.close()
