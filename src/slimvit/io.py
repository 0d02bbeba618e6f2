"""Atomic file writes: a half-written artifact never sits under its final name."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def is_main_process() -> bool:
    """Rank 0 of a distributed launch (torchrun / accelerate launch), or a plain process."""
    return int(os.environ.get("RANK", "0")) == 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def is_temp_name(name: str) -> bool:
    """The names `atomic_path` gives its temporary files (`.<name>.<random>.tmp`)."""
    return name.startswith(".") and name.endswith(".tmp")


def remove_temp_files(root: str | Path) -> list[Path]:
    """Remove the temporary files under `root` that a killed process left (call it only while no other
    process writes there: the run folder's lock says so). Returns what was removed."""
    removed = []
    for folder, _, files in os.walk(root):  # symlinks to folders are not followed
        for name in files:
            if is_temp_name(name):
                p = Path(folder) / name
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def append_jsonl(path: str | Path, obj: Any) -> None:
    """Append one line; a crash can at worst leave a partial last line, which readers skip."""
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
