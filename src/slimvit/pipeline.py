"""The stages, declared once; runs them in order, records them in `manifest.json`, redoes what is stale.

Each entry of `STAGES` says what a stage reads (run-folder files of earlier stages, the dataset
itself, config keys), what it writes, its CLI command and the function that runs it, as DVC's
`dvc.yaml` does. The CLI, `slimvit run`, `--force`, the config-change check (runs.py) and the
staleness check all read that one declaration.

When a stage finishes, the manifest records a digest of what it read (the dataset's content
fingerprint, the files of earlier stages, the values of its config keys) and of what it wrote.
A later call redoes a stage when

- it did not finish (a failed or interrupted training stage resumes from its checkpoint, unless
  its inputs changed meanwhile),
- an input differs from what it read (one log line names the input), or
- one of its outputs was changed or removed since it wrote them;

a redone stage writes new outputs, so the stages that read them are redone in turn. A stage whose
outputs come out byte-identical (the data split of an unchanged dataset) leaves its readers alone.
`slimvit run --force STAGE` resets STAGE and every stage built from it; `slimvit STAGE --force`
redoes STAGE only, and the fingerprints find its readers stale on the next run.

No stage writes a file another stage writes, and every caller holds the run folder's lock
(runs.lock_run_dir), so temp files found at the start were left by a killed process.
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import hashlib
import json
import logging
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimvit.errors import ConfigError, DataError, ModelError, SlimvitError, first_line
from slimvit.eta import Estimate
from slimvit.io import atomic_write_json, is_main_process, read_json, remove_temp_files
from slimvit.layout import LOGITS

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- run functions


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


def _ablation_enabled(cfg) -> bool:
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
)
_STUDENT_TRAIN = ("data.img_size", "model.student", "train.", "-train.teacher_epochs", "-train.teacher_lr")
_KD = ("distill.", "-distill.ablation")
_MODEL = ("model.safetensors", "model.json")


def _model(folder: str) -> tuple[str, ...]:
    return tuple(f"{folder}/{f}" for f in _MODEL)


def _trained(folder: str) -> tuple[str, ...]:
    return (*_model(folder), f"{folder}/metrics.jsonl")


STAGES: tuple[Stage, ...] = (
    Stage(
        "data",
        "check the dataset: classes, counts, image sizes, the split",
        _run_data,
        outputs=("split.json", "data.json"),
        params=("data.split", "data.seed"),
        dataset=True,
    ),
    Stage(
        "teacher",
        "train the teacher",
        _run_teacher,
        outputs=("teacher/train.json", "teacher/eval.json"),
        artifacts=_trained("teacher"),
        folders=("teacher",),
        reads=("split.json",),
        params=("data.img_size", "model.teacher", "train.", "-train.epochs", "-train.lr"),
        trains=True,
        flags=("resume", "force"),
    ),
    Stage(
        "distill",
        "train the student from the teacher (and, with distill.ablation=true, the same student without)",
        _run_distill,
        outputs=("student/train.json", "student/eval.json"),
        artifacts=_trained("student"),
        folders=("student",),
        reads=("split.json", *_model("teacher")),
        params=(*_STUDENT_TRAIN, *_KD),
        trains=True,
        flags=("resume", "force"),
    ),
    Stage(
        "ablation",
        "the student trained without distillation, for comparison",
        _run_ablation,
        outputs=("student_nokd/train.json", "student_nokd/eval.json"),
        artifacts=_trained("student_nokd"),
        folders=("student_nokd",),
        reads=("split.json",),
        params=_STUDENT_TRAIN,
        trains=True,
        command="distill",
        enabled=_ablation_enabled,
    ),
    Stage(
        "prune",
        "structured pruning + fine-tuning (--sweep for several ratios)",
        _run_prune,
        outputs=("pruned/prune.json", "pruned/eval.json"),
        artifacts=(*_trained("pruned"), "pruned/train.json"),
        folders=("pruned",),
        reads=("split.json", *_model("student"), "student/train.json", *_model("teacher")),
        params=("data.img_size", "prune.", "-prune.sweep", "-prune.depths", *_TRAIN, *_KD),
        trains=True,
        flags=("resume", "sweep", "force"),
    ),
    Stage(
        "sweep",
        "prune + fine-tune at each ratio of prune.sweep",
        _run_sweep,
        outputs=("prune_sweep.json",),
        artifacts=("prune_sweep.md", "sweep/*/model.*", "sweep/*/prune.json", "sweep/*/eval.json"),
        folders=("sweep",),
        reads=(
            "split.json",
            *_model("student"),
            "student/train.json",
            "?student/eval.json",
            *_model("teacher"),
            "?pruned/model.*",  # iterative sweeps start the ratios above the main one from it
            "?pruned/prune.json",
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
        outputs=("onnx/export.json",),
        artifacts=("onnx/*_fp32.onnx",),
        reads=("split.json", *_model("teacher"), *_model("student"), *_model("pruned"), "?sweep/*/model.*"),
        params=("quantize.opset", "quantize.fuse_attention", "quantize.optimize"),
    ),
    Stage(
        "quantize",
        "INT8 dynamic / static / mixed and FP16 variants of the pruned ONNX models",
        _run_quantize,
        outputs=("onnx/quantize.json",),
        artifacts=("onnx/*_fp16.onnx", "onnx/*_int8-*.onnx"),
        reads=(
            "split.json",
            "onnx/export.json",
            "onnx/*_fp32.onnx",
            "pruned/model.json",
            "?sweep/*/model.json",
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
        outputs=("bench.json",),
        artifacts=("bench.md", LOGITS),
        reads=(
            "split.json",
            *_model("teacher"),
            *_model("student"),
            *_model("pruned"),
            "pruned/prune.json",
            "?sweep/*/model.*",
            "?sweep/*/prune.json",
            "onnx/export.json",
            "onnx/quantize.json",
            "onnx/*.onnx",
        ),
        params=("bench.",),
    ),
    Stage(
        "deploy",
        "choose the model to deploy for the budgets (validation data only) and write deploy/",
        _run_deploy,
        outputs=("deploy/deploy.json",),
        artifacts=("deploy/model.onnx",),
        folders=("deploy",),
        reads=("bench.json", "onnx/*.onnx"),
        params=("deploy.",),
        flags=None,  # `slimvit deploy` has budget flags of its own (cli.py)
        needs_data=False,
        replaced=True,
    ),
    Stage(
        "report",
        "write REPORT.md with tables and plots",
        _run_report,
        outputs=("REPORT.md",),
        artifacts=("plots/*.png", "localisation.json"),
        reads=(
            "bench.json",
            f"?{LOGITS}",
            "?deploy/deploy.json",
            "?data.json",
            "?*/train.json",
            "?*/eval.json",
            "?*/metrics.jsonl",
            "?pruned/prune.json",
            "?prune_sweep.json",
            "?onnx/export.json",
            "?onnx/quantize.json",
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


def _overlap(a: str, b: str) -> bool:
    """Whether two run-folder path patterns can name the same file."""
    return fnmatch.fnmatchcase(a, b) or fnmatch.fnmatchcase(b, a)


def _reads(stage: Stage, optional: bool = True) -> list[str]:
    return [r.lstrip("?") for r in stage.reads if optional or not r.startswith("?")]


def producers(stage: Stage, required_only: bool = False) -> list[Stage]:
    """The earlier stages whose files `stage` reads, in pipeline order."""
    before = STAGES[: STAGE_NAMES.index(stage.name)]
    reads = _reads(stage, optional=not required_only)
    return [p for p in before if any(_overlap(r, w) for r in reads for w in p.writes)]


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


# --------------------------------------------------------------------------- fingerprints


def flat_config(cfg) -> dict[str, Any]:
    """`section.key` -> JSON-plain value (tuples as lists); `data.path` and `preset` left out (where
    the data lives does not change it: the dataset's content fingerprint covers that)."""
    d = json.loads(json.dumps(cfg.to_dict()))
    out = {}
    for section, values in d.items():
        if isinstance(values, dict):
            out.update({f"{section}.{k}": v for k, v in values.items()})
    out.pop("data.path", None)
    return out


class Fingerprints:
    """Digests of what the stages of one run folder read and write, each file hashed once per call."""

    def __init__(self, run_dir: Path, cfg) -> None:
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.config = flat_config(cfg)
        self._hashes: dict[tuple, str] = {}
        self._dataset: tuple | None = None

    def file(self, rel: str) -> str:
        path = self.run_dir / rel
        st = path.stat()
        key = (rel, st.st_size, st.st_mtime_ns, st.st_ino)
        if key not in self._hashes:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            self._hashes[key] = h.hexdigest()[:32]
        return self._hashes[key]

    def files(self, patterns) -> dict[str, str]:
        """Digest of every existing file matching the patterns (`?` prefixes ignored), by relative path."""
        rels = set()
        for p in patterns:
            rels.update(glob.glob(p.lstrip("?"), root_dir=self.run_dir))
        return {r: self.file(r) for r in sorted(rels) if (self.run_dir / r).is_file()}

    def dataset(self) -> tuple[str, list[str]] | None:
        """(content fingerprint, relative paths) of the dataset; None when it cannot be read now."""
        if self._dataset is None:
            from slimvit.data import discover, fingerprint, resolve_data_path

            try:
                index = discover(resolve_data_path(self.cfg.data.path))
                self._dataset = (fingerprint(index), [s.path for s in index.samples])
            except (DataError, OSError) as e:
                log.warning("the dataset cannot be read now, so whether it changed is not checked: %s", e)
                self._dataset = ()
        return self._dataset or None

    def inputs(self, stage: Stage, options: dict | None = None) -> dict:
        """What `stage` reads, now: {"dataset": fingerprint, "files": {path: digest}, "config": {key: value}}."""
        out: dict[str, Any] = {}
        if stage.dataset and (ds := self.dataset()) is not None:
            out["dataset"] = ds[0]
        files = self.files(stage.reads)
        out["files"] = files
        config = {k: v for k, v in self.config.items() if stage.depends_on(k)}
        config.update({k: v for k, v in (options or {}).items() if k in config})
        out["config"] = config
        return out

    def outputs(self, stage: Stage) -> dict[str, str]:
        return self.files(stage.writes)


@functools.cache
def _defaults() -> dict[str, Any]:
    from slimvit.config import Config

    return flat_config(Config())


def input_changes(recorded: dict, current: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """One phrase per input that differs. A config key the record lacks (added in a newer slimvit) is a
    change only when its value is not the key's default, the value that reproduces the old behaviour."""
    out = []
    if "dataset" in recorded and "dataset" in current and recorded["dataset"] != current["dataset"]:
        out.append("the dataset changed")
    old, new = recorded.get("files", {}), current.get("files", {})
    for rel in sorted(set(old) | set(new)):
        if rel not in new:
            out.append(f"{rel} is gone")
        elif rel not in old:
            out.append(f"{rel} is new")
        elif old[rel] != new[rel]:
            out.append(f"{rel} changed")
    old, new = recorded.get("config", {}), current.get("config", {})
    for key in sorted(set(old) & set(new)):
        if old[key] != new[key] and key not in ignore:
            out.append(f"config {key}: {old[key]!r} -> {new[key]!r}")
    if old:  # a record without config values (an older manifest's stage) is judged by its files alone
        for key in sorted(set(new) - set(old)):
            if key in _defaults() and new[key] != _defaults()[key] and key not in ignore:
                out.append(f"config {key}: not set before -> {new[key]!r}")
    return out


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _dataset_detail(run_dir: Path, fp: Fingerprints) -> str:
    """'N images added, M removed' against split.json's lists, when both are at hand."""
    ds = fp.dataset()
    split = run_dir / "split.json"
    if ds is None or not split.exists():
        return ""
    try:
        saved = read_json(split)
        old = {p for s in ("train", "val", "test") for p in saved[s]}
    except (ValueError, KeyError, TypeError):
        return ""
    now = set(ds[1])
    added, removed = len(now - old), len(old - now)
    if added or removed:
        return f" ({_count(added, 'image')} added, {removed} removed)"
    return " (the content of some images)"


# --------------------------------------------------------------------------- the manifest


class Manifest:
    """`manifest.json`: per stage its status, times, the digests of what it read and wrote, its result."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "manifest.json"
        self.run_dir = Path(run_dir)
        self.data = {"stages": {}}
        if self.path.exists():
            try:
                self.data = read_json(self.path)
                if not isinstance(self.data.get("stages"), dict):
                    raise ValueError("no 'stages' table")
            except (ValueError, UnicodeDecodeError, AttributeError) as e:
                raise ConfigError(
                    f"'{self.path}' is unreadable ({type(e).__name__}: {first_line(e, 120)}); "
                    "delete it and run again to rebuild it from the stages' outputs (finished stages are "
                    "kept), or use another --out"
                ) from None

    def entry(self, name: str) -> dict:
        return self.data["stages"].setdefault(name, {})

    def save(self) -> None:
        if is_main_process():
            atomic_write_json(self.path, self.data)

    def outputs_exist(self, stage: Stage) -> bool:
        return all((self.run_dir / o).exists() for o in stage.outputs)

    def reset(self, stage: Stage) -> None:
        """Forget the stage and remove what it wrote, so it starts over (a `replaced` stage's outputs stay
        until it writes new ones)."""
        if is_main_process() and not stage.replaced:
            for pattern in stage.writes:
                for rel in glob.glob(pattern, root_dir=self.run_dir):
                    (self.run_dir / rel).unlink(missing_ok=True)
            for f in stage.folders:
                shutil.rmtree(self.run_dir / f, ignore_errors=True)
        self.data["stages"].pop(stage.name, None)


DONE, RUN, RESUME, REDO, RERUN = "done", "run", "resume", "redo", "rerun"


def assess(
    stage: Stage, manifest: Manifest, fp: Fingerprints, options: dict | None = None
) -> tuple[str, str]:
    """What to do with `stage` now, and why.

    Returns:
        (DONE, "") finished and up to date; (RUN, "") never ran; (RESUME, why) did not finish, same
        inputs; (REDO, why) start over (an input or an output changed); (RERUN, why) run again keeping
        its folders (only `rerun_keys` changed).
    """
    entry = manifest.data["stages"].get(stage.name)
    if entry is None:
        return RUN, ""
    current = fp.inputs(stage, options)
    recorded = entry.get("inputs")
    changes = input_changes(recorded, current) if isinstance(recorded, dict) else []
    if changes:
        if changes[0] == "the dataset changed":
            changes[0] += _dataset_detail(manifest.run_dir, fp)
        if entry.get("status") == "done" and not input_changes(recorded, current, stage.rerun_keys):
            return RERUN, changes[0]
        return REDO, changes[0] + (f" (and {len(changes) - 1} more)" if len(changes) > 1 else "")
    if entry.get("status", "done") != "done":
        return RESUME, f"{entry.get('status', 'unfinished')} before"
    missing = [o for o in stage.outputs if not (manifest.run_dir / o).exists()]
    if missing:
        return REDO, f"{missing[0]} is missing"
    written = entry.get("outputs")
    if isinstance(written, dict):
        now = fp.outputs(stage)
        for rel in sorted(set(written) | set(now)):
            if written.get(rel) != now.get(rel):
                what = "was removed" if rel not in now else "was changed"
                return REDO, f"{rel} {what} since {stage.name} wrote it"
    return DONE, ""


def adopt(stages: list[Stage], manifest: Manifest, fp: Fingerprints) -> None:
    """Record the inputs of finished stages that have none (a manifest from before fingerprints, or a
    deleted one), before anything runs, so that a change from now on is noticed. A stage whose outputs
    are older than a file it reads was left stale; it is reset instead."""
    changed, reset = False, set()
    for stage in stages:
        entry = manifest.data["stages"].get(stage.name)
        finished = entry is None or entry.get("status", "done") == "done"
        if stage.replaced and entry is None:  # reset: its outputs stay serving until it runs again
            continue
        if not finished or (entry is not None and "inputs" in entry) or not manifest.outputs_exist(stage):
            continue
        stale = [p.name for p in producers(stage) if p.name in reset]
        if stale:
            manifest.reset(stage)
            reset.add(stage.name)
            log.info("%s: built from %s, which will be redone; it will be redone too", stage.name, stale[0])
            changed = True
            continue
        inputs = fp.inputs(stage)
        if stage.name == "data":
            try:  # what the split was made from, rather than the dataset as it is now
                inputs["dataset"] = read_json(manifest.run_dir / "split.json")["fingerprint"]
            except (ValueError, KeyError, TypeError):
                pass
        oldest = min(((manifest.run_dir / o).stat().st_mtime for o in stage.outputs), default=0.0)
        newer = [r for r in inputs["files"] if (manifest.run_dir / r).stat().st_mtime > oldest + 1]
        if newer:
            manifest.reset(stage)
            reset.add(stage.name)
            log.info("%s: %s is newer than its outputs; it will be redone", stage.name, newer[0])
        else:
            manifest.entry(stage.name).update(status="done", inputs=inputs, outputs=fp.outputs(stage))
            log.info("%s: finished before its inputs were recorded; recorded them now", stage.name)
        changed = True
    if changed:
        manifest.save()


# --------------------------------------------------------------------------- running stages


def _format_seconds(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def execute(
    stage: Stage, cfg, run_dir: Path, data, manifest: Manifest, resume, fp: Fingerprints, **options
) -> dict:
    """Run one stage and record it; a failure is recorded before the error propagates."""
    entry = manifest.entry(stage.name)
    inputs = fp.inputs(stage, _options_as_config(options))
    for stale in ("error", "outputs", "finished", "result"):
        entry.pop(stale, None)
    entry.update(status="running", started=time.strftime("%Y-%m-%d %H:%M:%S"), inputs=inputs)
    manifest.save()
    t0 = time.perf_counter()
    try:
        result = stage.run(cfg, run_dir, data, resume=resume, **options)
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
        outputs=fp.outputs(stage),
        result=_jsonable(result),
    )
    manifest.save()
    return result


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
    previous = {
        n: e["seconds"]
        for n, e in manifest.data["stages"].items()
        if e.get("status") == "done" and "seconds" in e
    }
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
            eta = _estimate(cfg, loaded, [s.name for s in stages if s.name in to_run], previous, run_dir)
        elapsed = _format_seconds(time.perf_counter() - t_start)
        log.info("%s%s: running (elapsed %s; %s)", tag, stage.name, elapsed, eta.line(False) if eta else "")
        t0 = time.perf_counter()
        execute(stage, cfg, run_dir, loaded, manifest, resume, fp)
        if eta is not None:
            eta.finished(stage.name, time.perf_counter() - t0)
        log.info("%s%s: done in %s", tag, stage.name, _format_seconds(manifest.entry(stage.name)["seconds"]))
    manifest.data["total_seconds"] = manifest.data.get("decode_seconds", 0.0) + sum(
        manifest.entry(s.name).get("seconds", 0.0) for s in stages
    )
    manifest.save()
    log.info("pipeline finished; report: %s", run_dir / "REPORT.md")
    return 0


def _estimate(cfg, data, to_run: list[str], previous: dict, run_dir: Path | None = None) -> Estimate | None:
    """The time estimate, logged; a failure to make one never stops the pipeline."""
    try:
        eta = Estimate(cfg, data, to_run, previous, run_dir)
    except Exception as e:
        log.warning("no time estimate: %s", first_line(e))
        return None
    log.info("estimate on this machine: %s", eta.line())
    return eta


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
    options: dict = {}
    stage = get_stage(name)
    if name == "prune" and getattr(args, "sweep", None):
        options = {"ratios": _parse_ratios(args.sweep)}
        stage = get_stage("sweep")
    targets = [stage]
    if name == "distill" and _ablation_enabled(cfg):
        targets.append(get_stage("ablation"))
    run_dir = Path(run_dir)
    manifest, fp = _prepare(run_dir, cfg, enabled_stages(cfg))
    data = _Data(cfg, run_dir, manifest)
    force = getattr(args, "force", False) is True or redo_why is not None
    data_stage = get_stage("data")
    if stage is not data_stage:  # every stage reads its split: bring it up to date first
        verdict, why = assess(data_stage, manifest, fp)
        if verdict != DONE:
            resume = _start(data_stage, verdict, why, manifest, "")
            execute(data_stage, cfg, run_dir, data.get("data"), manifest, resume, fp)
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


def check_budgets(cfg, run_dir: Path) -> None:
    """Refuse, before anything is written, budgets that no candidate of an up-to-date bench meets: the
    deployed model and the report stay as they are (NothingFits names the budget, the closest
    candidate and the model that stays deployed)."""
    from slimvit.deploy import NothingFits, budgets, choose, deployed_now, review_plan, review_settings

    run_dir = Path(run_dir)
    if not (run_dir / "bench.json").exists() or not (run_dir / "manifest.json").exists():
        return
    try:
        manifest, fp = Manifest(run_dir), Fingerprints(run_dir, cfg)
        if assess(get_stage("bench"), manifest, fp)[0] != DONE:
            return  # the bench will be redone: its new candidates decide
        rows = read_json(run_dir / "bench.json")["rows"]
    except (SlimvitError, ValueError, KeyError, OSError):
        return  # the stages themselves say what is wrong
    try:
        chosen, _ = choose(rows, **budgets(cfg))
        review_plan(run_dir, read_json(run_dir / "bench.json"), chosen["key"], **review_settings(cfg))
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
