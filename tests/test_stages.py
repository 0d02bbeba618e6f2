"""The stage declaration and the staleness check, on a generated dataset with stand-in stages (seconds).

The stand-ins write every file their stage declares, with contents that depend only on what the
stage reads (files and config keys), so a stage redone on unchanged inputs writes the same bytes.
"""

import dataclasses
import json
import logging
import os
from types import SimpleNamespace

import pytest
from conftest import make_imagefolder

from slimvit import cli, eta, layout, pipeline, stages
from slimvit.config import Config, load_config
from slimvit.errors import ConfigError, ModelError
from slimvit.manifest import Fingerprints, Manifest, assess, flat_config

ALL = ["data", "teacher", "distill", "ablation", "prune", "export", "quantize", "bench", "deploy", "report"]
"""The stages the smoke preset runs (no sweep)."""


# --------------------------------------------------------------------------- the declaration


def test_every_read_has_an_earlier_writer_and_no_file_has_two():
    for stage in stages.STAGES[1:]:
        required = [r for r in stage.reads if not r.startswith("?")]
        assert required, stage.name
        for r in stage.reads:
            writers = [
                p.name for p in stages.STAGES if any(stages.overlap(r.lstrip("?"), w) for w in p.writes)
            ]
            assert writers, f"{stage.name} reads {r}, which no stage writes"
            assert all(stages.STAGE_NAMES.index(w) < stages.STAGE_NAMES.index(stage.name) for w in writers), r
    for i, a in enumerate(stages.STAGES):
        for b in stages.STAGES[i + 1 :]:
            both = [(x, y) for x in a.writes for y in b.writes if stages.overlap(x, y)]
            assert not both, f"{a.name} and {b.name} both write {both[0]}"


def test_every_config_key_is_an_input_of_some_stage_and_the_report_quotes_all():
    keys = flat_config(Config())
    assert "data.path" not in keys  # where the data lives is not an input; its content is
    for key in keys:
        assert stages.get_stage("report").depends_on(key), key
    assert [s.name for s in stages.stages_for_keys(["quantize.optimize"])] == ["export", "report"]
    assert [s.name for s in stages.stages_for_keys(["train.epochs"])] == ["distill", "ablation", "report"]
    assert [s.name for s in stages.stages_for_keys(["prune.sweep"])] == ["sweep", "report"]
    assert [s.name for s in stages.stages_for_keys(["prune.depths"])] == ["sweep", "report"]
    assert [s.name for s in stages.stages_for_keys(["train.select_from"])] == [
        "distill",
        "ablation",
        "report",
    ]
    # progressive resizing changes the teacher and the students; the fine-tunes train at full size
    for key in ("train.resize_from", "train.resize_until"):
        assert [s.name for s in stages.stages_for_keys([key])] == [
            "teacher",
            "distill",
            "ablation",
            "report",
        ]


def test_the_files_stages_name_fall_under_what_their_stage_declares():
    """Export, quantize and the sweep name their files through layout.py; each name must be one their
    declaration covers, or the fingerprints would miss it (and a reset would leave it behind)."""
    from slimvit.quantize import MODES

    def declared(stage: str, rel: str) -> bool:
        return any(stages.overlap(rel, w) for w in stages.get_stage(stage).writes)

    for model in ("teacher", "pruned", layout.sweep_dir(0.5), layout.sweep_dir(0.3, 6)):
        assert declared("export", layout.onnx_file(model, "fp32")), model
        for mode in MODES:
            assert declared("quantize", layout.onnx_file(model, mode)), (model, mode)
    point = layout.sweep_dir(0.3, 6)
    for name in (layout.WEIGHTS, layout.SPEC, layout.PRUNE, layout.EVAL):
        assert declared("sweep", layout.in_dir(point, name)), name
    assert layout.candidates("/nonexistent") == [layout.PRUNED]


def test_cli_subcommands_come_from_the_declaration():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for stage in stages.STAGES:
        name = stage.command or stage.name
        assert name in sub.choices, name
        if stage.flags:
            opts = sub.choices[name]._option_string_actions
            assert all(f"--{f}" in opts for f in stage.flags), stage.name
    assert stages.get_stage("sweep").cli == "slimvit prune --sweep"
    assert stages.get_stage("ablation").cli == "slimvit distill"


# --------------------------------------------------------------------------- staleness


def _stand_in(stage, calls, noise):
    def run(cfg, run_dir, data, resume=False, **_):
        calls.append(stage.name)
        fp = Fingerprints(run_dir, cfg)
        config = {k: v for k, v in fp.config.items() if stage.depends_on(k)}
        text = json.dumps([stage.name, fp.files(stage.reads), config, noise and len(calls)], sort_keys=True)
        for rel in stage.writes:
            if not any(c in rel for c in "*?["):
                (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                (run_dir / rel).write_text(text)
        return {}

    return run


@pytest.fixture
def stand_ins(monkeypatch, tmp_path):
    """Stand-in stages (the data stage is real), a generated dataset and a `run(cfg=None)` helper."""
    calls: list[str] = []
    noise: list = []  # non-empty: a redone stage writes different bytes (as retraining does)
    replaced = tuple(
        s if s.name == "data" else dataclasses.replace(s, run=_stand_in(s, calls, noise))
        for s in stages.STAGES
    )
    monkeypatch.setattr(stages, "STAGES", replaced)
    monkeypatch.setattr(eta, "measure_step", lambda *a, **k: 0.01)  # no model is trained here
    ds = make_imagefolder(tmp_path / "ds", per_class=10, size=32)
    run_dir = tmp_path / "run"
    cfg = load_config("smoke", overrides=[f"data.path={ds}"])

    def run(c=None):
        calls.clear()
        pipeline.run_pipeline(c or cfg, run_dir)
        return list(calls)

    return SimpleNamespace(run=run, calls=calls, cfg=cfg, run_dir=run_dir, ds=ds, noise=noise)


def _redone(caplog) -> dict[str, str]:
    """stage -> the reason logged for redoing it."""
    out = {}
    for r in caplog.records:
        msg = r.getMessage()
        if ": redoing it: " in msg:
            head, why = msg.split(": redoing it: ", 1)
            out[head.split("] ")[-1]] = why
    return out


def test_each_change_redoes_exactly_the_stages_that_read_it(stand_ins, caplog):
    s, run_dir = stand_ins, stand_ins.run_dir
    caplog.set_level(logging.INFO, logger="slimvit")
    assert s.run() == ALL[1:]  # the data stage is real: not a stand-in call
    assert s.run() == []

    # an artifact replaced by hand: its writer is redone, then everything built from it
    (run_dir / "student" / "model.safetensors").write_text("another model")
    caplog.clear()
    s.noise.append(1)
    assert s.run() == ["distill", "prune", "export", "quantize", "bench", "deploy", "report"]
    s.noise.clear()
    why = _redone(caplog)
    assert why["distill"] == "student/model.safetensors was changed since distill wrote it"
    assert why["prune"].startswith("student/model.json changed (and 2 more)")  # student/* rewritten

    # a config key: the stages that depend on it and their readers (quantize.optimize: export onwards)
    caplog.clear()
    changed = dataclasses.replace(s.cfg, quantize=dataclasses.replace(s.cfg.quantize, optimize=False))
    assert s.run(changed) == ["export", "quantize", "bench", "deploy", "report"]
    assert _redone(caplog)["export"] == "config quantize.optimize: True -> False"
    assert _redone(caplog)["quantize"].startswith("onnx/export.json changed")
    assert s.run(changed) == []

    # split.json removed: the data stage makes the same split again, nobody else is touched
    (run_dir / "split.json").unlink()
    caplog.clear()
    assert s.run(changed) == [] and _redone(caplog) == {"data": "split.json is missing"}

    # the dataset changed: a new split, so every stage
    make_imagefolder(s.ds, classes=("a",), per_class=12, size=32)  # two more images of class a
    caplog.clear()
    assert s.run(changed) == ALL[1:]
    assert _redone(caplog)["data"] == "the dataset changed (2 images added, 0 removed)"
    assert _redone(caplog)["teacher"] == "split.json changed"


def test_the_estimate_counts_old_work_only_of_stages_that_keep_it(stand_ins):
    """A stage resumed keeps its epochs (the estimate counts the rest); a stage redone, or one whose input an
    earlier stage of this run rewrites, starts over however much of its old work lies in the folder (a
    lever's copied run: the estimate had found the old sweep's points and left the sweep out)."""
    s = stand_ins
    s.run()

    def keeps(cfg):
        manifest, fp = Manifest(s.run_dir), Fingerprints(s.run_dir, cfg)
        return pipeline._keeps(
            stages.enabled_stages(cfg), manifest, fp, pipeline._plan(stages.enabled_stages(cfg), manifest, fp)
        )

    more_epochs = dataclasses.replace(s.cfg, train=dataclasses.replace(s.cfg.train, epochs=3))
    assert keeps(more_epochs) == set()  # distill redone: nothing downstream keeps its old work either
    manifest = Manifest(s.run_dir)
    manifest.entry("distill")["status"] = "interrupted"
    manifest.save()
    assert keeps(s.cfg) == {"distill"}  # resumed
    manifest.entry("prune")["status"] = "interrupted"
    manifest.save()
    assert keeps(s.cfg) == {"distill"}  # prune was cut short too, but reads the student distill will rewrite


def test_new_budgets_redo_only_the_deploy_stage_and_the_report(stand_ins):
    """`slimvit deploy --budget-ms ...` re-chooses from bench.json: nothing is re-timed or retrained."""
    s = stand_ins
    s.run()
    budget = dataclasses.replace(s.cfg, deploy=dataclasses.replace(s.cfg.deploy, budget_ms=5.0))
    assert s.run(budget) == ["deploy", "report"]  # the report reads deploy.json and quotes the config
    assert s.run(budget) == []


def test_interrupted_stage_resumes_unless_its_inputs_changed(stand_ins):
    s = stand_ins
    s.run()
    manifest = Manifest(s.run_dir)
    fp = Fingerprints(s.run_dir, s.cfg)
    manifest.entry("distill")["status"] = "interrupted"
    assert assess(stages.get_stage("distill"), manifest, fp) == ("resume", "interrupted before")
    (s.run_dir / "teacher" / "model.json").write_text("{}")  # and the teacher changes meanwhile
    verdict, why = assess(stages.get_stage("distill"), manifest, fp)
    assert (verdict, why) == ("redo", "teacher/model.json changed")  # its checkpoint is of the old teacher


def test_single_stage_force_redoes_only_that_stage_and_refuses_stale_inputs(stand_ins):
    s = stand_ins
    s.run()
    args = SimpleNamespace(force=True, resume=False, sweep=None)
    s.calls.clear()
    pipeline.run_single("teacher", s.cfg, s.run_dir, args)
    assert s.calls == ["teacher"]
    assert s.run() == []  # same inputs, same bytes: nothing read a change
    (s.run_dir / "teacher" / "model.safetensors").write_text("retrained elsewhere")
    with pytest.raises(ModelError) as e:
        pipeline.run_single("prune", s.cfg, s.run_dir, SimpleNamespace(force=False, resume=False, sweep=None))
    msg = str(e.value)
    assert msg.startswith(
        "prune reads the outputs of teacher (out of date: teacher/model.safetensors was changed"
    )
    assert "distill (out of date: teacher/model.safetensors changed)" in msg
    assert msg.endswith("run `slimvit teacher`, `slimvit distill` (or `slimvit run`) first")


def test_manifest_without_fingerprints_is_adopted_unless_stale_by_time(stand_ins, caplog):
    """A run folder from an older slimvit: finished stages are kept, and their inputs recorded from then
    on; a stage whose outputs are older than a file it reads is redone."""
    s = stand_ins
    s.run()
    manifest = json.loads((s.run_dir / "manifest.json").read_text())
    for name, entry in manifest["stages"].items():
        entry.pop("inputs")
        entry["outputs"] = list(stages.get_stage(name).outputs)  # the old format
    (s.run_dir / "manifest.json").write_text(json.dumps(manifest))
    later = (s.run_dir / "student" / "eval.json").stat().st_mtime + 60
    os.utime(s.run_dir / "teacher" / "model.safetensors", (later, later))  # retrained after the student
    caplog.set_level(logging.INFO, logger="slimvit")
    assert s.run() == ["distill", "prune", "export", "quantize", "bench", "deploy", "report"]
    assert "distill: teacher/model.safetensors is newer than its outputs; it will be redone" in caplog.text
    assert "quantize: built from prune, which will be redone; it will be redone too" in caplog.text
    assert "teacher: finished before its inputs were recorded; recorded them now" in caplog.text
    assert s.run() == []


def test_unreadable_manifest_is_one_line_naming_it(tmp_path):
    (tmp_path / "manifest.json").write_text('{"stages": {"data": {"sta')
    with pytest.raises(ConfigError) as e:
        Manifest(tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "manifest.json") in msg and "delete it and run again" in msg and "\n" not in msg


def test_time_estimate_from_step_times_corrected_as_stages_finish(monkeypatch):
    """Training stages: epochs x steps x the step time measured here; then scaled by measured / estimated."""
    from test_train import synthetic_data

    monkeypatch.setattr(
        eta, "measure_step", lambda spec, tcfg, batch, train=True, steps=1: 2.0 if train else 0.5
    )
    cfg = load_config("smoke", overrides=["train.teacher_epochs=3", "train.epochs=4", "train.batch_size=8"])
    data = synthetic_data(n_per_class=20)  # 36 training images: 4 steps of 8; 12 validation images
    est = eta.Estimate(cfg, data, ["teacher", "distill", "ablation", "export"], {"export": 30.0})
    val = 256 / 8  # validation runs 256 images at a time, at a third of a step each
    assert est.seconds["teacher"] == pytest.approx(3 * (4 * 2.0 + val * 2.0 / 3))
    # the teacher's logits cached once over the 8 flips/rotations of the 36 images (forwards at 0.5 a batch),
    # no teacher in the steps; live logits run the teacher in every step instead
    assert est.seconds["distill"] == pytest.approx(4 * (4 * 2.0 + val * 2.0 / 3) + 8 * 36 / 8 * 0.5)
    live = load_config(
        "smoke", overrides=["train.epochs=4", "train.batch_size=8", "distill.teacher_logits=live"]
    )
    est_live = eta.Estimate(live, data, ["distill"], {})
    assert est_live.seconds["distill"] == pytest.approx(4 * (4 * (2.0 + 0.5) + val * 2.0 / 3))
    assert est.seconds["ablation"] == pytest.approx(4 * (4 * 2.0 + val * 2.0 / 3))
    assert est.seconds["export"] == 30.0  # from its last run in this folder
    est.finished("teacher", est.seconds["teacher"] / 2)  # this machine is twice as fast as measured
    left = est.seconds["distill"] / 2 + est.seconds["ablation"] / 2 + 30.0
    assert est.line(parts=False) == f"about {eta.fmt_duration(left)} to go"
    assert est.line().startswith(f"about {eta.fmt_duration(left)} to go (distill ")
    assert eta.fmt_duration(3725) == "1h02m" and eta.fmt_duration(65) == "1m05s"
    # a stage other than training without a last run in this folder: named as such (the step times of the
    # training stages were measured on this machine, so "this machine" would not be what is missing)
    fresh = eta.Estimate(cfg, data, ["distill", "export", "bench"], {})
    assert fresh.line().endswith("; plus export, bench, not timed in this run folder yet)")
    assert eta.Estimate(cfg, data, ["export"], {}).line() == (
        "time to go not estimated: export not timed in this run folder yet"
    )


def test_time_estimate_counts_the_epochs_a_small_split_is_raised_to(monkeypatch):
    """train.steps_floor_images gives a small split more epochs; the estimate must count them."""
    from test_train import synthetic_data

    monkeypatch.setattr(
        eta, "measure_step", lambda spec, tcfg, batch, train=True, steps=1: 2.0 if train else 0.5
    )
    overrides = ["train.teacher_epochs=3", "train.batch_size=8"]
    data = synthetic_data(n_per_class=20)  # 36 training images
    plain = eta.Estimate(load_config("smoke", overrides=overrides), data, ["teacher"], {})
    floored = load_config("smoke", overrides=[*overrides, "train.steps_floor_images=72"])
    est = eta.Estimate(floored, data, ["teacher"], {})
    assert est.seconds["teacher"] == pytest.approx(2 * plain.seconds["teacher"])  # 6 epochs, not 3


def test_time_estimate_counts_small_early_epochs_at_their_pixels(monkeypatch):
    """train.resize_from: the teacher's and the student's early epochs train on fewer pixels; the
    estimate counts each at its share of a full-size step, validation at full size."""
    from test_train import synthetic_data

    monkeypatch.setattr(
        eta, "measure_step", lambda spec, tcfg, batch, train=True, steps=1: 2.0 if train else 0.5
    )
    overrides = [
        "train.teacher_epochs=4",
        "train.batch_size=8",
        "train.resize_from=16",
        "train.resize_until=0.5",
    ]
    data = synthetic_data(n_per_class=20)  # 36 training images: 4 steps of 8; 32 px
    est = eta.Estimate(load_config("smoke", overrides=overrides), data, ["teacher", "prune"], {})
    val = 256 / 8 * 2.0 / 3
    small = 1 / 3 + 2 / 3 * 0.25  # a step at 16 of 32 px: a third of a full one plus two thirds of its pixels
    # epochs at 16, 16, 32 and 32 px
    assert est.seconds["teacher"] == pytest.approx((small + small + 1 + 1) * 4 * 2.0 + 4 * val)
    full = eta.Estimate(load_config("smoke", overrides=overrides[:2]), data, ["prune"], {})
    assert est.seconds["prune"] == pytest.approx(full.seconds["prune"])  # fine-tunes stay at full size


def test_time_estimate_of_a_resumed_stage_counts_the_epochs_already_done(monkeypatch, tmp_path):
    """A teacher checkpointed after 2 of its 4 epochs resumes there: the estimate is the 2 epochs left; a
    fine-tune's estimate includes its comparison with the student on the validation views; finished sweep
    points are not counted again."""
    import json

    from test_train import synthetic_data

    from slimvit.layout import CHECKPOINT

    monkeypatch.setattr(
        eta, "measure_step", lambda spec, tcfg, batch, train=True, steps=1: 2.0 if train else 0.5
    )
    cfg = load_config("smoke", overrides=["train.teacher_epochs=4", "train.batch_size=8"])
    data = synthetic_data(n_per_class=20)  # 36 training images: 4 steps of 8; 12 validation images
    fresh = eta.Estimate(cfg, data, ["teacher"], {}, tmp_path)
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / CHECKPOINT).write_bytes(b"x")
    (tmp_path / "teacher" / "metrics.jsonl").write_text(
        "".join(json.dumps({"epoch": e}) + "\n" for e in (1, 2))
    )
    resumed = eta.Estimate(cfg, data, ["teacher"], {}, tmp_path)
    assert resumed.seconds["teacher"] == pytest.approx(fresh.seconds["teacher"] / 2)
    assert "teacher" in resumed.line() and "from epoch 3" in resumed.line()
    # a fine-tune: training, validation, and the validation views against the student (4 x 12 = 48 images);
    # the pruned model (r=0.2 of both sides of each matrix: 0.64 of the student's work) trains and validates,
    # the student it distils from runs a whole forward each step
    ft = eta.Estimate(cfg, data, ["prune"], {}, None)
    val, fid = 256 / 8, 256 / 8 + 1
    assert ft.seconds["prune"] == pytest.approx(4 * (2.0 * 0.64 + 2.0 / 3) + (val + fid) * 0.64 * 2.0 / 3)
    sweep_cfg = load_config(
        "smoke", overrides=["prune.sweep=[0.2,0.3]", "prune.depths=[1]", "train.batch_size=8"]
    )
    all_points = eta.Estimate(sweep_cfg, data, ["sweep"], {}, tmp_path).seconds["sweep"]
    for name in ("sweep/r0.3", "sweep/r0.3-d1"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "prune.json").write_text("{}")
        (tmp_path / name / "eval.json").write_text("{}")
    left = eta.Estimate(sweep_cfg, data, ["sweep"], {}, tmp_path).seconds["sweep"]

    def epoch(share: float) -> float:
        return 4 * (2.0 * share + 2.0 / 3) + (val + fid) * share * 2.0 / 3

    # 3 points (r0.2 is the main pruned model), each at its share of the student's work with the student's
    # whole forward: r0.2 cut to 1 of the smoke student's 2 blocks 0.32, r0.3 0.49, r0.3-d1 0.245; 2 done
    epochs = sweep_cfg.prune.sweep_epochs
    assert all_points == pytest.approx(epochs * (epoch(0.32) + epoch(0.49) + epoch(0.245)))
    assert left == pytest.approx(epochs * epoch(0.32))
    # a stage that starts over (not in `keeps`) counts all of its work, whatever the folder holds
    assert eta.Estimate(sweep_cfg, data, ["sweep"], {}, tmp_path, set()).seconds["sweep"] == all_points
    assert (
        eta.Estimate(cfg, data, ["teacher"], {}, tmp_path, set()).seconds["teacher"]
        == fresh.seconds["teacher"]
    )


def test_compute_share_of_a_pruned_model():
    """Widths pruned on both sides of each matrix scale the work by (1 - r)^2, on one side by (1 - r); a cut
    to d of D blocks by d / D; a model without blocks (a CNN student) by width alone."""
    assert eta.compute_share(0.0, None, 12) == 1.0
    assert eta.compute_share(0.5, None, 12) == pytest.approx(0.25)
    assert eta.compute_share(0.5, 6, 12) == pytest.approx(0.125)
    assert eta.compute_share(0.5, None, 12, prune_embed=False) == pytest.approx(0.5)
    assert eta.compute_share(0.2, 6, None) == pytest.approx(0.64)
