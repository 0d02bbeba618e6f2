"""Runs the declared stages (stages.py) in order, records each in `manifest.json`, redoes what is stale.

`slimvit run` brings every enabled stage up to date: a stage that is done and whose inputs and outputs
are as recorded is skipped, a stale one is redone, an unfinished one resumed (manifest.py says which).
`slimvit run --force STAGE` resets STAGE and every stage built from it; `slimvit STAGE --force`
redoes STAGE only, and the fingerprints find its readers stale on the next run.

No stage writes a file another stage writes, and every caller holds the run folder's lock
(runs.lock_run_dir), so temp files found at the start were left by a killed process.
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path

from slimvit.errors import ConfigError, ModelError, SlimvitError, first_line
from slimvit.eta import Estimate
from slimvit.io import is_main_process, read_json, remove_temp_files
from slimvit.layout import BENCH, MANIFEST, REPORT
from slimvit.manifest import DONE, REDO, RERUN, RESUME, RUN, Fingerprints, Manifest, adopt, assess
from slimvit.stages import Stage, ablation_enabled, enabled_stages, get_stage, producers, redo_from

log = logging.getLogger(__name__)


def _format_seconds(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def execute(
    stage: Stage, cfg, run_dir: Path, data, manifest: Manifest, resume, fp: Fingerprints, **options
) -> dict:
    """Run one stage and record it; a failure is recorded before the error propagates."""
    entry = _mark_running(stage, manifest, fp, options)
    t0 = time.perf_counter()
    try:
        result = stage.run(cfg, run_dir, data, resume=resume, **options)
    except BaseException as e:
        entry.update(status=_failed_status(e), seconds=_seconds(entry, t0), error=_error_text(e))
        manifest.save()
        raise
    entry.update(
        status="done",
        seconds=_seconds(entry, t0),
        finished=_now(),
        outputs=fp.outputs(stage),
        result=_jsonable(result),
    )
    manifest.save()
    return result


def _mark_running(stage: Stage, manifest: Manifest, fp: Fingerprints, options: dict) -> dict:
    """The stage's manifest entry with its last outcome cleared and what it reads now recorded, saved
    before it runs: a kill leaves it `running`, and the next call resumes it on the same inputs."""
    entry = manifest.entry(stage.name)
    inputs = fp.inputs(stage, _options_as_config(options))
    for stale in ("error", "outputs", "finished", "result"):
        entry.pop(stale, None)
    entry.update(status="running", started=_now(), inputs=inputs)
    manifest.save()
    return entry


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def _seconds(entry: dict, t0: float) -> float:
    """The stage's time so far: a resumed stage adds this call's to its earlier calls'."""
    return entry.get("seconds", 0.0) + time.perf_counter() - t0


def _options_as_config(options: dict) -> dict:
    """Command-line options that stand in for a config key (`prune --sweep R` for prune.sweep)."""
    return {"prune.sweep": list(options["ratios"])} if options.get("ratios") else {}


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


class _Data:
    """The decoded dataset, loaded the first time a stage needs it."""

    def __init__(self, cfg, run_dir: Path, manifest: Manifest) -> None:
        self.cfg, self.run_dir, self.manifest = cfg, run_dir, manifest
        self.data = None

    def get(self, stage: str):
        if self.data is None:
            t0 = time.perf_counter()
            self.data = load_data_for(stage, self.cfg, self.run_dir, self.manifest)
            # Decoding the images belongs to no stage but is part of the pipeline's time.
            self.manifest.data["decode_seconds"] = (
                self.manifest.data.get("decode_seconds", 0.0) + time.perf_counter() - t0
            )
        return self.data


def _prepare(run_dir: Path, cfg, stages: list[Stage]) -> tuple[Manifest, Fingerprints]:
    """Read the manifest, remove temp files a killed process left (the caller holds the run folder's
    lock, so no live writer owns them), record the inputs of stages that finished without."""
    manifest = Manifest(run_dir)
    if is_main_process():
        for p in remove_temp_files(run_dir):
            log.info("removed %s, left by an interrupted run", p.relative_to(run_dir))
    fp = Fingerprints(run_dir, cfg)
    adopt(stages, manifest, fp)
    return manifest, fp


def _start(stage: Stage, verdict: str, why: str, manifest: Manifest, tag: str) -> bool | str:
    """Log what happens to a stage that has to run, reset it where needed; returns its `resume`."""
    if verdict == REDO:
        log.info("%s%s: redoing it: %s", tag, stage.name, why)
        manifest.reset(stage)
        manifest.save()
        return False
    if verdict == RERUN:
        log.info("%s%s: running it again: %s", tag, stage.name, why)
        return False
    if stage.dataset:  # never resumed: its split is made from the dataset as it is now
        manifest.reset(stage)
        return False
    if verdict == RESUME:
        log.info("%s%s: resuming it (%s)", tag, stage.name, why)
    return "auto" if stage.trains else False


def run_pipeline(cfg, run_dir: Path, force: str | None = None) -> int:
    """Every enabled stage in order; up-to-date stages are skipped, stale ones redone, a failed one resumed."""
    run_dir = Path(run_dir)
    stages = enabled_stages(cfg)
    names = [s.name for s in stages]
    if force is not None and force not in names:
        raise ConfigError(
            f"--force {force}: unknown or disabled stage; stages of this run: {', '.join(names)}"
        )
    manifest, fp = _prepare(run_dir, cfg, stages)
    previous = _previous_seconds(manifest)
    if force is not None:
        for s in redo_from(force):
            manifest.reset(s)
        manifest.save()
    to_run = _plan(stages, manifest, fp)
    t_start = time.perf_counter()
    data = _Data(cfg, run_dir, manifest)
    eta = None
    for i, stage in enumerate(stages, 1):
        tag = f"[{i}/{len(stages)}] "
        verdict, why = assess(stage, manifest, fp)
        if verdict == DONE:
            log.info("%s%s: done, skipped", tag, stage.name)
            continue
        resume = _start(stage, verdict, why, manifest, tag)
        loaded = data.get(stage.name) if stage.needs_data else None
        if eta is None and is_main_process() and loaded is not None:
            keeps = _keeps(stages, manifest, fp, to_run)
            eta = _estimate(
                cfg, loaded, [s.name for s in stages if s.name in to_run], previous, run_dir, keeps
            )
        elapsed = _format_seconds(time.perf_counter() - t_start)
        left = f"; {eta.line(False)}" if eta else ""  # no estimate before a stage that reads the images
        log.info("%s%s: running (elapsed %s%s)", tag, stage.name, elapsed, left)
        t0 = time.perf_counter()
        execute(stage, cfg, run_dir, loaded, manifest, resume, fp)
        if eta is not None:
            eta.finished(stage.name, time.perf_counter() - t0)
        log.info("%s%s: done in %s", tag, stage.name, _format_seconds(manifest.entry(stage.name)["seconds"]))
    manifest.data["total_seconds"] = manifest.data.get("decode_seconds", 0.0) + sum(
        manifest.entry(s.name).get("seconds", 0.0) for s in stages
    )
    manifest.save()
    log.info("pipeline finished; report: %s", run_dir / REPORT)
    return 0


def _previous_seconds(manifest: Manifest) -> dict[str, float]:
    """How long each finished stage took when it last ran here: the estimate of a stage it cannot measure."""
    return {
        n: e["seconds"]
        for n, e in manifest.data["stages"].items()
        if e.get("status") == "done" and "seconds" in e
    }


def _estimate(
    cfg, data, to_run: list[str], previous: dict, run_dir: Path | None = None, keeps: set[str] | None = None
) -> Estimate | None:
    """The time estimate, logged; a failure to make one never stops the pipeline."""
    try:
        eta = Estimate(cfg, data, to_run, previous, run_dir, keeps)
    except Exception as e:
        log.warning("no time estimate: %s", first_line(e))
        return None
    log.info("estimate on this machine: %s", eta.line())
    return eta


def _keeps(stages: list[Stage], manifest: Manifest, fp: Fingerprints, to_run: set[str]) -> set[str]:
    """The stages to run that keep what they finished before (a training's epochs, the sweep's points): those
    resumed or rerun, on inputs no earlier stage of this run will rewrite. The others start over (`_start`
    resets them), however much of their old work lies in the folder."""
    return {
        s.name
        for s in stages
        if s.name in to_run
        and assess(s, manifest, fp)[0] in (RESUME, RERUN)
        and not any(p.name in to_run for p in producers(s))
    }


def _plan(stages: list[Stage], manifest: Manifest, fp: Fingerprints) -> set[str]:
    """The stages that will run: those not up to date, and those that read what one of them writes."""
    out: set[str] = set()
    for s in stages:
        if assess(s, manifest, fp)[0] != DONE or any(p.name in out for p in producers(s)):
            out.add(s.name)
    return out


def _require_upstream(stage: Stage, cfg, manifest: Manifest, fp: Fingerprints) -> None:
    """Refuse, in one line, a stage whose inputs are missing or out of date (naming what to run first).

    Checked: every stage it needs, directly or through another one, and the stages it reads optionally
    (the report reads the sweep if there is one) when they have run.
    """
    needed, todo = set(), [stage]
    while todo:
        for p in producers(todo.pop(), required_only=True):
            if p.name not in needed and p.enabled(cfg):
                needed.add(p.name)
                todo.append(p)
    optional = {p.name for p in producers(stage) if p.enabled(cfg)}
    problems = []
    for s in enabled_stages(cfg):
        if s.name == "data" or s.name not in needed | optional:
            continue
        verdict, why = assess(s, manifest, fp)
        if verdict in (DONE, RERUN) or (s.name not in needed and not manifest.outputs_exist(s)):
            continue
        state = {RUN: "not run yet", RESUME: f"{why}, not finished"}.get(verdict, f"out of date: {why}")
        problems.append((s, state))
    if problems:
        listed = "; ".join(f"{s.name} ({state})" for s, state in problems)
        cmds = ", ".join(dict.fromkeys(f"`{s.cli}`" for s, _ in problems))
        raise ModelError(f"{stage.name} reads the outputs of {listed}; run {cmds} (or `slimvit run`) first")


def run_single(name: str, cfg, run_dir: Path, args, redo_why: str | None = None) -> int:
    """`slimvit <stage>`: bring the data stage up to date, then run one stage (recorded like `slimvit run`).

    A stage that is done and up to date is skipped unless `--force` (or `redo_why`, the reason a caller
    redoes it, logged as such); a stale one is redone (one line says why). Stages that read what it
    writes are not touched: they are redone when next run.
    """
    targets, options = _targets(name, cfg, args)
    run_dir = Path(run_dir)
    manifest, fp = _prepare(run_dir, cfg, enabled_stages(cfg))
    data = _Data(cfg, run_dir, manifest)
    force = getattr(args, "force", False) is True or redo_why is not None
    if targets[0].name != "data":  # every stage reads its split: bring it up to date first
        _update_data_stage(cfg, run_dir, data, manifest, fp)
    for st in targets:
        _require_upstream(st, cfg, manifest, fp)
        verdict, why = assess(st, manifest, fp, _options_as_config(options))
        if force:
            verdict, why = REDO, redo_why or "--force"
        elif verdict == DONE and st.name != "sweep":  # the sweep adds ratios it has not done
            log.info("%s: already done (outputs in %s); use --force to redo", st.name, run_dir)
            continue
        resume = _start(st, verdict, why, manifest, "")
        if verdict in (RUN, RESUME):
            resume = bool(getattr(args, "resume", False))
        execute(
            st, cfg, run_dir, data.get(st.name) if st.needs_data else None, manifest, resume, fp, **options
        )
    return 0


def _targets(name: str, cfg, args) -> tuple[list[Stage], dict]:
    """The stages a subcommand runs, and its options: `prune --sweep R` is the sweep at ratios R,
    `distill` is also the ablation when the config asks for one."""
    options: dict = {}
    stage = get_stage(name)
    if name == "prune" and getattr(args, "sweep", None):
        options = {"ratios": _parse_ratios(args.sweep)}
        stage = get_stage("sweep")
    targets = [stage]
    if name == "distill" and ablation_enabled(cfg):
        targets.append(get_stage("ablation"))
    return targets, options


def _update_data_stage(cfg, run_dir: Path, data: _Data, manifest: Manifest, fp: Fingerprints) -> None:
    data_stage = get_stage("data")
    verdict, why = assess(data_stage, manifest, fp)
    if verdict != DONE:
        resume = _start(data_stage, verdict, why, manifest, "")
        execute(data_stage, cfg, run_dir, data.get("data"), manifest, resume, fp)


def check_budgets(cfg, run_dir: Path) -> None:
    """Refuse, before anything is written, budgets that no candidate of an up-to-date bench meets: the
    deployed model and the report stay as they are (NothingFits names the budget, the closest
    candidate and the model that stays deployed)."""
    from slimvit.deploy import NothingFits, budgets, choose, deployed_now, review_plan, review_settings

    run_dir = Path(run_dir)
    if not (run_dir / BENCH).exists() or not (run_dir / MANIFEST).exists():
        return
    try:
        manifest, fp = Manifest(run_dir), Fingerprints(run_dir, cfg)
        if "bench" in _plan(enabled_stages(cfg), manifest, fp):
            return  # the bench will be redone (it, or a stage it is built from, is stale): its new candidates decide
        rows = read_json(run_dir / BENCH)["rows"]
    except (SlimvitError, ValueError, KeyError, OSError):
        return  # the stages themselves say what is wrong
    try:
        chosen, _ = choose(rows, **budgets(cfg))
        review_plan(run_dir, read_json(run_dir / BENCH), chosen["key"], **review_settings(cfg))
    except NothingFits as e:
        raise NothingFits(f"{e}; {deployed_now(run_dir)}") from None


def _parse_ratios(text: str) -> tuple[float, ...]:
    try:
        ratios = tuple(float(r) for r in text.split(","))
    except ValueError:
        raise ConfigError(f"--sweep '{text}' must be comma-separated ratios like 0.1,0.2,0.3,0.5") from None
    from slimvit.config import PruneConfig

    PruneConfig(sweep=ratios)  # validates each ratio
    return ratios
