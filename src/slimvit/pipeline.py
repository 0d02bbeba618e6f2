"""Runs the stages in order, records them in `manifest.json`, and skips what is done.

A stage is done when the manifest says so and its outputs exist. A stage that a single command
(`slimvit teacher`, ...) finished before `slimvit run` is adopted when its outputs are complete.
A stage that failed or was interrupted is resumed on the next call (training stages continue
from their last epoch checkpoint). `--force STAGE` redoes that stage and every stage after it.
"""

from __future__ import annotations

import logging
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from slimvit.errors import ConfigError, SlimvitError
from slimvit.io import atomic_write_json, is_main_process, read_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    name: str
    outputs: tuple[str, ...]
    """Files (relative to the run folder) whose presence means the stage finished."""
    folders: tuple[str, ...] = ()
    """Folders the stage owns; removed when the stage is forced."""
    trains: bool = False
    """Training stage: resumable from its last epoch checkpoint."""


STAGES: tuple[Stage, ...] = (
    Stage("data", ("split.json", "data.json")),
    Stage("teacher", ("teacher/train.json", "teacher/eval.json"), ("teacher",), trains=True),
    Stage("distill", ("student/train.json", "student/eval.json"), ("student",), trains=True),
    Stage("ablation", ("student_nokd/train.json", "student_nokd/eval.json"), ("student_nokd",), trains=True),
    Stage("prune", ("pruned/prune.json", "pruned/eval.json"), ("pruned",), trains=True),
    Stage("sweep", ("prune_sweep.json",), ("sweep",)),
    Stage("export", ("onnx/export.json",)),
    Stage("quantize", ("onnx/quantize.json",)),
    Stage("bench", ("bench.json", "deploy/model.onnx")),
    Stage("report", ("REPORT.md",)),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
SIDE_STAGES = {"ablation": ("report",), "sweep": ("report",)}
"""Stages whose outputs only the report reads (no later model is built from them)."""


def redo_from(name: str) -> list[Stage]:
    """`name` and every stage that uses its outputs: what must be redone when `name` is redone."""
    later = STAGES[STAGE_NAMES.index(name) + 1 :]
    if name in SIDE_STAGES:
        later = tuple(s for s in later if s.name in SIDE_STAGES[name])
    return [STAGES[STAGE_NAMES.index(name)], *later]


def _run_data(cfg, run_dir: Path, data, **_):
    from slimvit.data import describe

    info = describe(data)
    if is_main_process():
        atomic_write_json(run_dir / "data.json", info)
    return {"images": info["images"], "split": info["split"]}


def _run_teacher(cfg, run_dir, data, resume=False, **_):
    from slimvit.train import run_teacher

    return run_teacher(cfg, run_dir, data, resume=resume)


def _run_distill(cfg, run_dir, data, resume=False, **_):
    from slimvit.distill import run_distill

    return run_distill(cfg, run_dir, data, resume=resume)


def _run_ablation(cfg, run_dir, data, resume=False, **_):
    from slimvit.distill import run_ablation

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


def _run_report(cfg, run_dir, data, **_):
    from slimvit.report import run_report

    return run_report(cfg, run_dir, data=data)


RUNNERS: dict[str, Callable] = {
    "data": _run_data,
    "teacher": _run_teacher,
    "distill": _run_distill,
    "ablation": _run_ablation,
    "prune": _run_prune,
    "sweep": _run_sweep,
    "export": _run_export,
    "quantize": _run_quantize,
    "bench": _run_bench,
    "report": _run_report,
}


class Manifest:
    """`manifest.json`: per stage its status, times, inputs/outputs and result summary."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "manifest.json"
        self.run_dir = run_dir
        self.data = read_json(self.path) if self.path.exists() else {"stages": {}}

    def entry(self, name: str) -> dict:
        return self.data["stages"].setdefault(name, {})

    def save(self) -> None:
        if is_main_process():
            atomic_write_json(self.path, self.data)

    def outputs_exist(self, stage: Stage) -> bool:
        return all((self.run_dir / o).exists() for o in stage.outputs)

    def is_done(self, stage: Stage) -> bool:
        return self.outputs_exist(stage) and self.entry(stage.name).get("status", "done") == "done"

    def reset(self, stage: Stage) -> None:
        for o in stage.outputs:
            (self.run_dir / o).unlink(missing_ok=True)
        for f in stage.folders:
            shutil.rmtree(self.run_dir / f, ignore_errors=True)
        self.data["stages"].pop(stage.name, None)


def enabled_stages(cfg) -> list[Stage]:
    out = []
    for s in STAGES:
        if s.name == "ablation" and (not cfg.distill.ablation or cfg.distill.loss == "none"):
            continue
        if s.name == "sweep" and not cfg.prune.sweep:
            continue
        out.append(s)
    return out


def _format_seconds(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def execute(stage: Stage, cfg, run_dir: Path, data, manifest: Manifest, resume, **options) -> dict:
    """Run one stage and record it; a failure is recorded before the error propagates."""
    entry = manifest.entry(stage.name)
    entry.update(status="running", started=time.strftime("%Y-%m-%d %H:%M:%S"))
    entry.pop("error", None)
    manifest.save()
    t0 = time.perf_counter()
    try:
        result = RUNNERS[stage.name](cfg, run_dir, data, resume=resume, **options)
    except BaseException as e:
        entry.update(
            status=_failed_status(e),
            seconds=entry.get("seconds", 0.0) + time.perf_counter() - t0,
            error=_error_text(e),
        )
        manifest.save()
        raise
    entry.update(
        status="done",
        seconds=entry.get("seconds", 0.0) + time.perf_counter() - t0,
        finished=time.strftime("%Y-%m-%d %H:%M:%S"),
        outputs=list(stage.outputs),
        result=_jsonable(result),
    )
    manifest.save()
    return result


def _failed_status(e: BaseException) -> str:
    return "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"


def _error_text(e: BaseException) -> str:
    return str(e) if isinstance(e, SlimvitError) else traceback.format_exception_only(e)[-1].strip()


def load_data_for(stage: str, cfg, run_dir: Path, manifest: Manifest):
    """Decode the dataset for `stage`; a failure is recorded in the manifest against that stage."""
    from slimvit.data import load_data

    try:
        return load_data(cfg.data, run_dir)
    except BaseException as e:
        entry = manifest.entry(stage)
        for stale in ("started", "finished", "result", "outputs"):
            entry.pop(stale, None)
        entry.update(status=_failed_status(e), error=f"loading the dataset: {_error_text(e)}")
        manifest.save()
        raise


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def run_pipeline(cfg, run_dir: Path, force: str | None = None) -> int:
    """Every enabled stage in order; finished stages are skipped, a failed one is resumed."""
    run_dir = Path(run_dir)
    stages = enabled_stages(cfg)
    names = [s.name for s in stages]
    if force is not None and force not in names:
        raise ConfigError(
            f"--force {force}: unknown or disabled stage; stages of this run: {', '.join(names)}"
        )
    manifest = Manifest(run_dir)
    if force is not None:
        for s in stages[names.index(force) :]:
            manifest.reset(s)
        manifest.save()
    t_start = time.perf_counter()
    data = None  # decoded only if some stage still has to run
    for i, stage in enumerate(stages, 1):
        if manifest.is_done(stage):
            log.info("[%d/%d] %s: done, skipped", i, len(stages), stage.name)
            entry = manifest.entry(stage.name)
            entry.setdefault("status", "done")
            continue
        resume = "auto" if stage.trains else False
        if data is None:
            t0 = time.perf_counter()
            data = load_data_for(stage.name, cfg, run_dir, manifest)
            # Decoding the images belongs to no stage but is part of the pipeline's time.
            manifest.data["decode_seconds"] = (
                manifest.data.get("decode_seconds", 0.0) + time.perf_counter() - t0
            )
        log.info(
            "[%d/%d] %s: running (elapsed %s)",
            i,
            len(stages),
            stage.name,
            _format_seconds(time.perf_counter() - t_start),
        )
        execute(stage, cfg, run_dir, data, manifest, resume)
        log.info(
            "[%d/%d] %s: done in %s",
            i,
            len(stages),
            stage.name,
            _format_seconds(manifest.entry(stage.name)["seconds"]),
        )
    manifest.data["total_seconds"] = manifest.data.get("decode_seconds", 0.0) + sum(
        manifest.entry(s.name).get("seconds", 0.0) for s in stages
    )
    manifest.save()
    log.info("pipeline finished; report: %s", run_dir / "REPORT.md")
    return 0


def run_single(name: str, cfg, run_dir: Path, args) -> int:
    """`slimvit <stage>`: run one stage (recorded in the manifest like `slimvit run` does)."""
    stage_name = name
    options: dict = {}
    if name == "prune" and getattr(args, "sweep", None):
        try:
            ratios = tuple(float(r) for r in args.sweep.split(","))
        except ValueError:
            raise ConfigError(
                f"--sweep '{args.sweep}' must be comma-separated ratios like 0.1,0.2,0.3,0.5"
            ) from None
        from slimvit.config import PruneConfig

        PruneConfig(sweep=ratios)  # validates each ratio
        stage_name, options = "sweep", {"ratios": ratios}
    stages = [s for s in STAGES if s.name == stage_name]
    manifest = Manifest(run_dir)
    run_list = stages
    if name == "distill" and cfg.distill.ablation and cfg.distill.loss != "none":
        run_list = stages + [s for s in STAGES if s.name == "ablation"]
    needs = STAGES[0].name if not manifest.is_done(STAGES[0]) else stage_name
    data = load_data_for(needs, cfg, run_dir, manifest)
    if not manifest.is_done(STAGES[0]):
        execute(STAGES[0], cfg, run_dir, data, manifest, False)
    if getattr(args, "force", False) is True:
        for stage in redo_from(stage_name):  # later stages were built from the old outputs
            manifest.reset(stage)
        manifest.save()
    for stage in run_list:
        resume = bool(getattr(args, "resume", False))
        if manifest.is_done(stage) and stage.name != "sweep":
            log.info("%s: already done (outputs in %s); use --force to redo", stage.name, run_dir)
            continue
        execute(stage, cfg, run_dir, data, manifest, resume, **options)
    return 0
