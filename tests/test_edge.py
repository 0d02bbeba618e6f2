"""The edge box (issue 14): a core install without torch, and `slimvit predict` as a scripting tool.

A fresh venv with the core install is too slow for the suite; `.ci/run` builds one for real. Here the
dependency metadata is checked, and predict runs in a process where torch cannot be imported.
"""

from __future__ import annotations

import csv
import importlib.metadata
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from tiny_onnx import CLASSES, expected_class, write_gray, write_tiny_onnx

from slimvit import cli
from slimvit.errors import ModelError
from slimvit.predict import classify, gather, resolve_model

ROOT = Path(__file__).resolve().parents[1]
TRAIN_ONLY = {"torch", "torchvision", "timm", "torch-pruning", "accelerate", "onnx", "onnxscript", "triton"}
LEVELS = (10, 60, 128, 200, 245)

# Runs `slimvit.cli.main(argv)` where every module of the train extra is unimportable (as in a core install)
BLOCKED = """
import json, sys
for m in {mods!r}:
    sys.modules[m] = None  # `import m` raises ModuleNotFoundError, find_spec(m) is None
from slimvit.cli import main
rc = main(json.loads(sys.argv[1]))
leaked = sorted(m for m in sys.modules if m.split(".")[0] in {mods!r} and sys.modules[m] is not None)
assert not leaked, leaked
sys.exit(rc)
"""


def _blocked(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    mods = sorted({m for extra in cli.EXTRA_MODULES.values() for m in extra})
    return subprocess.run(
        [sys.executable, "-c", BLOCKED.format(mods=mods), json.dumps(argv)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def deploy(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("run") / "deploy"
    write_tiny_onnx(d / "model.onnx")
    (d / "deploy.json").write_text(json.dumps({"file": "model.onnx", "source": "onnx/x.onnx"}))
    return d


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("imgs")
    for level in LEVELS:
        write_gray(d / f"{level:03d}.png", level)
    return d


def _core_requirements(dist: str) -> list[Requirement]:
    reqs = [Requirement(r) for r in importlib.metadata.requires(dist) or []]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def _name(r: Requirement) -> str:
    return re.sub(r"[-_.]+", "-", r.name).lower()


def test_core_install_has_no_torch_in_its_dependency_closure():
    core = {_name(r) for r in _core_requirements("slimvit")}
    assert {"onnxruntime", "numpy", "pillow"} <= core and not core & TRAIN_ONLY
    seen, todo = set(), list(core)
    while todo:  # the closure over the installed distributions, extras left out
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += [_name(r) for r in _core_requirements(name)]
        except importlib.metadata.PackageNotFoundError:
            pass
    assert not seen & TRAIN_ONLY, seen & TRAIN_ONLY
    train = {
        _name(r) for r in map(Requirement, importlib.metadata.requires("slimvit")) if r.marker is not None
    }
    assert {"torch", "timm", "torch-pruning", "accelerate", "onnx", "openvino"} <= train


def test_pyproject_matches_the_installed_metadata():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_name(Requirement(r)) for r in project["dependencies"]}
    assert declared == {_name(r) for r in _core_requirements("slimvit")}  # else: reinstall (make install)
    assert any(r.startswith("torch==") for r in project["optional-dependencies"]["train"])


def test_predict_runs_where_torch_cannot_be_imported(tmp_path, deploy, images):
    out_csv, out_json = tmp_path / "o.csv", tmp_path / "o.json"
    paths = "\n".join(str(p) for p in sorted(images.iterdir())) + "\n"
    r = _blocked(["predict", str(deploy), "-", "--csv", str(out_csv), "--json", str(out_json)], stdin=paths)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(out_csv.open()))
    assert [row["class"] for row in rows] == [expected_class(v) for v in LEVELS]
    assert json.loads(out_json.read_text())["model"] == str(deploy / "model.onnx")


@pytest.mark.parametrize("command", ["data", "teacher", "run", "bench"])
def test_stage_command_without_the_train_extra_is_one_line_exit_2(tmp_path, command):
    r = _blocked([command, "--out", str(tmp_path / "run")])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: `slimvit {command}` needs the 'train' extra (torch is not installed): "
        "pip install 'slimvit[train]'"
    ]
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_missing_module_found_late_still_names_its_extra(monkeypatch, capsys):
    def needs(module):
        def handler(args):
            raise ModuleNotFoundError(f"No module named '{module}'", name=module)

        return handler

    monkeypatch.setattr(cli, "cmd_stage", needs("openvino.runtime"))
    assert cli.main(["export"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: `slimvit export` needs the 'openvino' extra (openvino is not installed): "
        "pip install 'slimvit[openvino]'"
    )
    monkeypatch.setattr(cli, "cmd_stage", needs("not_an_extra"))
    with pytest.raises(ModuleNotFoundError):  # a real bug, not a missing extra: the traceback stays
        cli.main(["export"])


def test_stdin_paths_skip_folders_and_report_missing_files(tmp_path, images):
    listing = f"{images}\n" + "".join(f"{p}\r\n" for p in sorted(images.iterdir())) + "\n/nope/x.png\n"
    files = gather(["-"], io.StringIO(listing))  # `find DIR` lists DIR itself first
    assert files == [*sorted(images.iterdir()), Path("/nope/x.png")]
    assert gather([str(images), "-"], io.StringIO(str(images / "010.png"))) == [
        *sorted(images.iterdir()),
        images / "010.png",
    ]


def test_cli_stdin_summary_and_exit_1_for_a_missing_file(tmp_path, deploy, images, monkeypatch, capsys):
    listing = "".join(f"{p}\n" for p in sorted(images.iterdir())) + f"{tmp_path / 'gone.png'}\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(listing))
    assert cli.main(["predict", str(deploy), "-", "--threads", "1", "--batch", "2"]) == 1
    out, err = capsys.readouterr()
    lines = out.splitlines()  # captured stdout is not a terminal: path<TAB>class<TAB>confidence
    assert [line.split("\t")[1] for line in lines] == [expected_class(v) for v in LEVELS]
    err = err.strip().splitlines()
    assert err[0].startswith(f"error: cannot decode image '{tmp_path / 'gone.png'}'")
    assert re.fullmatch(
        r"5 images classified, 1 could not be decoded; [\d.]+ images/s end to end \(6 files decoded, "
        r"resized and classified in [\d.]+ s; 1 threads, batch 2; model load [\d.]+ s\)",
        err[1],
    )


def test_empty_stdin_is_bad_usage(deploy, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    assert cli.main(["predict", str(deploy), "-"]) == 2
    assert "stdin holds no file paths" in capsys.readouterr().err


def test_batch_size_and_threads_do_not_change_results(deploy, images):
    files = sorted(images.iterdir())
    ref = classify(deploy, files, threads=2, batch=32)
    for threads, batch in ((1, 1), (1, 2), (3, 4)):
        got = classify(deploy, files, threads=threads, batch=batch)
        assert [r["class"] for r in got.results] == [r["class"] for r in ref.results]
        assert all(
            abs(a["confidence"] - b["confidence"]) < 1e-6
            for a, b in zip(got.results, ref.results, strict=True)
        )
    assert ref.images_per_s > 0 and ref.seconds > 0 and ref.load_seconds > 0


def test_top_k_in_json_csv_and_stdout(tmp_path, deploy, images, capsys):
    out_json, out_csv = tmp_path / "o.json", tmp_path / "o.csv"
    argv = [
        "predict",
        str(deploy),
        str(images),
        "--top-k",
        "3",
        "--json",
        str(out_json),
        "--csv",
        str(out_csv),
    ]
    assert cli.main(argv) == 0
    preds = json.loads(out_json.read_text())["predictions"]
    for p in preds:
        top = p["top"]
        assert [t["class"] for t in top][0] == p["class"] and sorted(t["class"] for t in top) == sorted(
            CLASSES
        )
        assert [t["confidence"] for t in top] == sorted((t["confidence"] for t in top), reverse=True)
    rows = list(csv.DictReader(out_csv.open()))
    assert list(rows[0])[:7] == [
        "path",
        "class",
        "confidence",
        "class_2",
        "confidence_2",
        "class_3",
        "confidence_3",
    ]
    assert rows[0]["class_2"] == preds[0]["top"][1]["class"]
    line = capsys.readouterr().out.splitlines()[0].split("\t")
    assert len(line) == 7 and line[3] == preds[0]["top"][1]["class"]
    assert cli.main(["predict", str(deploy), str(images), "--top-k", "4"]) == 0  # capped, and said so
    out, err = capsys.readouterr()
    assert "--top-k 4 is more than the model's 3 classes; showing all 3" in err
    assert len(out.splitlines()[0].split("\t")) == 7


def test_missing_and_non_image_paths_follow_one_rule(tmp_path, deploy, images, monkeypatch, capsys):
    """A missing path is listed and the rest classified (exit 1), as an undecodable file is; a file that is
    not an image by name is skipped and counted whether it comes from a folder or stdin."""
    notes = images / "notes.txt"
    notes.write_text("not an image")
    first = sorted(p for p in images.iterdir() if p.suffix == ".png")[0]
    # named as arguments, every path is tried: a missing one and a non-image are listed, the rest classified
    rc = cli.main(["predict", str(deploy), str(first), str(tmp_path / "nosuch"), str(notes)])
    out, err = capsys.readouterr()
    assert rc == 1 and len(out.splitlines()) == 1 and "nosuch': it does not exist" in err
    assert "notes.txt" in err and "skipped" not in err
    # in a listing on stdin and in a folder: one rule, a file that is not an image by name is skipped, counted
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{first}\n{notes}\n"))
    assert cli.main(["predict", str(deploy), "-"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1 and "skipped 1 file(s)" in err and "error:" not in err
    assert cli.main(["predict", str(deploy), str(images)]) == 0
    assert "skipped 1 file(s)" in capsys.readouterr().err
    notes.unlink()


def test_model_may_be_a_deploy_folder(tmp_path, deploy):
    assert resolve_model(deploy) == deploy / "model.onnx"
    bare = tmp_path / "bare"
    write_tiny_onnx(bare / "model.onnx")
    assert resolve_model(bare) == bare / "model.onnx"  # no deploy.json: model.onnx
    named = tmp_path / "named"
    write_tiny_onnx(named / "int8.onnx")
    (named / "deploy.json").write_text(json.dumps({"file": "int8.onnx"}))
    assert resolve_model(named) == named / "int8.onnx"
    with pytest.raises(ModelError, match="has no model.onnx"):
        resolve_model(tmp_path)
    (tmp_path / "deploy.json").write_text("{broken")
    with pytest.raises(ModelError, match="not a valid deploy record"):
        resolve_model(tmp_path)
