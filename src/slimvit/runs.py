"""The run folder: one writer at a time, the resolved config saved once and checked on every call, and
the settings a later command takes from it."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from slimvit import layout
from slimvit.config import Config, read_config, save_config
from slimvit.errors import ConfigError, DataError, SlimvitError
from slimvit.io import is_main_process

log = logging.getLogger(__name__)


class RunFolderBusy(SlimvitError):
    """Another slimvit command is writing the run folder."""


def _holder_text(holder: dict | None) -> str:
    if not holder:
        return "another process (starting up)"
    return f"PID {holder.get('pid')} (`{holder.get('command')}`, since {holder.get('since')})"


def _read_holder(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 65536, 0)
        return json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def lock_run_dir(run_dir: str | Path, command: str | None = None) -> Iterator[None]:
    """Hold the run folder's lock (`<run_dir>/.lock`, an flock) for the block: one writer per run folder.

    A second command gets RunFolderBusy naming the holder (PID, command, since when). The kernel
    releases an flock when its process dies, so a lock left by a killed process is simply taken over
    (the file still names the dead holder: that is logged). Ranks other than 0 of a distributed
    launch do not lock: rank 0 holds it for them.
    """
    if not is_main_process():
        yield
        return
    import fcntl

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out '{run_dir}' is a file; it must be a folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / layout.LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderBusy(
                f"run folder '{run_dir}' is in use by {_holder_text(_read_holder(fd))}; "
                "wait for it to finish (or stop it), or use another --out"
            ) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            log.warning(
                "the file system of '%s' has no file locks; two commands on it would collide", run_dir
            )
        previous = _read_holder(fd)
        if previous and previous.get("pid") != os.getpid():
            log.warning(
                "run folder '%s': the previous command, %s, ended without releasing its lock "
                "(killed?); taken over",
                run_dir,
                _holder_text(previous),
            )
        me = {
            "pid": os.getpid(),
            "command": command or " ".join(["slimvit", *sys.argv[1:]]),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode() + b"\n", 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # released in order: nobody to name
    finally:
        os.close(fd)  # releases the flock


def first_affected_stage(changed_keys: list[str]) -> str | None:
    """The earliest pipeline stage that depends on one of these `section.key` names."""
    from slimvit.stages import stages_for_keys

    hits = stages_for_keys(changed_keys)
    return hits[0].name if hits else None


def affected_stages(changed_keys: list[str]) -> list:
    """The stages that depend on these config keys and every stage built from their outputs, in order."""
    from slimvit.stages import STAGES, dependents, stages_for_keys

    names = set()
    for s in stages_for_keys(changed_keys):
        names |= {s.name, *(d.name for d in dependents(s.name))}
    return [s for s in STAGES if s.name in names]


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ, as 'section.key: old -> new'."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict) and k not in ("teacher_kwargs", "student_kwargs"):
            out += config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def _comparable(cfg: Config) -> dict:
    d = cfg.to_dict()
    d.pop("preset", None)
    d["data"].pop("path", None)  # the same data may live elsewhere; split.json checks its content
    return d


FREE_KEYS = ("deploy.",)
"""Config keys a run folder accepts changed without --force: the budgets re-choose the deployed model
from the existing bench (seconds), and nothing built before it changes."""


def prepare_run_dir(cfg: Config, out: str | Path, force: bool = False) -> Path:
    """Create the run folder and save `config.yaml`; refuse a different config unless forced.

    With `force`, the stages that depend on a changed key, and the stages built from them, are reset
    (the manifest's fingerprints would find them stale anyway; resetting here also covers stages
    recorded before fingerprints existed).
    """
    from slimvit.stages import STAGES

    run_dir = Path(out)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out '{run_dir}' is a file; it must be a folder")
    path = run_dir / layout.CONFIG
    if path.exists():
        try:
            diff = config_diff(_comparable(read_config(path)), _comparable(cfg))
            redo = affected_stages([d.split(":")[0] for d in diff])
        except ConfigError as e:
            if not force:
                why = str(e).splitlines()[0]
                raise ConfigError(f"'{path}' cannot be read ({why}); use another --out or --force") from None
            diff, redo = [f"unreadable {path.name}"], list(STAGES)  # nothing in the folder can be trusted
        if diff and not force and not all(d.startswith(FREE_KEYS) for d in diff):
            binding = [d for d in diff if not d.startswith(FREE_KEYS)]  # what the refusal is about
            shown = "; ".join(binding[:4]) + (" ..." if len(binding) > 4 else "")
            stages = affected_stages([d.split(":")[0] for d in binding])
            first = stages[0].name if stages else "data"
            raise ConfigError(
                f"run folder '{run_dir}' was made with a different config ({shown}); use another --out, or "
                f"redo what the change affects with the new config: `slimvit run --force {first}` (a stage "
                "command: add --force)"
            )
        if diff:
            _reset(run_dir, redo)
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        save_config(cfg, path)
    return run_dir


def _reset(run_dir: Path, stages: list) -> None:
    """Remove the outputs of these stages (the config they were made with changed)."""
    from slimvit.manifest import Manifest

    if not stages or not is_main_process():
        return
    manifest = Manifest(run_dir)
    for s in stages:
        manifest.reset(s)
    manifest.save()
    log.warning("config changed: %s will be redone", ", ".join(s.name for s in stages))


# --------------------------------------------------------------------------- what a run folder already says
# A command on an existing run folder takes some settings from the config.yaml it was made with: a flag
# given once (--data, --unlabeled, the budgets) need not be given again.


def saved_config(run_dir: Path) -> Config | None:
    """The run folder's config.yaml, or None when there is none or it cannot be read (prepare_run_dir
    then says what is wrong with it)."""
    saved = run_dir / layout.CONFIG
    if not saved.is_file():
        return None
    try:
        return read_config(saved)
    except ConfigError:
        return None


def unlabeled_of_run(cfg: Config, run_dir: Path, given: str | None, overrides: Sequence[str]) -> Config:
    """Without `--unlabeled` (`given`) or `--set bench.unlabeled=...`, the folder a run was benchmarked
    with stays its setting, so a later command is not refused as a changed config."""
    if given or any(o.startswith("bench.unlabeled") for o in overrides):
        return cfg
    saved = saved_config(run_dir)
    prev = saved.bench.unlabeled if saved is not None else None
    return dataclasses.replace(cfg, bench=dataclasses.replace(cfg.bench, unlabeled=prev)) if prev else cfg


def dataset_of_run(cfg: Config, run_dir: Path, given: str | None) -> Config:
    """The dataset a command reads: `--data` where given (refused, before anything is written, when it is
    not a folder), else the one the run folder was built from (its config.yaml's `data.path`), so a
    command without `--data` never rewrites the run's record of its dataset."""
    if given:
        if not Path(given).exists():
            raise DataError(
                f"dataset folder '{given}' does not exist; pass --data PATH or set SLIMVIT_DATA "
                "(see README, 'Getting NEU-DET')"
            )
        if not Path(given).is_dir():
            raise DataError(f"--data '{given}' is a file; it must be a dataset folder")
        return cfg
    saved = None if cfg.data.path else saved_config(run_dir)
    if saved is None:
        return cfg
    path = saved.data.path
    if path and not Path(path).is_dir():
        log.warning("the run folder's dataset '%s' is not there; pass --data to name where it is now", path)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=path)) if path else cfg


def deploy_of_run(cfg: Config, run_dir: Path, overrides: Sequence[str]) -> Config:
    """A stage command other than `run` and `deploy` keeps the run folder's own deploy settings (budgets,
    review) unless `--set deploy.KEY=...` names one: they say what was deployed, not what this command
    changes, so `slimvit report` after `slimvit deploy --budget-mb 2` re-renders that deployment."""
    saved = None if any(o.startswith("deploy.") for o in overrides) else saved_config(run_dir)
    return cfg if saved is None else dataclasses.replace(cfg, deploy=saved.deploy)


def with_budgets(cfg: Config, run_dir: Path) -> Config:
    """The run folder's own config with `cfg`'s budgets (unset flags: no budget, default drop).

    `slimvit deploy` re-chooses for the run that is there, so every other key comes from its config.yaml;
    `--set deploy.KEY=...` and the budget flags say the budgets of this call.
    """
    saved = run_dir / layout.CONFIG
    if not saved.exists():
        return cfg
    return dataclasses.replace(read_config(saved), deploy=cfg.deploy)
