"""The stages, declared once: what each reads, what it writes, its CLI command and the function that runs it.

Each entry of `STAGES` says what a stage reads (run-folder files of earlier stages, the dataset
itself, config keys), what it writes, its CLI command and the function that runs it, as DVC's
`dvc.yaml` does. The CLI, `slimvit run` (pipeline.py), `--force`, the config-change check (runs.py)
and the staleness check (manifest.py) all read that one declaration; every path in it comes from
layout.py. No stage writes a file another stage writes (tests/test_stages.py checks it).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimvit.io import atomic_write_json, is_main_process
from slimvit.layout import (
    ABLATION,
    BENCH,
    BENCH_TABLE,
    DATA,
    DEPLOY,
    DEPLOYED,
    DEPLOYED_MODEL,
    EVAL,
    EXPORT,
    LOCALISATION,
    LOGITS,
    METRICS,
    ONNX_ANY,
    PRUNE,
    PRUNED,
    QUANTIZE,
    REPORT,
    SPEC,
    SPLIT,
    STUDENT,
    SWEEP,
    SWEEP_MODELS,
    SWEEP_SUMMARY,
    SWEEP_TABLE,
    TEACHER,
    TRAIN,
    in_dir,
    model_files,
    model_glob,
    onnx_file,
    plot,
)

# --------------------------------------------------------------------------- run functions


def _run_data(cfg, run_dir: Path, data, **_):
    from slimvit.data import describe

    info = describe(data)
    if is_main_process():
        atomic_write_json(run_dir / DATA, info)
    return {"images": info["images"], "split": info["split"]}


def _run_teacher(cfg, run_dir, data, resume=False, **_):
    from slimvit.train import run_teacher

    return run_teacher(cfg, run_dir, data, resume=resume)


def _run_distill(cfg, run_dir, data, resume=False, **_):
    from slimvit.train import run_distill

    return run_distill(cfg, run_dir, data, resume=resume)


def _run_ablation(cfg, run_dir, data, resume=False, **_):
    from slimvit.train import run_ablation

    return run_ablation(cfg, run_dir, data, resume=resume)


def _run_prune(cfg, run_dir, data, resume=False, **_):
    from slimvit.prune import run_prune

    return run_prune(cfg, run_dir, data=data, resume=resume)


def _run_sweep(cfg, run_dir, data, ratios=None, **_):
    from slimvit.prune import run_sweep

    return {"points": run_sweep(cfg, run_dir, ratios or cfg.prune.sweep, data=data)}


def _run_export(cfg, run_dir, data, **_):
    from slimvit.export import run_export

    return run_export(cfg, run_dir, data=data)


def _run_quantize(cfg, run_dir, data, **_):
    from slimvit.quantize import run_quantize

    return run_quantize(cfg, run_dir, data=data)


def _run_bench(cfg, run_dir, data, **_):
    from slimvit.bench import run_bench

    return run_bench(cfg, run_dir, data=data)


def _run_deploy(cfg, run_dir, data, **_):
    from slimvit.deploy import run_deploy

    return run_deploy(cfg, run_dir, strict=False)


def _run_report(cfg, run_dir, data, **_):
    from slimvit.report import run_report

    return run_report(cfg, run_dir, data=data)


# --------------------------------------------------------------------------- the declaration


def _always(cfg) -> bool:
    return True


def ablation_enabled(cfg) -> bool:
    return bool(cfg.distill.ablation) and cfg.distill.loss != "none"


def _sweep_enabled(cfg) -> bool:
    return bool(cfg.prune.sweep)


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    run: Callable[..., dict]
    """(cfg, run_dir, data, resume=..., **options) -> a small summary for the manifest."""
    outputs: tuple[str, ...]
    """Files whose presence means the stage finished (it writes them last)."""
    artifacts: tuple[str, ...] = ()
    """Its other files that later stages or the user read (glob patterns, may be absent)."""
    folders: tuple[str, ...] = ()
    """Folders it owns (checkpoints, per-item results): removed when the stage is redone."""
    reads: tuple[str, ...] = ()
    """Run-folder files of earlier stages it reads (glob patterns); `?` marks one it can do without."""
    params: tuple[str, ...] = ()
    """Config keys it depends on: `section.key`, a prefix (`train.`, `model.teacher`); `-key` leaves one out."""
    dataset: bool = False
    """Reads the dataset folder itself (the other stages see it through split.json)."""
    trains: bool = False
    """A training stage: resumable from its epoch checkpoint."""
    command: str = ""
    """The CLI subcommand that runs it (default: its name)."""
    flags: tuple[str, ...] | None = ("force",)
    """Options of its subcommand (`force`, `resume`, `sweep`); None: the CLI builds that subcommand itself."""
    enabled: Callable[[Any], bool] = _always
    """Whether the config includes the stage at all."""
    rerun_keys: tuple[str, ...] = ()
    """Config keys whose change re-runs the stage keeping its folders (their per-item results are reused)."""
    extra: tuple[str, ...] = field(default=(), repr=False)
    """Subcommand options that select this stage instead of `command`'s own (`--sweep` for the sweep)."""
    needs_data: bool = True
    """Decodes the dataset (the deploy stage reads only bench.json and the ONNX files)."""
    replaced: bool = False
    """Its outputs are what a user serves or reads (deploy/, REPORT.md): a reset leaves them in place, and
    the stage replaces them whole when it runs again (deploy/ in one swap), so `slimvit predict` keeps
    working while a rerun trains."""

    @property
    def cli(self) -> str:
        """The command a user types to run it."""
        return "slimvit " + " ".join([self.command or self.name, *(f"--{x}" for x in self.extra)])

    @property
    def writes(self) -> tuple[str, ...]:
        return self.outputs + self.artifacts

    def depends_on(self, key: str) -> bool:
        """Whether config key `section.key` is one of its inputs."""
        include = [p for p in self.params if not p.startswith("-")]
        exclude = [p[1:] for p in self.params if p.startswith("-")]
        return any(key.startswith(p) for p in include) and not any(key.startswith(p) for p in exclude)


_TRAIN = (
    "train.",
    "-train.epochs",
    "-train.lr",
    "-train.teacher_epochs",
    "-train.teacher_lr",
    "-train.resize_",  # the fine-tunes train at full size
    "-train.select_from",  # nor do they read it (prune.recover)
)
_STUDENT_TRAIN = ("data.img_size", "model.student", "train.", "-train.teacher_epochs", "-train.teacher_lr")
_KD = ("distill.", "-distill.ablation")


def _optional(path: str) -> str:
    """A read the stage can do without (the `?` of `Stage.reads`)."""
    return "?" + path


def _finished(folder: str) -> tuple[str, ...]:
    """A trained model's summary and test metrics: written last, so their presence means it finished."""
    return in_dir(folder, TRAIN), in_dir(folder, EVAL)


def _trained(folder: str) -> tuple[str, ...]:
    return (*model_files(folder), in_dir(folder, METRICS))


STAGES: tuple[Stage, ...] = (
    Stage(
        "data",
        "check the dataset: classes, counts, image sizes, the split",
        _run_data,
        outputs=(SPLIT, DATA),
        params=("data.split", "data.seed"),
        dataset=True,
    ),
    Stage(
        "teacher",
        "train the teacher",
        _run_teacher,
        outputs=_finished(TEACHER),
        artifacts=_trained(TEACHER),
        folders=(TEACHER,),
        reads=(SPLIT,),
        params=(
            "data.img_size",
            "model.teacher",
            "train.",
            "-train.epochs",
            "-train.lr",
            "-train.select_from",
        ),
        trains=True,
        flags=("resume", "force"),
    ),
    Stage(
        "distill",
        "train the student from the teacher (and, with distill.ablation=true, the same student without)",
        _run_distill,
        outputs=_finished(STUDENT),
        artifacts=_trained(STUDENT),
        folders=(STUDENT,),
        reads=(SPLIT, *model_files(TEACHER)),
        params=(*_STUDENT_TRAIN, *_KD),
        trains=True,
        flags=("resume", "force"),
    ),
    Stage(
        "ablation",
        "the student trained without distillation, for comparison",
        _run_ablation,
        outputs=_finished(ABLATION),
        artifacts=_trained(ABLATION),
        folders=(ABLATION,),
        reads=(SPLIT,),
        params=_STUDENT_TRAIN,
        trains=True,
        command="distill",
        enabled=ablation_enabled,
    ),
    Stage(
        "prune",
        "structured pruning + fine-tuning (--sweep for several ratios)",
        _run_prune,
        outputs=(in_dir(PRUNED, PRUNE), in_dir(PRUNED, EVAL)),
        artifacts=(*_trained(PRUNED), in_dir(PRUNED, TRAIN)),
        folders=(PRUNED,),
        reads=(SPLIT, *model_files(STUDENT), in_dir(STUDENT, TRAIN), *model_files(TEACHER)),
        params=("data.img_size", "prune.", "-prune.sweep", "-prune.depths", *_TRAIN, *_KD),
        trains=True,
        flags=("resume", "sweep", "force"),
    ),
    Stage(
        "sweep",
        "prune + fine-tune at each ratio of prune.sweep",
        _run_sweep,
        outputs=(SWEEP_SUMMARY,),
        artifacts=(
            SWEEP_TABLE,
            model_glob(SWEEP_MODELS),
            in_dir(SWEEP_MODELS, PRUNE),
            in_dir(SWEEP_MODELS, EVAL),
        ),
        folders=(SWEEP,),
        reads=(
            SPLIT,
            *model_files(STUDENT),
            in_dir(STUDENT, TRAIN),
            _optional(in_dir(STUDENT, EVAL)),
            *model_files(TEACHER),
            _optional(model_glob(PRUNED)),  # iterative sweeps start the ratios above the main one from it
            _optional(in_dir(PRUNED, PRUNE)),
        ),
        params=("data.img_size", "prune.", "-prune.finetune_epochs", *_TRAIN, *_KD),
        command="prune",
        extra=("sweep",),
        enabled=_sweep_enabled,
        rerun_keys=("prune.sweep", "prune.depths"),
    ),
    Stage(
        "export",
        "export the teacher, the student and the pruned models to ONNX with a parity check",
        _run_export,
        outputs=(EXPORT,),
        artifacts=(onnx_file("*", "fp32"),),
        reads=(
            SPLIT,
            *model_files(TEACHER),
            *model_files(STUDENT),
            *model_files(PRUNED),
            _optional(model_glob(SWEEP_MODELS)),
        ),
        params=("quantize.opset", "quantize.fuse_attention", "quantize.optimize"),
    ),
    Stage(
        "quantize",
        "INT8 dynamic / static / mixed and FP16 variants of the pruned ONNX models",
        _run_quantize,
        outputs=(QUANTIZE,),
        artifacts=(onnx_file("*", "fp16"), onnx_file("*", "int8-*")),
        reads=(
            SPLIT,
            EXPORT,
            onnx_file("*", "fp32"),
            in_dir(PRUNED, SPEC),
            _optional(in_dir(SWEEP_MODELS, SPEC)),
        ),
        params=(
            "quantize.",
            "-quantize.opset",
            "-quantize.fuse_attention",
            "-quantize.optimize",
            "train.seed",  # draws the calibration images
        ),
    ),
    Stage(
        "bench",
        "size, params, MACs, validation and test accuracy and latency of every artifact",
        _run_bench,
        outputs=(BENCH,),
        artifacts=(BENCH_TABLE, LOGITS),
        reads=(
            SPLIT,
            *model_files(TEACHER),
            *model_files(STUDENT),
            *model_files(PRUNED),
            in_dir(PRUNED, PRUNE),
            _optional(model_glob(SWEEP_MODELS)),
            _optional(in_dir(SWEEP_MODELS, PRUNE)),
            EXPORT,
            QUANTIZE,
            ONNX_ANY,
        ),
        params=("bench.",),
    ),
    Stage(
        "deploy",
        "choose the model to deploy for the budgets (validation data only) and write deploy/",
        _run_deploy,
        outputs=(DEPLOYED,),
        artifacts=(DEPLOYED_MODEL,),
        folders=(DEPLOY,),
        reads=(BENCH, ONNX_ANY),
        params=("deploy.",),
        flags=None,  # `slimvit deploy` has budget flags of its own (cli.py)
        needs_data=False,
        replaced=True,
    ),
    Stage(
        "report",
        "write REPORT.md with tables and plots",
        _run_report,
        outputs=(REPORT,),
        artifacts=(plot("*.png"), LOCALISATION),
        reads=(
            BENCH,
            _optional(LOGITS),
            _optional(DEPLOYED),
            _optional(DATA),
            _optional(in_dir("*", TRAIN)),
            _optional(in_dir("*", EVAL)),
            _optional(in_dir("*", METRICS)),
            _optional(in_dir(PRUNED, PRUNE)),
            _optional(SWEEP_SUMMARY),
            _optional(EXPORT),
            _optional(QUANTIZE),
        ),
        params=("",),  # the report quotes the whole config
        needs_data=False,  # it reads the other stages' records, not the images
        replaced=True,
    ),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def get_stage(name: str) -> Stage:
    return STAGES[STAGE_NAMES.index(name)]


def enabled_stages(cfg) -> list[Stage]:
    return [s for s in STAGES if s.enabled(cfg)]


def overlap(a: str, b: str) -> bool:
    """Whether two run-folder path patterns can name the same file."""
    return fnmatch.fnmatchcase(a, b) or fnmatch.fnmatchcase(b, a)


def _reads(stage: Stage, optional: bool = True) -> list[str]:
    return [r.lstrip("?") for r in stage.reads if optional or not r.startswith("?")]


def producers(stage: Stage, required_only: bool = False) -> list[Stage]:
    """The earlier stages whose files `stage` reads, in pipeline order."""
    before = STAGES[: STAGE_NAMES.index(stage.name)]
    reads = _reads(stage, optional=not required_only)
    return [p for p in before if any(overlap(r, w) for r in reads for w in p.writes)]


def dependents(name: str) -> list[Stage]:
    """Every stage that reads what `name` writes, directly or through another stage, in pipeline order."""
    found = {name}
    for s in STAGES[STAGE_NAMES.index(name) + 1 :]:
        if any(p.name in found for p in producers(s)):
            found.add(s.name)
    return [s for s in STAGES if s.name in found and s.name != name]


def redo_from(name: str) -> list[Stage]:
    """`name` and every stage built from its outputs: what must be redone when `name` is redone."""
    return [get_stage(name), *dependents(name)]


def stages_for_keys(keys: list[str]) -> list[Stage]:
    """The stages that depend on any of these config keys (`section.key`), directly, in pipeline order."""
    return [s for s in STAGES if any(s.depends_on(k) for k in keys)]
