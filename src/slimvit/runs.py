"""The run folder: the resolved config saved once, and refused when a later call differs."""

from __future__ import annotations

from pathlib import Path

from slimvit.config import Config, read_config, save_config
from slimvit.errors import ConfigError
from slimvit.io import is_main_process


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
    if path.exists() and not force:
        try:
            old = read_config(path)
        except ConfigError as e:
            raise ConfigError(f"'{path}' cannot be read ({e}); use another --out or --force") from None
        diff = config_diff(_comparable(old), _comparable(cfg))
        if diff:
            shown = "; ".join(diff[:4]) + (" ..." if len(diff) > 4 else "")
            raise ConfigError(
                f"run folder '{run_dir}' was made with a different config ({shown}); "
                "use another --out, or add --force to redo the affected stages with the new config"
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        save_config(cfg, path)
    return run_dir
