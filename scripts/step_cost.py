"""What one training step of the default recipe's models costs, under the choices that set the pipeline's time.

    python scripts/step_cost.py [--compare logits|size|compile|precision|attention|optimizer] [--steps 10]
                                [--size 96]
                                [--batch 64]
                                [--precision auto|no|bf16]

Builds the `neu-det` preset's ViT-Ti student (conv stem) and ResNet-18 teacher with random weights and times
training steps (forward, soft-KD loss, backward, AdamW) in interleaved rounds, so that a slow spell of the
machine falls on every arm alike. Prints the median milliseconds per step of each arm and its ratio to the
first, with the CPU and the autocast precision used.

    --compare logits   the student's step with the teacher run on the batch (`distill.teacher_logits: live`)
                       against its logits read from memory (`cached`)
    --compare size     each model at --sizes (default 128,96 px)
    --compare compile  each model eager against torch.compile (the compile time is printed too)
    --compare precision  each model in fp32 against bf16 autocast (`train.precision: no` / `bf16`)
    --compare attention  the student's attention as plain matmuls (what training on a CPU uses,
                       `vit.explicit_attention`) against the fused `scaled_dot_product_attention`
    --compare optimizer  each model's AdamW on PyTorch's fused kernel (what every training uses,
                       `recipe.make_optimizer`) against its default CPU path (one tensor at a time)

Every arm but the fused one of --compare attention trains as the pipeline does on a CPU: explicit attention.

An AVX2-only CPU's training path can be approximated on an AVX-512 one: `--precision no` (fp32, what
`train.precision: auto` chooses there) with `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2` in the
environment (PyTorch's and oneDNN's kernels limited to AVX2). Ratios between arms carry over; milliseconds
do not (another core, clock and memory).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from slimvit import models, vit
from slimvit.config import DistillConfig
from slimvit.distill import make_loss
from slimvit.recipe import autocast_context, make_optimizer, resolve_precision
from slimvit.timing import cpu_name

CLASSES = [str(i) for i in range(6)]
DEVICE = torch.device("cpu")
STUDENT, TEACHER = ("vit_tiny_patch16_224", "conv"), ("resnet18", "patch")


def build(name_stem: tuple[str, str], size: int) -> torch.nn.Module:
    name, stem = name_stem
    model = models.build(models.make_spec(name, len(CLASSES), CLASSES, size, stem))
    return model.to(memory_format=torch.channels_last)


def make_step(
    model: torch.nn.Module,
    size: int,
    batch: int,
    precision: str,
    teacher=None,
    compiled: bool = False,
    fused_attention: bool = False,
    fused_adamw: bool = True,
) -> Callable[[], float]:
    """A closure that runs one training step of `model` on a fixed random batch and returns its milliseconds."""
    model.train()
    opt = make_optimizer(model, 1e-4, 0.05, fused=fused_adamw)
    loss_fn = make_loss(DistillConfig(loss="soft"), 0.1)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, len(CLASSES), (batch,))
    cached = torch.randn(batch, len(CLASSES))
    forward = torch.compile(model) if compiled else model

    def step() -> float:
        t0 = time.perf_counter()
        # as `train.fit` trains on a CPU, unless the fused arm of --compare attention
        with vit.explicit_attention(model, on=not fused_attention), autocast_context(precision, DEVICE):
            out = forward(x)
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(x)
            else:
                t_logits = cached
            loss = loss_fn(out, t_logits, y)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return (time.perf_counter() - t0) * 1e3

    return step


def time_interleaved(arms: dict[str, Callable[[], float]], steps: int) -> dict[str, float]:
    """Median ms per step of each arm; 3 untimed steps each first (a compiled arm compiles there)."""
    for name, step in arms.items():
        t0 = time.perf_counter()
        for _ in range(3):
            step()
        print(f"  {name}: first 3 steps {time.perf_counter() - t0:.1f} s", flush=True)
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(steps):
        for name, step in arms.items():
            times[name].append(step())
    return {k: float(np.median(v)) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--compare",
        choices=("logits", "size", "compile", "precision", "attention", "optimizer"),
        default="logits",
    )
    ap.add_argument("--steps", type=int, default=10, help="timed steps per arm (after 3 untimed)")
    ap.add_argument(
        "--size",
        type=int,
        default=96,
        help="image size of --compare logits, compile, precision and optimizer",
    )
    ap.add_argument("--sizes", default="128,96", help="image sizes of --compare size")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--precision", default="auto", choices=("auto", "no", "bf16"), help="autocast, as `train.precision`"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    precision = resolve_precision(args.precision, DEVICE)
    isa = torch.backends.cpu.get_cpu_capability()
    print(
        f"{cpu_name()} (kernels: {isa}), {args.threads} threads, autocast {precision}, batch {args.batch}",
        flush=True,
    )
    if args.compare == "attention":
        groups = {
            f"student at {args.size} px": {
                f"explicit ({p})" if not fused else f"fused ({p})": make_step(
                    build(STUDENT, args.size), args.size, args.batch, p, fused_attention=fused
                )
                for p in ("no", "bf16")
                for fused in (True, False)
            }
        }
    elif args.compare == "logits":
        teacher = build(TEACHER, args.size).eval()
        groups = {
            f"student at {args.size} px": {
                "live teacher": make_step(
                    build(STUDENT, args.size), args.size, args.batch, precision, teacher
                ),
                "cached logits": make_step(build(STUDENT, args.size), args.size, args.batch, precision),
            }
        }
    else:
        groups = {}
        for what, name_stem in (("student", STUDENT), ("teacher", TEACHER)):
            if args.compare == "size":
                sizes = [int(s) for s in args.sizes.split(",")]
                arms = {f"{s} px": make_step(build(name_stem, s), s, args.batch, precision) for s in sizes}
            elif args.compare == "optimizer":
                arms = {
                    name: make_step(
                        build(name_stem, args.size), args.size, args.batch, precision, fused_adamw=f
                    )
                    for name, f in (("AdamW, default CPU path", False), ("AdamW, fused", True))
                }
            elif args.compare == "precision":
                arms = {
                    p: make_step(build(name_stem, args.size), args.size, args.batch, p)
                    for p in ("no", "bf16")
                }
            else:
                arms = {
                    mode: make_step(build(name_stem, args.size), args.size, args.batch, precision, compiled=c)
                    for mode, c in (("eager", False), ("torch.compile", True))
                }
            groups[f"{what} ({name_stem[0]})" + (f" at {args.size} px" if args.compare != "size" else "")] = (
                arms
            )
    for title, arms in groups.items():
        print(title, flush=True)
        ms = time_interleaved(arms, args.steps)
        first = next(iter(ms.values()))
        for name, t in ms.items():
            print(f"  {name}: {t:.0f} ms/step ({t / first:.2f}x)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
