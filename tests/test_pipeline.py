"""The `smoke` preset end to end on the real NEU-DET copy, then skip / force / resume behaviour."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import make_imagefolder

from slimvit import pipeline, runtime, stages
from slimvit.config import load_config
from slimvit.errors import ConfigError
from slimvit.manifest import RUN, Fingerprints, Manifest, adopt, assess, input_changes
from slimvit.runs import prepare_run_dir


def set_runner(monkeypatch, name, fn):
    """Replace one stage's run function (the declaration is frozen: swap the whole entry)."""
    import dataclasses

    replaced = tuple(dataclasses.replace(s, run=fn) if s.name == name else s for s in stages.STAGES)
    monkeypatch.setattr(stages, "STAGES", replaced)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "slimvit", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def smoke_run(neu_det, tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    t0 = time.perf_counter()
    r = _cli("run", "--preset", "smoke", "--data", str(neu_det), "--out", str(out))
    seconds = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-4000:]
    return out, seconds, r


def test_smoke_end_to_end(smoke_run):
    out, seconds, _ = smoke_run
    assert seconds < 180, f"smoke pipeline took {seconds:.0f}s"
    report = (out / "REPORT.md").read_text()
    for section in ("Environment", "Dataset", "Stage", "Distillation", "Pruning", "Conclusions"):
        assert section.lower() in report.lower(), section
    plots = sorted((out / "plots").glob("*.png"))
    assert len(plots) >= 4
    for p in plots:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 2000
        assert f"plots/{p.name}" in report  # every plot is shown in the report
    bench = json.loads((out / "bench.json").read_text())
    rows = bench["rows"]
    assert sum(r["reference"] for r in rows) == 1
    have = {(r["stage"], r["runtime"], r["precision"]) for r in rows}
    for need in [
        ("teacher", "pytorch", "fp32"),
        ("student", "pytorch", "fp32"),
        ("pruned", "pytorch", "fp32"),
        ("pruned", "onnxruntime", "fp32"),
        ("pruned", "onnxruntime", "fp16"),
        ("pruned", "onnxruntime", "int8-dynamic"),
        ("pruned", "onnxruntime", "int8-static"),
        ("pruned", "onnxruntime", "int8-mixed"),
    ]:
        assert need in have, need
    assert ("teacher", "onnxruntime", "fp32") in have  # the teacher's own file is a candidate too
    if bench["openvino"]["available"]:  # the same files on OpenVINO, timed in the same rounds
        assert ("pruned", "openvino", "fp32") in have and ("pruned", "openvino", "int8-static") in have
        assert ("teacher", "openvino", "fp32") in have
    for r in rows:
        assert r["file"] and (out / r["file"]).exists()
        assert 0 <= r["accuracy"] <= 1 and r["latency_ms_p50"] > 0 and r["size_mb"] > 0
        assert r["accuracy_ci"][0] <= r["accuracy"] <= r["accuracy_ci"][1] and r["val_accuracy"] is not None
        assert r["candidate"] == (r["runtime"] != "pytorch" and r["stage"] in ("pruned", "teacher"))
    assert len(bench["predictions"]["pruned/onnxruntime/fp32"]) == len(bench["test_images"]["paths"]) == 360
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(s["status"] == "done" for s in manifest["stages"].values())
    stage_seconds = sum(s["seconds"] for s in manifest["stages"].values())
    assert manifest["decode_seconds"] > 0 and manifest["total_seconds"] > stage_seconds  # decoding counted
    rec = json.loads((out / "deploy" / "deploy.json").read_text())
    deployed = next(r for r in rows if r["key"] == rec["key"])
    assert rec["deployed"] and rec["accuracy"] == deployed["accuracy"] and "validation" in rec["why"]
    assert rec["validated_on"]["onnxruntime"] and rec["portable"]
    meta = runtime.metadata(runtime.session(out / "deploy" / "model.onnx", 1))
    assert meta["precision"] == deployed["precision"] and meta["stage"] == "pruned"
    assert meta["runtime"] == deployed["runtime"] and meta["validated_on"] == rec["validated_on"]
    # the edge path in a process of its own agrees with bench on the same images
    check = rec["predict_check"]
    # same images, paired: the verdict of an exact test (dynamic INT8 scales activations per call, so a
    # near-random smoke model's tied logits may flip an image or two between differently batched runs)
    assert check["agrees"] and check["paired"]["p"] >= 0.05 and check["torch_loaded"] is False
    assert check["paired"]["a_only"] + check["paired"]["b_only"] <= 5
    # the pruned FP32 ONNX model and the default choice, timed again at 1 and 2 threads
    scaling = bench["thread_scaling"]
    assert bench["threads"] == 2 and {r["threads"] for r in scaling} == {1, 2}
    assert all(r["latency_ms_p50"] > 0 and r["latency_ms_p90"] >= r["latency_ms_p50"] for r in scaling)
    assert "by intra-op thread count" in report
    assert bench["settings"]["block_warmup"] == 2  # the smoke preset's
    for section in ("Deployment candidates", "Portability", "exact McNemar"):
        assert section in report, section
    # classes: NEU-DET is balanced, so nothing is resampled and balanced accuracy is accuracy
    assert "## Classes" in report and "Weakest class of the deployed model" in report
    assert "Test recall per class" in report and "every training image once per epoch" in report
    for name in ("teacher", "student", "pruned"):
        assert json.loads((out / name / "train.json").read_text())["balance"] == "none"
    for r in rows:
        assert r["balanced_accuracy"] == pytest.approx(r["accuracy"])  # 60 test images per class


def test_int8_variants_portable_and_faithful_on_real_images(smoke_run):
    """On whatever CPU runs this: every int8 file fits non-VNNI kernels, and agrees with FP32 on real images."""
    out, _, _ = smoke_run
    q = json.loads((out / "onnx" / "quantize.json").read_text())
    variants = q["models"]["pruned"]
    for mode in ("int8-dynamic", "int8-static", "int8-mixed"):
        assert variants[mode]["portability"]["portable"], mode
        assert variants[mode]["portability"]["max_abs_weight"] <= 64
        assert variants[mode]["agreement_fp32"] >= 0.95, (mode, variants[mode]["agreement_fp32"])
    assert q["validated_on"]["cpu"] and "onnxruntime" in q["validated_on"]


def test_verify_and_deploy_for_budgets(smoke_run, tmp_path):
    import shutil

    out, _, _ = smoke_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    from test_edge import _blocked

    r = _blocked(["verify", str(run / "deploy")])  # as on an edge box: torch, onnx, timm unimportable
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("agrees: accuracy") and "paired test p=" in r.stdout
    assert len(r.stdout.strip().splitlines()) == 1
    before = folder_digest(run)
    key = json.loads((run / "deploy" / "deploy.json").read_text())["key"]
    r = _cli("deploy", "--out", str(run), "--budget-ms", "0.0001")
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "batch-1 p50 <= 0.0001 ms" in errors[0] and "closest:" in errors[0]
    assert f"{key} stays deployed" in errors[0]
    # refused: the deployed model, its record, the report, the config and the manifest are as they were
    assert folder_digest(run) == before
    r = _blocked(["verify", str(run / "deploy")])
    assert r.returncode == 0, r.stderr[-2000:]
    report_before = (run / "REPORT.md").read_text()
    bench = json.loads((run / "bench.json").read_text())
    smallest = min(r["size_mb"] for r in bench["rows"] if r["candidate"])
    r = _blocked(["deploy", "--out", str(run), "--budget-mb", f"{smallest * 1.001:.6f}"])
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads((run / "deploy" / "deploy.json").read_text())
    assert rec["size_mb"] <= smallest * 1.01 and rec["budgets"]["budget_mb"] > 0
    assert (run / "deploy" / "model.onnx").exists()
    assert "deploy: redoing it: --force" not in r.stderr  # no --force was given
    assert "REPORT.md still describes the model deployed before" in r.stderr  # no matplotlib here
    r = _cli("deploy", "--out", str(run), "--budget-mb", f"{smallest * 1.001:.6f}")
    assert r.returncode == 0, r.stderr[-2000:]
    # with the train extra the re-choice re-renders the report: it describes the model now in deploy/
    report = (run / "REPORT.md").read_text()
    assert report != report_before and f"{rec['budgets']['budget_mb']:g} MB" in report
    assert not any(p.name.startswith(".deploy") for p in run.iterdir())
    # the budgets changed nothing upstream: a plain run redoes the deploy (no budgets) and the report only
    r = _cli("run", "--preset", "smoke", "--out", str(run), "--data", bench["test_images"]["root"])
    assert r.returncode == 0, r.stderr[-3000:]
    redone = {
        line.split("]")[1].split(":")[0].strip() for line in r.stderr.splitlines() if ": running" in line
    }
    assert redone == {"deploy", "report"}, r.stderr[-3000:]


def test_where_no_compression_fits_deploy_ships_the_students_own_file(smoke_run, tmp_path):
    import hashlib
    import shutil

    from test_edge import _blocked

    out, _, _ = smoke_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    bench = json.loads((run / "bench.json").read_text())
    for r in bench["rows"]:  # every compression far below the student on validation
        if r["candidate"] and r["stage"] != "teacher":
            r["val_accuracy"] = r["val_balanced_accuracy"] = 0.0
        elif r["stage"] == "teacher":
            r["latency_ms_p50"] = r["latency_ms_p90"] = 1e3  # and the teacher slower than the student's file
    (run / "bench.json").write_text(json.dumps(bench))
    # as if bench had measured these figures: its record names the file as written now
    manifest = json.loads((run / "manifest.json").read_text())
    digest = hashlib.sha256((run / "bench.json").read_bytes()).hexdigest()[:32]
    manifest["stages"]["bench"]["outputs"]["bench.json"] = digest
    (run / "manifest.json").write_text(json.dumps(manifest))
    r = _cli("deploy", "--out", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads((run / "deploy" / "deploy.json").read_text())
    assert rec["key"] == "student/onnxruntime/fp32" and rec["source"] == "onnx/student_fp32.onnx"
    assert "uncompressed" in rec["why"] and rec["predict_check"]["agrees"]
    v = _blocked(["verify", str(run / "deploy")])  # the edge box runs it like any deployed file
    assert v.returncode == 0 and v.stdout.startswith("agrees: accuracy"), v.stderr[-2000:]
    report = (run / "REPORT.md").read_text()
    assert "Deployed: **student" in report and "No compression of the student fitted" in report
    assert "**Deployed: none of these** but the student's own file" in report  # under the candidate table
    # a lever study compares recipes on the compressions they deliver: this run delivered none
    d = script("levers").deployed(run)
    assert d["test"] is None and d["val"] is None and "the student's own file deployed" in d["label"]


def folder_digest(root) -> dict:
    """Every file under `root` (relative path -> sha256 of its bytes)."""
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_second_run_skips_every_stage(smoke_run):
    out, _, _ = smoke_run
    before = (out / "bench.json").stat().st_mtime_ns
    r = _cli(
        "run",
        "--preset",
        "smoke",
        "--out",
        str(out),
        "--data",
        json.loads((out / "data.json").read_text())["root"],
    )
    assert r.returncode == 0, r.stderr[-3000:]
    skipped = [line for line in r.stderr.splitlines() if "done, skipped" in line]
    assert len(skipped) == len(stages.enabled_stages(load_config("smoke")))
    assert "running" not in r.stderr
    assert (out / "bench.json").stat().st_mtime_ns == before


def test_changed_config_is_refused(smoke_run):
    out, _, _ = smoke_run
    cfg = load_config("smoke", overrides=["train.epochs=3"])
    with pytest.raises(ConfigError, match=r"different config \(train.epochs: 1 -> 3\)"):
        prepare_run_dir(cfg, out)


def test_forced_config_change_redoes_the_affected_stages(smoke_run, tmp_path):
    """--force with a changed prune setting keeps the trained teacher/student and redoes pruning onwards."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(smoke_run[0], out)
    cfg = load_config("smoke", overrides=["prune.ratio=0.3"])
    prepare_run_dir(cfg, out, force=True)
    manifest = json.loads((out / "manifest.json").read_text())
    for kept in ("data", "teacher", "distill", "ablation"):
        assert manifest["stages"][kept]["status"] == "done"
    assert (out / "student" / "model.safetensors").exists() and (out / "teacher" / "eval.json").exists()
    for redo in ("prune", "export", "quantize", "bench", "report"):
        assert redo not in manifest["stages"]
    assert not (out / "pruned").exists() and not (out / "bench.json").exists()
    assert not (out / "onnx" / "export.json").exists()


@pytest.mark.parametrize(
    ("keys", "first"),
    [
        (["bench.runs"], "bench"),
        (["quantize.calibration", "bench.runs"], "quantize"),
        (["quantize.opset"], "export"),
        (["train.epochs", "prune.ratio"], "distill"),
        (["train.teacher_epochs"], "teacher"),
        (["train.weight_decay"], "teacher"),
        (["model.student_stem"], "distill"),
        (["model.student_attention"], "distill"),
        (["prune.sweep"], "sweep"),
        (["prune.depths"], "sweep"),
        (["data.img_size"], "teacher"),  # the split does not depend on it; every trained model does
        (["data.seed"], "data"),
        (["quantize.optimize"], "export"),  # export applies it (it used to reset only from quantize)
        (["bench.threads"], "bench"),
        (["deploy.budget_ms"], "deploy"),
    ],
)
def test_first_affected_stage(keys, first):
    from slimvit.runs import first_affected_stage

    assert first_affected_stage(keys) == first


def test_redo_from_covers_dependents():
    names = lambda s: [x.name for x in stages.redo_from(s)]  # noqa: E731
    # the ablation reads no teacher and no student: it does not depend on the distilled student
    assert names("distill") == [
        "distill",
        "prune",
        "sweep",
        "export",
        "quantize",
        "bench",
        "deploy",
        "report",
    ]
    assert names("teacher") == ["teacher", *names("distill")]
    assert names("data") == list(stages.STAGE_NAMES)
    assert names("ablation") == ["ablation", "report"]
    # the sweep models are deployment candidates: exported, quantized and benchmarked
    assert names("sweep") == ["sweep", "export", "quantize", "bench", "deploy", "report"]
    assert names("bench") == ["bench", "deploy", "report"]
    assert names("deploy") == ["deploy", "report"]  # new budgets re-time nothing


class _Stop(Exception):
    pass


@pytest.mark.parametrize("source", ["teacher", "student"])
def test_pruning_finetune_teacher_sees_its_own_normalisation(smoke_run, tmp_path, monkeypatch, source):
    """The fine-tune distils from `prune.teacher`: the run's teacher through Renormalize (student and
    teacher stats differ), or the unpruned student."""
    import shutil

    import torch

    from slimvit import models, prune, train

    out = tmp_path / "copy"
    shutil.copytree(smoke_run[0], out)
    root = json.loads((out / "data.json").read_text())["root"]
    cfg = load_config(
        "smoke", overrides=[f"data.path={root}", f"prune.teacher={source}", "prune.select_from=0.5"]
    )
    seen = {}

    def capture(model, spec, data, tcfg, out_dir, opts, *, teacher=None, **kw):
        seen.update(teacher=teacher, spec=spec, x=data.arrays("val")[0][:8], initial=opts.select_initial)
        seen.update(select_from=opts.select_from, on_epoch=opts.on_epoch)
        raise _Stop  # only the teacher handed to the fine-tune matters

    def hook(model, epoch):  # a study's per-epoch reader (scripts/finetune_levers.py)
        pass

    monkeypatch.setattr(train, "fit", capture)
    with pytest.raises(_Stop):
        prune.run_prune(cfg, out, on_epoch=hook)
    assert seen["initial"] is False  # the untrained cut model never stands in for a fine-tuned one
    assert seen["select_from"] == 0.5  # prune.select_from reaches the fine-tune
    assert seen["on_epoch"] is hook
    t_model, t_spec = models.load(out / source)
    s_spec = seen["spec"]
    if source == "teacher":
        assert (s_spec.mean, s_spec.std) != (t_spec.mean, t_spec.std)  # the case that matters
    from slimvit.preprocess import normalize

    as_student = torch.from_numpy(normalize(seen["x"], s_spec.mean, s_spec.std))
    as_teacher = torch.from_numpy(normalize(seen["x"], t_spec.mean, t_spec.std))
    with torch.no_grad():
        torch.testing.assert_close(seen["teacher"](as_student), t_model(as_teacher), rtol=1e-4, atol=1e-4)


def test_failed_stage_is_recorded_and_resumed(smoke_run, tmp_path, monkeypatch):
    """A stage failing mid-run is marked failed; the next run starts there and skips the rest."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(smoke_run[0], out)
    cfg = load_config("smoke", overrides=[f"data.path={json.loads((out / 'data.json').read_text())['root']}"])
    original = stages.get_stage("quantize").run

    def broken(*a, **k):
        raise RuntimeError("disk full")

    set_runner(monkeypatch, "quantize", broken)
    with pytest.raises(RuntimeError):
        pipeline.run_pipeline(cfg, out, force="quantize")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["quantize"]["status"] == "failed"
    assert "disk full" in manifest["stages"]["quantize"]["error"]
    assert manifest["stages"]["export"]["status"] == "done"

    calls = []
    set_runner(monkeypatch, "quantize", lambda *a, **k: calls.append("q") or original(*a, **k))
    for name in ("teacher", "distill", "ablation", "prune", "export"):
        set_runner(monkeypatch, name, lambda *a, n=name, **k: pytest.fail(f"{n} re-ran"))
    assert pipeline.run_pipeline(cfg, out) == 0
    assert calls == ["q"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(s["status"] == "done" for s in manifest["stages"].values())


def test_dataset_error_is_recorded_against_the_stage_that_needed_it(smoke_run, tmp_path):
    import shutil

    from slimvit.errors import DataError

    out = tmp_path / "copy"
    shutil.copytree(smoke_run[0], out)
    cfg = load_config("smoke", overrides=[f"data.path={tmp_path / 'moved-away'}"])
    with pytest.raises(DataError):
        pipeline.run_pipeline(cfg, out, force="quantize")
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["stages"]["quantize"]
    assert entry["status"] == "failed" and entry["error"].startswith("loading the dataset: ")
    assert "moved-away" in entry["error"] and manifest["stages"]["export"]["status"] == "done"
    # a single-stage command given a --data that is not there refuses before it changes anything
    before = (out / "manifest.json").read_bytes()
    r = _cli(
        "export", "--force", "--preset", "smoke", "--data", str(tmp_path / "moved-away"), "--out", str(out)
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr and "moved-away' does not exist" in r.stderr
    assert (out / "manifest.json").read_bytes() == before


def test_stage_command_without_prerequisite(tmp_path):
    make_imagefolder(tmp_path / "ds", per_class=10, size=32)
    r = _cli("prune", "--preset", "smoke", "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "teacher (not run yet)" in line and "`slimvit teacher`, `slimvit distill`" in line
    assert (tmp_path / "r" / "split.json").exists()  # the data stage ran first, as every stage needs it


def test_thread_counts():
    from slimvit.bench import thread_counts

    assert thread_counts(1) == [1] and thread_counts(2) == [1, 2] and thread_counts(12) == [1, 2, 4, 8, 12]


def test_report_thread_scaling_table():
    from slimvit.report.deployment import _thread_scaling

    rows = [
        {"precision": "fp32", "default_choice": False, "threads": 1, "latency_ms_p50": 4.0},
        {"precision": "int8-mixed", "default_choice": True, "threads": 1, "latency_ms_p50": 1.6},
        {"precision": "fp32", "default_choice": False, "threads": 2, "latency_ms_p50": 2.0},
        {"precision": "int8-mixed", "default_choice": True, "threads": 2, "latency_ms_p50": 1.2},
    ]
    text = "\n".join(_thread_scaling({"threads": 2, "thread_scaling": rows}))
    assert "| 1 | 4.00 | 1.60 | 0.40x |" in text and "| 2 | 2.00 | 1.20 | 0.60x |" in text
    assert "FP32 ONNX got 2.00x faster and the default choice 1.33x" in text and "too small to split" in text
    fp16 = [dict(r, precision="fp16") if r["default_choice"] else r for r in rows]
    assert "too small to split" not in "\n".join(_thread_scaling({"threads": 2, "thread_scaling": fp16}))
    assert _thread_scaling({"threads": 2, "thread_scaling": rows[:3]}) == []  # incomplete: no table
    slower = [dict(r, latency_ms_p50=2.0) if r["default_choice"] and r["threads"] == 2 else r for r in rows]
    assert "default choice slower (1.25x the time)" in "\n".join(
        _thread_scaling({"threads": 2, "thread_scaling": slower})
    )
    fp32_chosen = [dict(r, default_choice=True) for r in rows if r["precision"] == "fp32"]
    text = "\n".join(_thread_scaling({"threads": 2, "thread_scaling": fp32_chosen}))
    assert "| 1 | 4.00 |" in text and "(default choice)" in text and "choice / FP32" not in text
    # a sweep model on OpenVINO is its own column, not merged with the pruned FP32 ONNX one
    ov = [
        dict(r, stage="sweep/r0.5", runtime="openvino", precision="fp32") if r["default_choice"] else r
        for r in rows
    ]
    text = "\n".join(_thread_scaling({"threads": 2, "thread_scaling": ov}))
    assert (
        "default choice (fp32 on OpenVINO, sweep/r0.5) ms" in text and "| 2 | 2.00 | 1.20 | 0.60x |" in text
    )


def test_a_key_the_record_lacks_is_a_change_only_off_its_default():
    """A key added in a newer slimvit: its default reproduces the old behaviour, any other value does not."""
    recorded = {"config": {"prune.ratio": 0.2}}
    assert input_changes(recorded, {"config": {"prune.ratio": 0.2, "prune.depths": []}}) == []
    now = {"config": {"prune.ratio": 0.2, "prune.depths": [6]}}
    assert input_changes(recorded, now) == ["config prune.depths: not set before -> [6]"]
    assert input_changes(recorded, now, ignore=("prune.depths",)) == []


def test_refused_commands_leave_a_finished_run_as_it_was(smoke_run, tmp_path):
    """A wrong --data, an impossible budget for `run`: exit 2, one line, every file unchanged; a command
    without --data keeps the run's record of its dataset."""
    import shutil

    import yaml

    out, _, _ = smoke_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    before = folder_digest(run)
    for args in (
        ("data", "--preset", "smoke", "--data", str(tmp_path / "nosuch"), "--out", str(run)),
        ("run", "--preset", "smoke", "--out", str(run), "--budget-ms", "0.0001"),
    ):
        r = _cli(*args)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert r.returncode == 2 and len(errors) == 1, r.stderr[-2000:]
        assert folder_digest(run) == before, args
    data_path = yaml.safe_load((run / "config.yaml").read_text())["data"]["path"]
    assert data_path
    r = _cli("report", "--preset", "smoke", "--out", str(run), "--force")  # no --data
    assert r.returncode == 0, r.stderr[-2000:]
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["path"] == data_path


def test_a_run_that_redoes_only_the_report_says_the_time_so_far_without_an_empty_estimate(
    smoke_run, tmp_path
):
    """The estimate needs the images (step times, epochs per split); a run that redoes only stages that read
    none has none, and its progress line gives the elapsed time alone."""
    import shutil

    out, _, _ = smoke_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    r = _cli("run", "--preset", "smoke", "--out", str(run), "--force", "report")
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(x for x in (r.stdout + r.stderr).splitlines() if "report: running (elapsed" in x)
    assert line.endswith("s)") and "; )" not in line and ";" not in line, line


def test_budgets_are_refused_up_front_only_on_a_bench_that_will_not_be_redone(smoke_run):
    """`slimvit run` refuses an impossible budget before anything changes, on the finished bench; but where
    a stage the bench is built from is stale (here the student's epochs changed), the bench will be redone
    and its new candidates decide: refusing on the old ones would keep the run from ever retraining."""
    from slimvit import pipeline
    from slimvit.deploy import NothingFits

    out, _, _ = smoke_run
    impossible = ["deploy.budget_ms=0.0001"]
    with pytest.raises(NothingFits):
        pipeline.check_budgets(load_config(config_file=out / "config.yaml", overrides=impossible), out)
    stale = load_config(config_file=out / "config.yaml", overrides=[*impossible, "train.epochs=7"])
    assert pipeline.check_budgets(stale, out) is None


def test_a_reset_keeps_the_deployed_model_serving_until_it_is_replaced(smoke_run, tmp_path):
    """Redoing the pipeline (here: from the teacher) resets the deploy and report stages, but their files
    stay in place, so `slimvit predict` keeps working during the rerun; the folder is not re-adopted as
    finished, and a new deployment replaces the old one whole."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(smoke_run[0], out)
    model = (out / "deploy" / "model.onnx").read_bytes()
    m = Manifest(out)
    for name in ("deploy", "report"):
        m.reset(stages.get_stage(name))
    m.save()
    assert (out / "deploy" / "model.onnx").read_bytes() == model and (out / "REPORT.md").exists()
    cfg = load_config("smoke")
    fp = Fingerprints(out, cfg)
    adopt(stages.enabled_stages(cfg), m, fp)
    assert "deploy" not in m.data["stages"]  # not taken for finished: it runs again
    assert assess(stages.get_stage("deploy"), m, fp)[0] == RUN


def test_lever_study_trains_each_lever_and_seed_from_one_teacher(smoke_run, tmp_path):
    from pathlib import Path

    out, _, _ = smoke_run
    levers = tmp_path / "levers"
    script = Path(__file__).parents[1] / "scripts" / "levers.py"
    args = [sys.executable, str(script), "--base", str(out), "--seeds", "0,1", "--out", str(levers)]
    r = subprocess.run([*args, "--lever", "ema=train.ema=true"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    # the default recipe at the base run's own seed is the base run's student, not a retrained one
    base = (out / "student" / "model.safetensors").read_bytes()
    assert (levers / "default" / "s0" / "student" / "model.safetensors").read_bytes() == base
    assert (levers / "ema" / "s0" / "student" / "model.safetensors").read_bytes() != base
    assert load_config(config_file=levers / "ema" / "s1" / "config.yaml").train.ema
    assert (levers / "ema" / "s1" / "teacher" / "model.safetensors").read_bytes() == (
        out / "teacher" / "model.safetensors"
    ).read_bytes()  # one teacher for every lever
    # seed by seed: every lever's seed 0 before any seed 1, so a study cut short has whole pairs
    done = {f: (levers / f / "student" / "val.json").stat().st_mtime for f in ("ema/s0", "default/s1")}
    assert done["ema/s0"] < done["default/s1"]
    table = (levers / "LEVERS.md").read_text()
    n_val = len(json.loads((out / "split.json").read_text())["val"])
    assert f"validation {2 * n_val}" in table  # pooled over both seeds
    rows = [line for line in table.splitlines() if line.startswith(("| default", "| ema"))]
    assert len(rows) == 2 and "p=" in rows[1]  # the lever paired with the default recipe
    # resumable: a second call trains nothing and writes the same table
    assert subprocess.run([*args, "--lever", "ema=train.ema=true"], capture_output=True).returncode == 0
    assert (levers / "LEVERS.md").read_text() == table


def test_lever_none_runs_the_default_recipe_alone(smoke_run, tmp_path):
    from pathlib import Path

    out, _, _ = smoke_run
    levers = tmp_path / "levers"
    script = Path(__file__).parents[1] / "scripts" / "levers.py"
    args = [sys.executable, str(script), "--base", str(out), "--seeds", "0", "--out", str(levers)]
    r = subprocess.run(
        [*args, "--lever", "none", "--lever", "ema=train.ema=true"], capture_output=True, text=True
    )
    assert r.returncode != 0 and "--lever none" in r.stderr and not levers.exists()
    r = subprocess.run([*args, "--lever", "none"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in levers.iterdir() if p.is_dir()) == ["default"]  # not the built-in levers
    rows = [line for line in (levers / "LEVERS.md").read_text().splitlines() if line.startswith("| ")]
    assert any(line.startswith("| default") for line in rows)
    assert not any(line.startswith(("| ema", "| consistent")) for line in rows)


def test_a_teacher_lever_trains_its_own_teacher_once_and_pairs_its_students_with_it(smoke_run, tmp_path):
    """A lever of the teacher (train.teacher_*, model.teacher) is the teacher and its students: one teacher
    trained for it (base split and seed), every seed's student distilled from that one, paired with it."""
    from pathlib import Path

    from slimvit.report.stats import paired_text

    out, _, _ = smoke_run
    levers = tmp_path / "levers"
    script_path = Path(__file__).parents[1] / "scripts" / "levers.py"
    lever = ["--lever", "t2=train.teacher_epochs=2"]
    args = [sys.executable, str(script_path), "--base", str(out), "--out", str(levers), *lever]
    r = subprocess.run([*args, "--seeds", "0,1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    home = levers / "t2" / "teacher-run"
    own = (home / "teacher" / "model.safetensors").read_bytes()
    base = (out / "teacher" / "model.safetensors").read_bytes()
    assert own != base and json.loads((home / "teacher" / "train.json").read_text())["epochs"] == 2
    assert load_config(config_file=home / "config.yaml").train.seed == load_config("smoke").train.seed
    for s in ("s0", "s1"):
        assert (levers / "t2" / s / "teacher" / "model.safetensors").read_bytes() == own
        assert (levers / "default" / s / "teacher" / "model.safetensors").read_bytes() == base
    # the lever's students are paired with their own teacher (its one test verdict repeated per seed)
    t_own = json.loads((home / "teacher" / "eval.json").read_text())
    t_right = np.array(t_own["pred"]) == np.array(t_own["labels"])
    right = np.concatenate([script("levers").outcome(levers / "t2" / s, "test") for s in ("s0", "s1")])
    table = (levers / "LEVERS.md").read_text()
    assert "t2's own" in table and "a lever of the teacher: its own" in table
    row = next(line for line in table.splitlines() if line.startswith("| t2 "))
    assert row.split(" | ")[8] == paired_text(right, np.concatenate([t_right, t_right]))
    # resumable: the teacher is not trained again
    mtime = (home / "teacher" / "model.safetensors").stat().st_mtime_ns
    assert subprocess.run([*args, "--seeds", "0,1"], capture_output=True).returncode == 0
    assert (home / "teacher" / "model.safetensors").stat().st_mtime_ns == mtime
    # cross-validation trains a teacher per fold already: a teacher lever there is refused, before any work
    r = subprocess.run([*args, "--folds", "2", "--pipeline"], capture_output=True, text=True)
    assert r.returncode != 0 and "--seeds" in r.stderr and not (levers / "default" / "f0").exists()


def test_lever_study_pipeline_mode_compares_deployed_models_from_one_teacher(smoke_run, tmp_path):
    """--pipeline runs `slimvit run` per (lever, seed) on the base run's split and teacher (taken for
    finished, not retrained); the base run stands for the default recipe at its own seed; LEVERS.md adds
    the deployed models, paired with the default recipe's and with each step's input."""
    from pathlib import Path

    out, _, _ = smoke_run
    levers = tmp_path / "levers"
    script = Path(__file__).parents[1] / "scripts" / "levers.py"
    args = [sys.executable, str(script), "--base", str(out), "--out", str(levers), "--seeds", "0"]
    args += ["--pipeline", "--lever", "long=train.epochs=2,prune.sweep=[0.3]"]
    args += ["--lever", "ft=prune.finetune_epochs=2"]
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    run = levers / "long" / "s0"
    assert load_config(config_file=run / "config.yaml").train.epochs == 2
    for name in ("model.safetensors", "train.json"):  # copied with its time, never rewritten
        assert (run / "teacher" / name).stat().st_mtime == (out / "teacher" / name).stat().st_mtime
    # a lever of the fine-tune alone starts from the default recipe's run: the same student, not retrained
    ft = levers / "ft" / "s0"
    for name in ("teacher", "student"):
        weights = Path(name) / "model.safetensors"
        assert (ft / weights).stat().st_mtime == (out / weights).stat().st_mtime
    epochs = [json.loads((r / "pruned" / "prune.json").read_text())["finetune"]["epochs"] for r in (ft, out)]
    assert epochs[0] > epochs[1]  # its own fine-tune, redone
    assert (run / "deploy" / "model.onnx").exists() and not (levers / "default").exists()
    table = (levers / "LEVERS.md").read_text()
    assert "## The whole pipeline: the deployed model" in table
    # every compressed shape's FP32 file against the student, whatever was deployed, after the deployed ones
    before, _, after = table.partition("## Every compressed shape (FP32 ONNX), against the student")
    rows = [line for line in before.splitlines() if line.startswith("| long")]
    assert len(rows) == 2 and rows[1].count("p=") == 6  # vs default (val, test), vs teacher, 3 steps
    shapes = [line.split(" | ")[1] for line in after.splitlines() if line.startswith("| long | ")]
    sweep = run / "prune_sweep.json"
    sweep = {p["model"] for p in json.loads(sweep.read_text())["points"]} if sweep.exists() else set()
    assert shapes[0] == "pruned" and set(shapes) == {"pruned"} | sweep
    # the sweep's fine-tunes distilled from the student's logits the prune stage kept, not computed again
    assert (run / "pruned" / "teacher_logits.safetensors").exists() and sweep - {"pruned"}
    for m in sweep - {"pruned"}:
        ft = json.loads((run / m / "train.json").read_text())
        assert ft["teacher_logits"] == "cached" and ft["teacher_logits_seconds"] == 0, m
    # resumable: the finished run is only checked
    assert subprocess.run(args, capture_output=True).returncode == 0
    assert (levers / "LEVERS.md").read_text() == table


def script(name: str):
    """scripts/<name>.py as a module (the benchmarks are scripts, not part of the package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_lever_study_reads_its_base_run_as_it_was_made(tmp_path):
    """A base run saved before a key existed used the key's default: a lever setting the preset's newer
    value is a lever (its own folder), not the base run itself, and the default recipe stays the base's."""
    import yaml

    levers = script("levers")
    d = load_config("neu-det").to_dict()
    del d["train"]["select_from"]  # a run made before train.select_from (every epoch competed)
    base, out = tmp_path / "base", tmp_path / "levers"
    base.mkdir()
    (base / "config.yaml").write_text(yaml.safe_dump(d))
    assert levers.run_folder(base, out, "default", [], 0) == base
    assert levers.run_folder(base, out, "default", [], 1) == out / "default" / "s1"
    assert levers.run_folder(base, out, "last", ["train.select_from=1"], 0) == out / "last" / "s0"
    assert levers.run_folder(base, out, "every", ["train.select_from=0"], 0) == base


def test_lever_study_steps_skip_a_seed_that_deployed_the_teacher():
    """A seed whose pipeline deployed the teacher has no compression steps of its own: the step columns pool
    the other seeds and say so, instead of pairing the teacher's files with the pruned student's."""
    from pathlib import Path

    import numpy as np

    levers = script("levers")
    rng = np.random.default_rng(0)

    def fake(compressed: bool) -> dict:
        steps = [rng.random(40) < 0.9 for _ in range(5)]
        val = rng.random(20) < 0.9
        return {
            "label": "x",
            "val": val,
            "test": steps[-1],
            "steps": steps,
            "compressed": compressed,
            "minutes": 1.0,
        }

    runs = {Path("d0"): fake(True), Path("d1"): fake(True), Path("l0"): fake(True), Path("l1"): fake(False)}
    by_lever = {"default": [runs[Path("d0")], runs[Path("d1")]], "long": [runs[Path("l0")], runs[Path("l1")]]}
    teacher = rng.random(40) < 0.9
    one = {n: [teacher, teacher] for n in by_lever}  # one teacher for both seeds and both recipes
    lines = levers.deployed_table(by_lever, one)
    default = next(line for line in lines if line.startswith("| default"))
    long = next(line for line in lines if line.startswith("| long"))
    assert "deployed the teacher" not in default
    assert long.count("(1 of 2 seeds; the others deployed the teacher or nothing)") == len(levers.STEP_NAMES)
    a, b = runs[Path("l0")]["steps"][2], runs[Path("l0")]["steps"][1]  # pruned r=0.2 vs student, seed l0 only
    assert levers.paired_text(a, b) in long
    runs[Path("l0")]["compressed"] = False
    lines = levers.deployed_table(by_lever, one)
    assert (
        next(line for line in lines if line.startswith("| long")).count("- (the teacher or nothing deployed)")
        == 3
    )


def test_lever_study_lists_the_test_images_most_models_got_wrong():
    """The hard-images table ranks test images by how many models got them wrong, counts the images every model
    got wrong (the points no recipe recovered) and gives the teacher's verdict with the class it chose."""
    import numpy as np

    levers = script("levers")
    right = np.ones(5, dtype=bool)
    models = {"a": right.copy(), "b": right.copy(), "c": right.copy()}
    for m in models.values():
        m[3] = False  # wrong in all three
    models["a"][1] = models["b"][1] = False  # wrong in two
    teacher = {"classes": ["cat", "dog"], "labels": [0, 0, 1, 1, 0], "pred": [0, 0, 1, 0, 0]}
    files = [f"IMAGES/x_{i}.jpg" for i in range(5)]
    lines = levers.hard_table(models, [teacher], files)
    rows = [line for line in lines if line.startswith("| x_")]
    assert rows == [
        "| x_3.jpg | dog | 3 of 3 | wrong (cat) |",
        "| x_1.jpg | cat | 2 of 3 | right |",
    ]  # images no model got wrong are not listed
    assert "1 image(s) wrong in every model: 20.00 points" in "\n".join(lines)
    none = levers.hard_table({"a": right}, [teacher], files)
    assert "0 image(s) wrong in every model" in "\n".join(none) and "| (none) | | | |" in none
    # cross-validation: a teacher per fold, each verdict counted
    right_teacher = {**teacher, "pred": teacher["labels"]}
    rows = [
        line
        for line in levers.hard_table(models, [teacher, right_teacher], files, "fold")
        if line.startswith("| x_")
    ]
    assert rows == [
        "| x_3.jpg | dog | 3 of 3 | wrong (cat) in 1 of 2 |",
        "| x_1.jpg | cat | 2 of 3 | right |",
    ]


def test_subset_benchmark_sets_every_step_beside_the_full_dataset():
    """scripts/imbalanced.py --balanced A,B: every step of the subsets, pooled, beside the same step of the
    full-dataset runs, pooled, with the difference and its interval (the small-data benchmark of issue 29)."""
    import numpy as np

    imbalanced = script("imbalanced")
    y = np.repeat(np.arange(2), 50)  # 100 test images, 50 a class

    def run(wrong: int) -> list[tuple[np.ndarray, np.ndarray]]:
        p = y.copy()
        p[:wrong] = 1  # `wrong` images of class 0 called class 1
        return [(p, y)] * len(imbalanced.STEPS)

    rows = imbalanced.against_full([run(10), run(0)], [run(0), run(0), run(0)])
    assert [r[0] for r in rows] == list(imbalanced.STEPS)
    name, subsets, full, diff = rows[-1]
    # subsets: 10 of 100 class-0 images wrong over two runs -> class 0 at 90%, balanced 95%; full: 100%
    assert subsets.startswith("95.00 +- ") and full.startswith("100.00 +- ")
    d, lo, hi = (float(x) for x in diff.replace("(", "").replace(")", "").replace(" to ", " ").split())
    assert d == -5.0 and lo < -5.0 < hi < 0  # the interval is clear of zero: 10 of 100 images is a real loss
    assert imbalanced.against_full([run(0)], [run(0)])[-1][3].startswith("+0.00")


def test_subset_benchmarks_stop_on_a_refused_run_and_go_on_past_a_deploy_verdict(tmp_path):
    """`slimvit run` exits 2 for a refusal (a changed config) and for a finished run that deployed nothing:
    the subset benchmarks (imbalanced.py, and small_data.py through it) go on only past the second (a
    refused folder was once compared as a finished run)."""
    import json

    import pytest

    assert script("small_data").finished.__module__ == "imbalanced"  # one function for both
    finished = script("imbalanced").finished
    run = tmp_path / "run"
    (run / "deploy").mkdir(parents=True)
    finished(0, run)
    with pytest.raises(SystemExit, match="refused"):  # no deploy record: the command refused
        finished(2, run)
    (run / "deploy" / "deploy.json").write_text(json.dumps({"deployed": True}))
    with pytest.raises(SystemExit, match="refused"):  # a model deployed before: exit 2 was this command's
        finished(2, run)
    (run / "deploy" / "deploy.json").write_text(json.dumps({"deployed": False, "error": "no candidate"}))
    finished(2, run)


def test_fold_split_cuts_train_and_val_into_stratified_folds():
    """levers.py --folds: every train + val image is validation in exactly one fold, each class spread
    evenly over the folds, byte-identical files in one fold, test untouched."""
    from pathlib import Path
    from types import SimpleNamespace

    levers = script("levers")
    classes = ["a", "b"]
    samples = [
        SimpleNamespace(path=f"{c}_{i}.jpg", label=j) for j, c in enumerate(classes) for i in range(20)
    ]
    hashes = [s.path for s in samples]
    hashes[1] = hashes[0]  # a_0 and a_1 are the same bytes
    index = SimpleNamespace(root=Path("x"), classes=classes, samples=samples, hashes=hashes)
    paths = [s.path for s in samples]
    split = {
        "classes": classes,
        "fingerprint": "f",
        "train": paths[2:16] + paths[20:36],
        "val": paths[16:18] + paths[36:38],
    }
    split["test"] = paths[:2] + paths[18:20] + paths[38:]
    pool = set(split["train"]) | set(split["val"])
    cuts = [levers.fold_split(split, index, 3, f) for f in range(3)]
    vals = [set(c["val"]) for c in cuts]
    assert set().union(*vals) == pool and sum(map(len, vals)) == len(pool)  # each image validation once
    for c in cuts:
        assert set(c["train"]) | set(c["val"]) == pool and not set(c["train"]) & set(c["val"])
        assert c["test"] == split["test"] and c["fingerprint"] == "f"
    for name, n in (("a", 16), ("b", 18)):  # each class dealt evenly: 6/5/5 and 6/6/6
        counts = sorted(sum(Path(p).name.startswith(name) for p in c["val"]) for c in cuts)
        assert sum(counts) == n and counts[-1] - counts[0] <= 1
    assert cuts == [levers.fold_split(split, index, 3, f) for f in range(3)]  # deterministic
    # a duplicate pair in the pool stays in one fold
    split["train"][:0], split["test"] = ["a_0.jpg", "a_1.jpg"], paths[18:20] + paths[38:]
    pool = set(split["train"]) | set(split["val"])
    cuts = [levers.fold_split(split, index, 3, f) for f in range(3)]
    assert sum({"a_0.jpg", "a_1.jpg"} <= set(c["val"]) for c in cuts) == 1


def test_lever_study_cross_validation_gives_every_fold_its_own_teacher(smoke_run, tmp_path):
    """--folds K --pipeline: the default recipe runs whole on each fold (its own split.json and teacher),
    each lever starts from that fold's run, and LEVERS.md pools validation over every train + val image."""
    from pathlib import Path

    out, _, _ = smoke_run
    levers = tmp_path / "cv"
    script_path = Path(__file__).parents[1] / "scripts" / "levers.py"
    args = [sys.executable, str(script_path), "--base", str(out), "--out", str(levers), "--folds", "2"]
    refused = subprocess.run(args, capture_output=True, text=True)  # no --pipeline
    assert refused.returncode != 0 and "--pipeline" in refused.stderr and not levers.exists()
    refused = subprocess.run([*args, "--pipeline", "--seeds", "0"], capture_output=True, text=True)
    assert refused.returncode != 0 and "--seeds" in refused.stderr and not levers.exists()
    args += ["--pipeline", "--lever", "ms3=deploy.min_speedup=3"]
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    base = json.loads((out / "split.json").read_text())
    folds = [levers / "default" / f"f{f}" for f in range(2)]
    cuts = [json.loads((f / "split.json").read_text()) for f in folds]
    assert [c["fold"] for c in cuts] == [{"k": 2, "index": 0}, {"k": 2, "index": 1}]  # kept by slimvit run
    assert cuts[0]["val"] == cuts[1]["train"] and cuts[1]["val"] == cuts[0]["train"]
    assert sorted(cuts[0]["val"] + cuts[1]["val"]) == sorted(base["train"] + base["val"])
    assert cuts[0]["test"] == base["test"]
    described = json.loads((folds[0] / "data.json").read_text())["split"]
    assert described["val"] == len(cuts[0]["val"]) and described["train"] == len(cuts[0]["train"])
    teacher = Path("teacher") / "model.safetensors"
    assert (folds[0] / teacher).read_bytes() != (out / teacher).read_bytes()  # trained on the fold
    assert (levers / "ms3" / "f1" / teacher).read_bytes() == (folds[1] / teacher).read_bytes()
    table = (levers / "LEVERS.md").read_text()
    assert "--folds 2" in table and "each fold its own teacher" in table
    assert f"validation {len(base['train']) + len(base['val'])}" in table  # every train + val image once
    rows = [line for line in table.splitlines() if line.startswith("| ms3 |")]
    assert len(rows) == 3 and "p=" in rows[1]  # student, deployed, shapes: paired with the default
    assert subprocess.run(args, capture_output=True).returncode == 0  # resumable: only checks
    assert (levers / "LEVERS.md").read_text() == table
    # a study cut short reports the folds every recipe finished, and says so
    (levers / "ms3" / "f1" / "deploy" / "deploy.json").unlink()
    r = subprocess.run([*args, "--report-only"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    table = (levers / "LEVERS.md").read_text()
    assert "1 of the 2 folds finished so far" in table and f"validation {len(cuts[0]['val'])}," in table


def test_lever_table_keeps_a_run_that_deployed_nothing_out_of_the_pairs_and_says_so():
    """A fold where the deploy rule found no candidate is the recipe's verdict there, not a model: the
    deployed models are pooled and paired over the folds where every recipe deployed one, and the table
    names the fold that deployed nothing."""
    import numpy as np

    levers = script("levers")
    right = np.array([True] * 9 + [False])

    def model(hits: np.ndarray) -> dict:
        return {
            "label": "r0.5-d6",
            "val": hits,
            "test": hits,
            "steps": [hits] * 5,
            "compressed": True,
            "minutes": 1.0,
        }

    nothing = {
        "label": "nothing deployed",
        "val": None,
        "test": None,
        "steps": None,
        "compressed": False,
        "minutes": 1.0,
    }
    runs = {
        "default": [model(right), nothing, model(right)],
        "long": [model(right), model(~right), model(right)],
    }
    lines = levers.deployed_table(runs, {n: [right] * 3 for n in runs}, "fold")
    rows = {
        line.split(" | ")[0]: line
        for line in lines
        if line.startswith("| default") or line.startswith("| long")
    }
    assert "90.00 / - / 90.00" in rows["| default"] and "nothing deployed" in rows["| default"]
    assert "90.00 / 10.00 / 90.00" in rows["| long"]
    # pooled over folds 0 and 2 only: 18 of 20, and the same images as the default's (no discordant pair)
    assert rows["| long"].count("90.00 (") == 2 and "+0.00 (0/0, p=1)" in rows["| long"]
    assert lines[-1].startswith(
        "Nothing compressed deployed (no compression met the deploy rule: nothing, or"
    )
    assert "in default: fold 1." in lines[-1]
    assert "(0, 2)" in lines[-1]


def test_epochs_script_evaluates_the_kept_and_the_last_epoch(smoke_run):
    """scripts/epochs.py: the kept student is the one the run evaluated (its test accuracy is eval.json's), and
    the last epoch's weights come from checkpoint.pt (the smoke student trains one epoch: the same model)."""
    out, _, _ = smoke_run
    epochs = script("epochs")
    c = epochs.kept_and_last(out)
    evaluated = json.loads((out / "student" / "eval.json").read_text())["accuracy"]
    assert abs(c["test"]["kept"].mean() - evaluated) < 1e-9 and len(c["val"]["kept"]) > 0
    for split in epochs.SPLITS:
        assert np.array_equal(c[split]["kept"], c[split]["last"])
    lines = epochs.table([out, out], [c, c])
    assert lines[-1].startswith("| pooled |") and "+0.00 (0/0, p=1)" in lines[-1] and len(lines) == 5


def test_epoch_rules_score_each_validation_image_by_an_epoch_chosen_without_it():
    """scripts/epoch_rules.py: a rule picks as training does (the window, then balanced accuracy, accuracy,
    lower loss, the earliest of ties), and its split-halves score reads each half with the epoch chosen on
    the other. Epoch 1 is right on one half only, epoch 2 on the other only, epoch 3 on all but one image of
    each class in each half: chosen on a half, epochs 1 and 2 look perfect and are wrong on every image they did not see."""
    rules = script("epoch_rules")
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    a = rules.halves(labels)
    assert a.sum() == 4 and a[:4].sum() == 2 and np.array_equal(a, rules.halves(labels))

    def epoch(right: np.ndarray, margin: float = 1.0) -> np.ndarray:
        """One-hot logits, `margin` on the images it gets right."""
        pred = np.where(right, labels, 1 - labels)
        return np.eye(2)[pred] * np.where(right, margin, 1.0)[:, None]

    miss = np.zeros(8, dtype=bool)
    miss[[np.flatnonzero(h & (labels == c))[0] for h in (a, ~a) for c in (0, 1)]] = True
    val = np.stack([epoch(a), epoch(~a), epoch(~miss), epoch(~miss, 2.0), epoch(~miss, 2.0)])
    z = {"val": val, "test": np.stack([epoch(np.ones(8, dtype=bool))] * 5)}
    assert rules.pick(val, labels, 0) == 4  # all tie on accuracy; 4 and 5 have the lower loss, 4 first
    assert rules.pick(val[:, a], labels[a], 0) == 1 and rules.pick(val[:, ~a], labels[~a], 0) == 2
    s = rules.score(z, labels, labels, 0.0)
    assert s["epoch"] == 4 and not s["val_half"].any() and s["val_chosen"].mean() == 0.5
    late = rules.score(z, labels, labels, 0.5)  # epochs 3 to 5 compete: half of each half either way
    assert late["epoch"] == 4 and late["val_half"].mean() == 0.5
    assert rules.score(z, labels, labels, 1.0)["epoch"] == 5


def test_epoch_rules_study_trains_once_and_reads_the_kept_epoch(smoke_run, tmp_path):
    """The study's student keeps every epoch's logits; the epoch its rule picks is the one training kept,
    and that epoch's test logits give eval.json's accuracy."""
    out, _, _ = smoke_run
    rules = script("epoch_rules")
    folder = tmp_path / "s1"
    rules.train(out, folder, 1)
    assert rules.finished(folder) and (folder / "teacher" / "eval.json").exists()
    z = rules.load_run(folder)
    kept = json.loads((folder / "student" / "train.json").read_text())["best_epoch"]
    evaluated = json.loads((folder / "student" / "eval.json").read_text())["accuracy"]
    assert rules.score(z, z["val_labels"], z["test_labels"], 0.0)["epoch"] == kept
    assert abs((z["test"][kept - 1].argmax(1) == z["test_labels"]).mean() - evaluated) < 1e-9
    lines = rules.table({"smoke": [folder]}, [0.0, 1.0])
    assert len(lines) == 4 and not any("Note:" in line for line in lines)
    assert "select_from=1" in lines[-1] and "+0.00 (0/0, p=1)" in lines[-1]


def test_finetune_study_reads_the_recovering_fine_tunes_epoch_from_one_training(smoke_run, tmp_path):
    """scripts/finetune_levers.py runs a fine-tune for all its epochs and keeps every epoch's logits; the
    epoch the base run's rule (`prune.recover`, `prune.select_from`) keeps from them is the one a recovering
    fine-tune keeps (the same seed trains the same epochs), and its test logits give that model's accuracy."""
    import shutil

    from slimvit.config import read_config
    from slimvit.data import load_data
    from slimvit.prune import run_prune

    out, _, _ = smoke_run
    study = script("finetune_levers")
    keys = ["prune.finetune_epochs=4"]
    folder = tmp_path / "study"
    study.finetune(out, folder, keys)
    assert study.finished(folder)
    assert not read_config(folder / "config.yaml").prune.recover  # every epoch trained
    real = tmp_path / "real"
    shutil.copytree(out, real)
    cfg = read_config(real / "config.yaml", keys)
    assert cfg.prune.recover
    run_prune(cfg, real, load_data(cfg.data, real, progress=False))
    ft = json.loads((real / "pruned" / "prune.json").read_text())["finetune"]
    run = study.Run(out, folder)
    assert run.epochs >= ft["epochs_run"] and run.epochs == ft["epochs"]
    kept = run.keep(run.own_rule)
    assert kept == ft["best_epoch"]
    accuracy = json.loads((real / "pruned" / "eval.json").read_text())["accuracy"]
    assert abs(run.scored(kept)["test_right"].mean() - accuracy) < 1e-9
    assert run.keep(1.0) == run.epochs  # the last-epoch rule keeps the last
    assert run.split_halves(0.0).shape == run.labels["val"].shape


def test_tta_study_scores_the_deployed_file_as_the_bench_did_and_counts_a_copy_once(smoke_run, tmp_path):
    """scripts/tta.py: without TTA its per-image answers are the bench's for the deployed file (the same
    images, preprocessing and first view); a copied run folder pools as one model, not two."""
    import shutil

    import numpy as np

    from slimvit.config import read_config
    from slimvit.data import load_data

    out, _, _ = smoke_run
    tta = script("tta")
    res = tta.score_run(out)
    key = json.loads((out / "deploy" / "deploy.json").read_text())["key"]
    bench = np.load(out / "bench_logits.npz")
    data = load_data(read_config(out / "config.yaml").data, out, progress=False)
    for split in ("val", "test"):
        _, y = data.arrays(split)
        assert res["models"]["deployed"][split]["plain"] == (bench[f"{split}|{key}"].argmax(1) == y).tolist()
        assert len(res["models"]["deployed"][split]["4"]) == len(y)
    assert set(res["latency_ms"]) == {"1", "4", "8"}
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    both = tta._pooled({"a-0": res, "b-0": tta.score_run(copy)}, ["a-0", "b-0"], "deployed", "test")
    assert both["plain"].tolist() == res["models"]["deployed"]["test"]["plain"]
