"""The checkpoint a training writes after every epoch, and the resume that reads it back.

``out_dir/checkpoint.pt`` is one unit: the weights, the best weights so far, the optimizer, the schedule
and the epoch, written to a temporary file and renamed over the old one, so a kill at any moment leaves
the old checkpoint or the new one, never a mix. It is loaded with ``weights_only=True``: tensors and
numbers, no pickled objects.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from slimvit.errors import ConfigError, ModelError, first_line
from slimvit.io import append_jsonl, atomic_path, read_jsonl, remove_temp_files
from slimvit.layout import CHECKPOINT, METRICS, TRAIN, WEIGHTS

log = logging.getLogger(__name__)

LEGACY_CHECKPOINT = "last"
"""The folder older versions kept their checkpoint in (three files, each renamed on its own)."""


def save_checkpoint(out_dir: Path, state: dict) -> None:
    """Write the whole training state as one file, renamed into place: the old or the new one survives."""
    with atomic_path(out_dir / CHECKPOINT) as tmp:
        torch.save(state, tmp)
    shutil.rmtree(out_dir / LEGACY_CHECKPOINT, ignore_errors=True)


def has_checkpoint(out_dir: Path) -> bool:
    return (out_dir / CHECKPOINT).exists() or (out_dir / LEGACY_CHECKPOINT / "train_state.pt").exists()


def remove_checkpoint(out_dir: Path) -> None:
    (out_dir / CHECKPOINT).unlink(missing_ok=True)
    shutil.rmtree(out_dir / LEGACY_CHECKPOINT, ignore_errors=True)


def load_checkpoint(out_dir: Path) -> dict:
    """The training state: model, best_model (or None), optimizer, scheduler, [ema,] epoch, epochs, best, seconds."""
    from safetensors.torch import load_file

    path = out_dir / CHECKPOINT
    try:
        if path.exists():
            return torch.load(path, map_location="cpu", weights_only=True)
        legacy = out_dir / LEGACY_CHECKPOINT
        state = torch.load(legacy / "train_state.pt", map_location="cpu", weights_only=True)
        best = out_dir / WEIGHTS
        state["model"] = load_file(str(legacy / WEIGHTS))
        state["best_model"] = load_file(str(best)) if best.exists() else None
        return state
    except FileNotFoundError:
        raise ModelError(f"no checkpoint to resume in '{out_dir}'; run the stage without --resume") from None
    except Exception as e:
        raise ModelError(
            f"the checkpoint in '{out_dir}' is corrupt ({first_line(e)}); run the stage without --resume"
        ) from None


def save_epoch(out_dir: Path, row: dict, state: dict) -> None:
    """Append the epoch's metrics row, then checkpoint: a resume drops rows past the checkpoint, so a crash
    between the two is safe."""
    append_jsonl(out_dir / METRICS, row)
    save_checkpoint(out_dir, state)


def start_or_resume(acc, out_dir: Path, resume, epochs: int, desc: str, model, optimizer, scheduler, ema):
    """Load the checkpoint to resume from, or clear another run's files: (start epoch, best, seconds so far,
    stop reason, best weights)."""
    best: dict = {
        "val_acc": -1.0,
        "val_bal_acc": -1.0,
        "val_loss": float("inf"),
        "val_kl": None,
        "val_agree": None,
        "epoch": -1,
    }
    start_epoch, elapsed, stopped, best_weights = 0, 0.0, None, None
    if acc.is_main_process and out_dir.is_dir():
        remove_temp_files(out_dir)  # half-written files of a killed run
    if resume is True or (resume == "auto" and has_checkpoint(out_dir)):
        state = load_checkpoint(out_dir)
        if state.get("epochs") != epochs:
            raise ConfigError(
                f"the checkpoint in '{out_dir}' was made for {state.get('epochs')} epochs, not {epochs}; "
                "run the stage without --resume (or --force) to start over"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and "ema" in state:
            ema.module.load_state_dict(state["ema"])
        start_epoch, best, elapsed = int(state["epoch"]) + 1, dict(state["best"]), float(state["seconds"])
        best.setdefault("val_bal_acc", best["val_acc"])  # a checkpoint of an older version
        best.setdefault("val_kl", None)
        best.setdefault("val_agree", None)
        best_weights = state.get("best_model")  # of the best epoch so far: what model.safetensors gets
        stopped = state.get("stopped")
        log.info("%s: resuming at epoch %d/%d", desc, start_epoch + 1, epochs)
    elif acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_checkpoint(out_dir)  # another run's: never resumed into this one
        (out_dir / METRICS).unlink(missing_ok=True)
        (out_dir / TRAIN).unlink(missing_ok=True)
    if acc.is_main_process and start_epoch:
        kept = [r for r in read_jsonl(out_dir / METRICS) if r.get("epoch", 0) <= start_epoch]
        with atomic_path(out_dir / METRICS) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return start_epoch, best, elapsed, stopped, best_weights
