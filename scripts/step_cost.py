"""What one distillation training step costs with the teacher run live against cached teacher logits.

    python scripts/step_cost.py [--steps 12] [--size 128] [--batch 64]

Builds the default recipe's ViT-Ti student (conv stem) and ResNet-18 teacher with random weights, and
times training steps (forward, soft-KD loss, backward, AdamW) in interleaved rounds: the teacher run on
the batch (`distill.teacher_logits: live`) or its logits read from memory (`cached`). Prints the median
milliseconds per step of each and their ratio, with the CPU and the autocast precision it used.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from slimvit import models
from slimvit.config import DistillConfig
from slimvit.distill import make_loss
from slimvit.timing import cpu_name
from slimvit.train import autocast_context, resolve_precision


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per mode (after 3 untimed)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    classes = [str(i) for i in range(6)]
    device = torch.device("cpu")
    precision = resolve_precision("auto", device)
    student = models.build(models.make_spec("vit_tiny_patch16_224", 6, classes, args.size, "conv"))
    teacher = models.build(models.make_spec("resnet18", 6, classes, args.size)).eval()
    student = student.to(memory_format=torch.channels_last).train()
    teacher = teacher.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    loss_fn = make_loss(DistillConfig(loss="soft"), 0.1)
    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 6, (args.batch,))
    cached = torch.randn(args.batch, 6)

    def step(live: bool) -> float:
        t0 = time.perf_counter()
        with autocast_context(precision, device):
            out = student(x)
            if live:
                with torch.no_grad():
                    t_logits = teacher(x)
            else:
                t_logits = cached
            loss = loss_fn(out, t_logits, y)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return (time.perf_counter() - t0) * 1e3

    for _ in range(3):
        step(True), step(False)
    times = {"live": [], "cached": []}
    for _ in range(args.steps):  # interleaved: a slow spell of the machine falls on both
        times["live"].append(step(True))
        times["cached"].append(step(False))
    live, cached_ms = np.median(times["live"]), np.median(times["cached"])
    print(f"{cpu_name()}, {args.threads} threads, autocast {precision}, batch {args.batch} at {args.size} px")
    print(f"live teacher:   {live:.0f} ms/step")
    print(f"cached logits:  {cached_ms:.0f} ms/step  ({cached_ms / live:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
