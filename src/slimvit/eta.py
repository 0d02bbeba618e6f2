"""How long the rest of a pipeline will take, measured on this machine: a time a person can plan with.

Before the first stage, training steps of each model to be trained (and teacher forwards, for the
distilling stages) are timed here at the run's batch size, image size and precision (the median of
three, after one untimed: single steps of one model varied up to 2x between runs here); each
training stage's estimate is then epochs x steps per epoch x that time (an epoch on smaller images,
`train.resize_from`, at its share of a full one; a pruning fine-tune's own model at its share of the
student's computation, `compute_share`). As stages finish, the ratio of measured to estimated time
corrects the estimates of the training stages still to come. The other stages (export, quantize,
bench, report) are estimated from their last run in this folder, when there was one.
"""

from __future__ import annotations

import logging
import math
import time

from slimvit.layout import ABLATION, CHECKPOINT, EVAL, METRICS, PRUNE, PRUNED, STUDENT, TEACHER, sweep_dir
from slimvit.spec import ModelSpec

log = logging.getLogger(__name__)


def _time_steps(model, x, y, precision: str, train: bool, steps: int) -> float:
    """Median seconds per call, after one untimed call (allocation, kernel selection)."""
    import torch

    from slimvit import vit
    from slimvit.recipe import autocast_context, explicit_attention_on, make_optimizer

    opt = make_optimizer(model, 1e-4, 0.05) if train else None  # the training's optimizer, as it steps
    model.train(train)

    def once() -> None:
        with autocast_context(precision, x.device):
            if not train:
                with torch.no_grad():
                    model(x)
                return
            out = model(x)
            out = out[0] if isinstance(out, (tuple, list)) else out
            loss = torch.nn.functional.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times = []
    with vit.explicit_attention(model, on=train and explicit_attention_on(x.device)):  # as `train.fit` trains
        once()
        for _ in range(steps):
            t0 = time.perf_counter()
            once()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure_step(spec: ModelSpec, tcfg, batch: int, train: bool = True, steps: int = 3) -> float:
    """Seconds of one training step (or one forward, `train=False`) of the model `spec` describes."""
    import torch

    from slimvit import models
    from slimvit.recipe import resolve_precision

    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fmt = torch.channels_last if tcfg.channels_last else torch.contiguous_format
    model = models.build(spec).to(device, memory_format=fmt)
    x = torch.randn(batch, *spec.input_size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, spec.num_classes, (batch,), device=device)
    with torch.random.fork_rng(devices=[]):  # leave the training's RNG streams alone
        return _time_steps(model, x, y, resolve_precision(tcfg.precision, device), train, steps)


def model_depth(spec: ModelSpec) -> int | None:
    """Transformer blocks of the model `spec` describes (None for a model without `blocks`). Built on the meta
    device: no weights are made or initialised (1.6 s for the ViT-Ti student on a 2-core CPU, 0.2 s so)."""
    import torch

    from slimvit import models

    with torch.device("meta"):
        blocks = getattr(models.build(spec), "blocks", None)
    return len(blocks) if blocks is not None else None


def compute_share(ratio: float, depth: int | None, full_depth: int | None, prune_embed: bool = True) -> float:
    """A pruned model's training step as a share of its unpruned student's: pruning `ratio` of the channels
    on both sides of each matrix (`prune_embed`) leaves (1 - ratio)^2 of its multiply-adds, on one side
    (1 - ratio); a cut to `depth` of `full_depth` blocks leaves depth / full_depth of what remains. With
    the student's own forward added (a fine-tune distils from it), NEU-DET's five sweep fine-tunes come
    to 3.1 student epochs a sweep epoch against 2.5 measured (AVX2 EPYC; 6.7 when each was priced as the
    student)."""
    share = (1 - ratio) ** 2 if prune_embed else 1 - ratio
    if depth is not None and full_depth:
        share *= min(depth, full_depth) / full_depth
    return share


class Estimate:
    """Seconds each stage still to run should take; `line()` says it in one line."""

    TRAINING = ("teacher", "distill", "ablation", "prune", "sweep")

    FOLDERS = {"teacher": TEACHER, "distill": STUDENT, "ablation": ABLATION, "prune": PRUNED}
    """The folder each training stage checkpoints into: a resumed stage counts the epochs already done."""

    def __init__(
        self,
        cfg,
        data,
        to_run: list[str],
        previous: dict[str, float],
        run_dir=None,
        keeps: set[str] | None = None,
    ) -> None:
        """`run_dir`: where a stage of `keeps` (all, where None) left work it resumes from (a training's epoch
        checkpoint, the sweep's finished points); a stage that starts over is counted whole."""
        from slimvit.recipe import floor_epochs, full_size_epochs, n_views
        from slimvit.selection import FIDELITY_VIEWS

        self.seconds: dict[str, float | None] = {}
        self.factor = 1.0
        t, d, p = cfg.train, cfg.distill, cfg.prune
        n_train, n_val = len(data.split["train"]), len(data.split["val"])
        batch = min(t.batch_size, max(1, n_train))
        steps = max(1, n_train // batch)
        trains = [s for s in to_run if s in self.TRAINING]
        rates = self._measure(cfg, data, trains, batch) if trains else {}
        val_batches = math.ceil(n_val / 256) * 256 / batch  # validation runs 256 at a time
        # a fine-tune also compares itself with the student on every flip/rotation of the validation images
        views = min(FIDELITY_VIEWS, n_views(t.flips, t.rot90))
        fid_batches = math.ceil(n_val * views / 256) * 256 / batch if p.recover else 0.0
        self.resumed: dict[str, int] = {}

        def epochs_of(
            n_epochs: int, step: float, fwd: float, resize: bool = False, done: int = 0, fid: bool = False
        ) -> float:
            # as many epochs as training will run: a small split gets more (train.steps_floor_images);
            # the teacher's and the student's early epochs may train on smaller images (train.resize_from);
            # a resumed training has `done` of them behind it. A fine-tune is estimated at its cap.
            n = floor_epochs(n_epochs, t, n_train)
            done = min(done, n)
            train_epochs = full_size_epochs(n, cfg.data.img_size, t, start=done) if resize else n - done
            per_val = val_batches + (fid_batches + 1 if fid else 0)  # +1: the student's own views, once
            return train_epochs * steps * step + (n - done) * per_val * fwd

        t_fwd = rates.get("teacher_fwd", 0.0) if d.loss != "none" else 0.0
        ft_fwd = rates.get("student_fwd", 0.0) if d.loss != "none" and p.teacher == "student" else t_fwd
        # cached logits (train._teacher_targets): the teacher runs once over every view of every training
        # image before the student trains, not in its steps
        cached = d.teacher_logits == "cached" and not (t.mixup > 0 or t.cutmix > 0)
        cache_pass = n_views(t.flips, t.rot90) * n_train / batch if cached else 0.0
        for s in to_run:
            kept = run_dir if keeps is None or s in keeps else None
            done = self._epochs_done(kept, s)
            if done:
                self.resumed[s] = done
            if s == "teacher":
                est = epochs_of(
                    t.teacher_epochs, rates["teacher"], rates["teacher"] / 3, resize=True, done=done
                )
            elif s in ("distill", "ablation"):
                teacher = t_fwd if s == "distill" else 0.0
                est = (
                    epochs_of(
                        t.epochs,
                        rates["student"] + (0.0 if cached else teacher),
                        rates["student_fwd"],
                        resize=True,
                        done=done,
                    )
                    + cache_pass * teacher
                )
            elif s == "prune":
                share = compute_share(p.ratio, None, rates["depth"], p.prune_embed)
                # a fine-tune's step: its own model's share of the student's, plus the forward of the model it
                # distils from; with cached logits that forward does not run, but it stands for what a small
                # model's step costs beyond its share (NEU-DET's fine-tunes: 0.2 of a student epoch an epoch;
                # the forward adds 0.3, so the estimate errs long)
                est = epochs_of(
                    p.finetune_epochs,
                    rates["student"] * share + ft_fwd,
                    rates["student_fwd"] * share,
                    done=done,
                    fid=True,
                )
            elif s == "sweep":
                est = sum(
                    epochs_of(
                        p.sweep_epochs,
                        rates["student"] * share + ft_fwd,
                        rates["student_fwd"] * share,
                        fid=True,
                    )
                    for share in (
                        compute_share(ratio, depth, rates["depth"], p.prune_embed)
                        for ratio, depth in self._sweep_points(kept, cfg)
                    )
                )
            else:
                est = previous.get(s)
            self.seconds[s] = est

    @classmethod
    def _epochs_done(cls, run_dir, stage: str) -> int:
        """Epochs a stage's checkpoint already holds (it resumes from there), 0 without one."""
        from pathlib import Path

        folder = cls.FOLDERS.get(stage)
        if run_dir is None or folder is None or not (Path(run_dir) / folder / CHECKPOINT).exists():
            return 0
        try:
            lines = (Path(run_dir) / folder / METRICS).read_text().splitlines()
        except OSError:
            return 0
        return sum(1 for line in lines if line.strip())

    @staticmethod
    def _sweep_points(run_dir, cfg) -> list[tuple[float, int | None]]:
        """Sweep points still to fine-tune, (ratio, depth or None): each ratio and each ratio cut to each
        depth, less the main pruned model (it stands for its own ratio) and the points a previous run
        finished (kept, not redone)."""
        from pathlib import Path

        p = cfg.prune
        chain = p.sweep_from == "previous"
        points = [
            (r, d)
            for r in sorted(set(p.sweep))
            for d in (None, *sorted(set(p.depths)))
            if not (d is None and chain and abs(r - p.ratio) < 1e-9)
        ]
        if run_dir is None:
            return points
        return [
            (r, d)
            for r, d in points
            if not all((Path(run_dir) / sweep_dir(r, d) / f).exists() for f in (PRUNE, EVAL))
        ]

    @staticmethod
    def _measure(cfg, data, trains: list[str], batch: int) -> dict[str, float]:
        """Step times of the models to train; a forward (validation) is taken as a third of a step, the
        teacher's forward in distillation is measured when a stage distils."""
        from slimvit.recipe import role_spec

        t0 = time.perf_counter()
        rates = {}
        teacher_spec = role_spec(cfg, "teacher", data)[0]
        if "teacher" in trains:
            rates["teacher"] = measure_step(teacher_spec, cfg.train, batch)
            rates["teacher_fwd"] = rates["teacher"] / 3
        if set(trains) - {"teacher"}:
            student_spec = role_spec(cfg, "student", data)[0]
            rates["student"] = measure_step(student_spec, cfg.train, batch)
            rates["depth"] = model_depth(student_spec)
            rates["student_fwd"] = rates["student"] / 3
            fine_tunes_from_teacher = cfg.prune.teacher == "teacher" and set(trains) & {"prune", "sweep"}
            if cfg.distill.loss != "none" and ("distill" in trains or fine_tunes_from_teacher):
                rates["teacher_fwd"] = measure_step(teacher_spec, cfg.train, batch, train=False)
        log.debug("eta: step times %s measured in %.1fs", rates, time.perf_counter() - t0)
        return rates

    def finished(self, stage: str, seconds: float) -> None:
        """A stage took `seconds`: correct the estimates of the training stages still to come."""
        est = self.seconds.pop(stage, None)
        if stage in self.TRAINING and est:
            self.factor = seconds / est

    def _resumed_at(self, stage: str) -> str:
        done = self.resumed.get(stage)
        return f" from epoch {done + 1}" if done else ""

    def line(self, parts: bool = True) -> str:
        """'about 31m to go (teacher 4m50s, distill 10m12s, ...; plus export, bench, not timed in this run folder
        yet)': a stage other than training is estimated from its last run in this folder."""
        known = {s: v * (self.factor if s in self.TRAINING else 1.0) for s, v in self.seconds.items() if v}
        unknown = [s for s, v in self.seconds.items() if not v]
        if not known:
            return f"time to go not estimated: {', '.join(unknown)} not timed in this run folder yet"
        text = f"about {fmt_duration(sum(known.values()))} to go"
        if not parts:
            return text + (f" + {', '.join(unknown)}" if unknown else "")
        text += " (" + ", ".join(f"{s} {fmt_duration(v)}{self._resumed_at(s)}" for s, v in known.items())
        if unknown:
            text += f"; plus {', '.join(unknown)}, not timed in this run folder yet"
        return text + ")"


def fmt_duration(seconds: float) -> str:
    """'1h02m' or '1m05s': minutes are what a person plans with, seconds only under an hour."""
    m = int(round(seconds)) // 60
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{int(round(seconds)) % 60:02d}s"
