"""The run folder: one writer at a time, a broken manifest named in one line, `slimvit data` as a stage."""

import json
import logging
import os
import subprocess
import sys
import time

import pytest
from conftest import make_imagefolder

from slimvit import cli
from slimvit.layout import LOCK
from slimvit.runs import RunFolderBusy, lock_run_dir

HOLD = """
import sys, time
from slimvit.runs import lock_run_dir
with lock_run_dir(sys.argv[1], "slimvit run --out X"):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_lock_names_its_holder_and_a_killed_holders_lock_is_taken_over(tmp_path, caplog):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderBusy) as e, lock_run_dir(run):
            pytest.fail("a second writer got the lock")
        msg = str(e.value)
        assert f"is in use by PID {holder.pid} (`slimvit run --out X`, since 20" in msg and "\n" not in msg
    finally:
        holder.kill()  # SIGKILL: no chance to release anything
        holder.wait()
    caplog.set_level(logging.WARNING, logger="slimvit.runs")
    with lock_run_dir(run, "slimvit teacher"):
        assert json.loads((run / LOCK).read_text())["pid"] == os.getpid()
    assert f"PID {holder.pid}" in caplog.text and "ended without releasing its lock" in caplog.text
    assert (run / LOCK).read_text() == ""  # released in order: names nobody
    caplog.clear()
    with lock_run_dir(run):
        pass
    assert "ended without releasing" not in caplog.text


def _slimvit(*args, **kw):
    return subprocess.run([sys.executable, "-m", "slimvit", *args], capture_output=True, text=True, **kw)


def test_two_concurrent_runs_on_one_folder(tmp_path):
    """The second `slimvit run` on a folder exits 2 with one line naming the first; the first finishes."""
    ds = make_imagefolder(tmp_path / "ds", per_class=10, size=32)
    out = tmp_path / "run"
    args = ["run", "--preset", "smoke", "--data", str(ds), "--out", str(out)]
    args += ["--set", "distill.ablation=false", "--set", "quantize.modes=[int8-dynamic]"]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, "-m", "slimvit", *args], stderr=log, stdout=log)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and first.poll() is None:
                text = (out / LOCK).read_text() if (out / LOCK).exists() else ""
                if text and json.loads(text)["pid"] == first.pid:
                    break
                time.sleep(0.1)
            second = _slimvit(*args)
            assert first.poll() is None, "the first run ended before the second started; nothing was tested"
            assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
        finally:
            if first.poll() is None:
                first.kill()
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"in use by PID {first.pid} (`slimvit run" in lines[0], second.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(e["status"] == "done" for e in manifest["stages"].values())
    assert (out / "REPORT.md").exists() and not list(out.rglob("*.tmp"))


def test_truncated_manifest_is_one_line_exit_2(tmp_path, capsys):
    ds = make_imagefolder(tmp_path / "ds", per_class=10, size=32)
    out = tmp_path / "run"
    out.mkdir()
    (out / "manifest.json").write_text('{"stages": {"data": {"status": "do')
    assert cli.main(["run", "--preset", "smoke", "--data", str(ds), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out / "manifest.json") in err[0] and "delete it and run again" in err[0]


def _data(ds, out, *extra):
    return cli.main(["data", "--preset", "smoke", "--data", str(ds), "--out", str(out), *extra])


def test_data_command_is_a_stage_and_force_redoes_the_split(tmp_path, capsys, caplog):
    ds = make_imagefolder(tmp_path / "ds", per_class=10, size=32)
    out = tmp_path / "run"
    assert _data(ds, out) == 0
    assert "21/3/6 (train/val/test)" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["data"]["status"] == "done" and (out / "data.json").exists()
    made = (out / "split.json").stat().st_mtime_ns
    assert _data(ds, out) == 0 and (out / "split.json").stat().st_mtime_ns == made  # up to date: kept
    assert "21/3/6" in capsys.readouterr().out
    caplog.set_level(logging.INFO, logger="slimvit.pipeline")
    assert _data(ds, out, "--force") == 0
    assert (out / "split.json").stat().st_mtime_ns != made and "data: redoing it: --force" in caplog.text
    assert _data(ds, out, "--force", "--set", "data.seed=1") == 0  # a new seed: a new split
    assert json.loads((out / "split.json").read_text())["seed"] == 1


def test_a_class_too_small_then_grown_works(tmp_path, capsys):
    """A class with 1 image is refused; with 9 more added the same command works (no stale split kept)."""
    ds = make_imagefolder(tmp_path / "ds", classes=("a", "c"), per_class=10, size=32)
    make_imagefolder(ds, classes=("b",), per_class=1, size=32)
    out = tmp_path / "run"
    assert _data(ds, out) == 2
    assert "has no images of class 'b'" in capsys.readouterr().err
    make_imagefolder(ds, classes=("b",), per_class=10, size=32)
    assert _data(ds, out) == 0, capsys.readouterr().err


def test_kill_9_mid_training_then_the_same_command_resumes(tmp_path):
    """SIGKILL during training: the next call takes the lock over, cleans up, resumes from the checkpoint."""
    ds = make_imagefolder(tmp_path / "ds", per_class=10, size=32)
    out = tmp_path / "run"
    args = [
        "teacher",
        "--preset",
        "smoke",
        "--data",
        str(ds),
        "--out",
        str(out),
        "--set",
        "train.teacher_epochs=12",
    ]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, "-m", "slimvit", *args], stderr=log, stdout=log)
        try:
            deadline = time.monotonic() + 120
            metrics = out / "teacher" / "metrics.jsonl"
            while time.monotonic() < deadline and first.poll() is None:
                if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                    break
                time.sleep(0.05)
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
            first.kill()
        finally:
            first.wait()
    (out / "teacher" / ".checkpoint.pt.k1ll3d.tmp").write_bytes(b"half")  # as a kill mid-write leaves
    r = _slimvit(*args, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"PID {first.pid}" in r.stderr and "ended without releasing its lock" in r.stderr
    assert "teacher: resuming at epoch" in r.stderr
    rows = [json.loads(x) for x in (out / "teacher" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in rows] == list(range(1, 13))
    assert not list(out.rglob("*.tmp"))
    assert json.loads((out / "manifest.json").read_text())["stages"]["teacher"]["status"] == "done"
