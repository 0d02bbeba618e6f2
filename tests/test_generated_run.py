"""The whole pipeline on a generated dataset: bench, deploy and report tested without NEU-DET (issue 12, item 6)."""

from __future__ import annotations

import json

import pytest
from conftest import make_imagefolder

from slimvit import cli
from slimvit.config import load_config
from slimvit.report import load_run
from slimvit.spec import read_spec

SETTINGS = [
    *("--set", "distill.ablation=false", "--set", "quantize.modes=[int8-dynamic]"),
    *("--set", "prune.sweep=[0.5]", "--set", "prune.depths=[1]", "--set", "prune.sweep_epochs=1"),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("generated")
    data = make_imagefolder(work / "data", per_class=12, size=32)
    out = work / "run"
    assert cli.main(["run", "--preset", "smoke", "--data", str(data), "--out", str(out), *SETTINGS]) == 0
    return out, data


def test_bench_rows_deploy_and_report_sections(run):
    out, _ = run
    bench = json.loads((out / "bench.json").read_text())
    rows = {r["key"]: r for r in bench["rows"]}
    onnx = [r for r in rows.values() if r["runtime"] == "onnxruntime"]
    assert {r["precision"] for r in onnx} >= {"fp32", "int8-dynamic"}
    for r in onnx:
        lo, hi = r["accuracy_ci"]
        assert r["n"] == len(bench["test_images"]["paths"]) and lo <= r["accuracy"] <= hi
        assert 0 < r["size_mb"] and r["latency_ms_p50"] > 0 and r["val_n"] > 0
    dep = json.loads((out / "deploy" / "deploy.json").read_text())
    assert dep["deployed"] and dep["key"] in rows and (out / "deploy" / dep["file"]).is_file()
    report = (out / "REPORT.md").read_text()
    for section in (
        "## Conclusions",
        "## Stages",
        "## Pruning",
        "## Quantization",
        "## Deployed model",
        "## Classes",
    ):
        assert section in report, section
    assert "distilled from the student" in report  # the typed config, not a re-read of config.yaml
    # the pruned model's description is typed data anyone can read without torch
    spec = read_spec(out / "pruned")
    student = read_spec(out / "student")
    assert student.widths is None and spec.widths.embed_dim < student.kwargs["embed_dim"]


def test_depth_pruned_candidate_goes_through_every_stage(run):
    out, _ = run
    spec = read_spec(out / "sweep" / "r0.5-d1")
    assert spec.kwargs["depth"] == 1 and list(spec.widths.blocks) == ["blocks.0"]
    prune = json.loads((out / "sweep" / "r0.5-d1" / "prune.json").read_text())
    assert prune["depth"] == 1 and prune["source"] == "sweep/r0.5" and len(prune["removed_blocks"]) == 1
    points = json.loads((out / "prune_sweep.json").read_text())["points"]
    assert [(p["ratio"], p["depth"]) for p in points] == [(0.5, None), (0.5, 1)]
    bench = json.loads((out / "bench.json").read_text())
    deep = [r for r in bench["rows"] if r["stage"] == "sweep/r0.5-d1"]
    assert deep and all(r["candidate"] and r["depth"] == 1 and r["ratio"] == 0.5 for r in deep)
    assert {r["precision"] for r in deep} >= {"fp32", "int8-dynamic"}
    assert all(r["depth"] is None for r in bench["rows"] if r["stage"] == "sweep/r0.5")
    assert "| 0.5 | 1 |" in (out / "REPORT.md").read_text()  # the sweep table's blocks column


def test_report_reads_the_typed_config_it_is_given(run):
    out, data = run
    cfg = load_config("smoke", overrides=[*SETTINGS[1::2], "prune.teacher=teacher"], data_path=str(data))
    assert load_run(out, cfg)["config"].prune.teacher == "teacher"
    assert load_run(out)["config"].prune.teacher == "student"  # no config given: the run folder's own


def test_the_teacher_is_benched_as_a_candidate_and_deploys_like_one(run, tmp_path):
    from slimvit.deploy import choose, write_deploy
    from slimvit.predict import predict_files

    out, data = run
    bench = json.loads((out / "bench.json").read_text())
    teacher = [r for r in bench["rows"] if r["stage"] == "teacher" and r["candidate"]]
    assert teacher and all(r["runtime"] != "pytorch" and r["agreement"] is not None for r in teacher)
    report = (out / "REPORT.md").read_text()
    if json.loads((out / "deploy" / "deploy.json").read_text())["stage"] != "teacher":
        assert "Against deploying the teacher" in report  # what the compressed model buys over it
    # every compression far from the student, and the teacher faster than the student's own file (what
    # deploy falls back to where no compression fits): the teacher deploys
    rows = [
        {**r, "agreement": 0.0}
        if r["candidate"] and r["stage"] != "teacher"
        else {**r, "latency_ms_p50": 1e-3}
        if r["stage"] == "teacher"
        else r
        for r in bench["rows"]
    ]
    best, why = choose(rows, max_drop=100.0)
    assert best["stage"] == "teacher" and "no compression of the student fits" in why
    write_deploy(out, bench, best, why, {}, folder=tmp_path / "deploy")
    images = sorted(p for p in data.rglob("*.png"))[:4]
    got, failed = predict_files(tmp_path / "deploy", images, threads=1)
    assert not failed and len(got) == 4 and all(g["class"] in bench["classes"] for g in got)
