"""Atomic artifact writes, and a full disk reported as one line."""

import errno
import os
import stat

import pytest

from slimvit import cli
from slimvit.io import atomic_path, atomic_write_text


def test_atomic_write_gives_usual_mode_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a" / "model.json"
    atomic_write_text(target, "{}")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0600
    with pytest.raises(OSError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_text() == "{}"  # the complete old file stays; the half-written one is gone
    assert [p.name for p in target.parent.iterdir()] == ["model.json"]


def test_full_disk_is_one_line_exit_2(monkeypatch, capsys):
    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/model.safetensors")

    monkeypatch.setattr(cli, "cmd_stage", full)
    assert cli.main(["bench", "--preset", "smoke"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left" in err[0] and "runs/x/model.safetensors" in err[0]


def test_other_os_errors_are_not_disguised(monkeypatch):
    def broken(args):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(cli, "cmd_stage", broken)
    with pytest.raises(OSError):
        cli.main(["bench", "--preset", "smoke"])
