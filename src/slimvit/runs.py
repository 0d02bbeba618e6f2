"""The run folder: the resolved config saved once, and refused when a later call differs."""

from __future__ import annotations

import logging
from pathlib import Path

from slimvit.config import Config, read_config, save_config
from slimvit.errors import ConfigError
from slimvit.io import is_main_process

log = logging.getLogger(__name__)

# The first stage a changed config key invalidates (longest matching prefix wins); every stage after
# it depends on it and is redone too.
FIRST_AFFECTED = {
    "data.": "data",
    "model.teacher": "teacher",
    "model.student": "distill",
    "train.": "teacher",
    "train.epochs": "distill",
    "train.lr": "distill",
    "distill.": "distill",
    "prune.": "prune",
    "prune.sweep": "sweep",
    "quantize.": "quantize",
    "quantize.opset": "export",
    "quantize.fuse_attention": "export",
    "quantize.accuracy_tolerance": "bench",
    "bench.": "bench",
}


def first_affected_stage(changed_keys: list[str]) -> str | None:
    """The earliest pipeline stage that a change of these `section.key` names invalidates."""
    from slimvit.pipeline import STAGE_NAMES

    hits = []
    for key in changed_keys:
        prefix = max((p for p in FIRST_AFFECTED if key.startswith(p)), key=len, default=None)
        hits.append(FIRST_AFFECTED[prefix] if prefix else STAGE_NAMES[0])
    return min(hits, key=STAGE_NAMES.index, default=None)


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


def prepare_run_dir(cfg: Config, out: str | Path, force: bool = False) -> Path:
    """Create the run folder and save `config.yaml`; refuse a different config unless forced."""
    run_dir = Path(out)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out '{run_dir}' is a file; it must be a folder")
    path = run_dir / "config.yaml"
    if path.exists():
        try:
            diff = config_diff(_comparable(read_config(path)), _comparable(cfg))
            first = first_affected_stage([d.split(":")[0] for d in diff])
        except ConfigError as e:
            if not force:
                why = str(e).splitlines()[0]
                raise ConfigError(f"'{path}' cannot be read ({why}); use another --out or --force") from None
            diff, first = [f"unreadable {path.name}"], "data"  # nothing in the folder can be trusted
        if diff and not force:
            shown = "; ".join(diff[:4]) + (" ..." if len(diff) > 4 else "")
            raise ConfigError(
                f"run folder '{run_dir}' was made with a different config ({shown}); "
                "use another --out, or add --force to redo the affected stages with the new config"
            )
        if diff:
            _reset_from(run_dir, first)
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        save_config(cfg, path)
    return run_dir


def _reset_from(run_dir: Path, stage: str | None) -> None:
    """Remove the outputs of `stage` and of every stage after it (the config they were made with changed)."""
    from slimvit.pipeline import Manifest, redo_from

    if stage is None or not is_main_process():
        return
    manifest = Manifest(run_dir)
    redo = redo_from(stage)
    for s in redo:
        manifest.reset(s)
    manifest.save()
    log.warning("config changed: %s will be redone", ", ".join(s.name for s in redo))
