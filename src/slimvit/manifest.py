"""What `manifest.json` records of each stage, and whether a stage is up to date.

When a stage finishes, the manifest records a digest of what it read (the dataset's content
fingerprint, the files of earlier stages, the values of its config keys) and of what it wrote.
A later call redoes a stage when

- it did not finish (a failed or interrupted training stage resumes from its checkpoint, unless
  its inputs changed meanwhile),
- an input differs from what it read (one log line names the input), or
- one of its outputs was changed or removed since it wrote them;

a redone stage writes new outputs, so the stages that read them are redone in turn. A stage whose
outputs come out byte-identical (the data split of an unchanged dataset) leaves its readers alone.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from slimvit.errors import ConfigError, DataError, first_line
from slimvit.io import atomic_write_json, is_main_process, read_json
from slimvit.layout import MANIFEST, SPLIT
from slimvit.stages import Stage, producers

log = logging.getLogger(__name__)


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
    split = run_dir / SPLIT
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
        self.path = Path(run_dir) / MANIFEST
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
                inputs["dataset"] = read_json(manifest.run_dir / SPLIT)["fingerprint"]
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
