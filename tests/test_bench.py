"""Bench's label-free fidelity (agreement with the student on validation views and unlabeled images) and
the deploy choice that reads it; bench's rows and bench.md."""

import numpy as np
import pytest
from PIL import Image
from test_deploy import STUDENT, _row

from slimvit import bench
from slimvit.bench import Variant
from slimvit.config import Config
from slimvit.deploy import choose, saturated
from slimvit.errors import DataError
from slimvit.fidelity import check_unlabeled, fidelity, read_unlabeled, val_views


class _Spec:
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)


class _Data:
    """Validation images that are dark in green; the labels follow the red channel."""

    img_size = 16

    def __init__(self):
        rng = np.random.default_rng(0)
        self.images = np.zeros((12, 16, 16, 3), np.uint8)
        self.labels = np.arange(12) % 2
        self.images[..., 0] = (self.labels * 200 + 20)[:, None, None] + rng.integers(0, 20, (12, 16, 16))

    def arrays(self, split):
        return self.images, self.labels


def _red(x):  # (N, 3, H, W) normalised -> logits: class 1 where red is bright
    m = x[:, 0].mean((1, 2))
    return np.stack([-m, m], 1)


def _variant(stage, predict, reference=False):
    return Variant(stage, "onnxruntime", "fp32", f"{stage}.onnx", 1, 1, predict, reference=reference)


def _green_flips(x):  # agrees with _red except on images with a bright green channel
    z = _red(x)
    return np.where((x[:, 1].mean((1, 2)) > 0)[:, None], z[:, ::-1], z)


def _unlabeled(tmp_path, n=10):
    d = tmp_path / "prod"
    d.mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        a = np.zeros((20, 20, 3), np.uint8)
        a[..., 0] = rng.integers(0, 255)
        a[..., 1] = 255
        Image.fromarray(a).save(d / f"{i}.png")
    return d


def _fid(monkeypatch, tmp_path, unlabeled, variants=None):
    import dataclasses

    monkeypatch.setattr(
        bench, "read_spec", lambda _p: _Spec
    )  # no model.json here: every variant normalises alike
    cfg = Config()
    cfg = dataclasses.replace(cfg, bench=dataclasses.replace(cfg.bench, unlabeled=unlabeled))
    variants = variants or [
        _variant("student", _red, reference=True),
        _variant("pruned", lambda x: 0.5 * _red(x)),
        _variant("sweep/r0.5", _green_flips),
    ]
    return fidelity(variants, _Data(), cfg, lambda x: bench.logits_by_variant(tmp_path, variants, x))


def test_views_match_the_training_views():
    import torch

    from slimvit.recipe import views

    x = np.random.default_rng(0).integers(0, 255, (3, 5, 5, 3), dtype=np.uint8)
    ours = val_views(x, True, True)
    theirs = torch.cat(views(torch.from_numpy(x).permute(0, 3, 1, 2), True, True)).permute(0, 2, 3, 1)
    assert ours.shape == (24, 5, 5, 3) and np.array_equal(ours, theirs.numpy())
    four = val_views(x, True, True, limit=4)  # as the fine-tunes compare: the image, 180 degrees, 2 mirrors
    assert np.array_equal(four, np.concatenate([ours[i * 3 : (i + 1) * 3] for i in (0, 2, 4, 6)]))


def test_fidelity_reuses_the_validation_logits_for_the_views_first_view(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "read_spec", lambda _p: _Spec)

    def corner(x):  # a model that sees the orientation: the red of the top-left pixel against the mean
        z = x[:, 0, 0, 0] - x[:, 0].mean((1, 2))
        return np.stack([-z, z], 1)

    variants = [
        _variant("student", _red, reference=True),
        _variant("pruned", corner),
        _variant("sweep/r0.5", _green_flips),
    ]
    images = _Data().arrays("val")[0]
    seen = []

    def logits_of(x):
        seen.append(len(x))
        return bench.logits_by_variant(tmp_path, variants, x)

    cfg = Config()
    full = fidelity(variants, _Data(), cfg, logits_of)
    reused = fidelity(variants, _Data(), cfg, logits_of, val_logits=logits_of(images))
    # the bench's accuracies computed the validation images once: the fidelity pass adds only the other views
    assert seen == [4 * len(images), len(images), 3 * len(images)]
    assert reused == full


def test_a_candidate_that_disagrees_on_unlabeled_images_loses_at_equal_validation_accuracy(
    monkeypatch, tmp_path
):
    rows_of = {
        "pruned": _row(0.2, "int8-dynamic", 2.0, 2.0, 1.0, 1.0, key="pruned/onnxruntime/fp32"),
        "sweep/r0.5": _row(0.5, "int8-dynamic", 1.0, 1.0, 1.0, 1.0, key="sweep/r0.5/onnxruntime/fp32"),
    }
    student = {**STUDENT, "val_accuracy": 1.0}

    # validation views only: both candidates name the student's class everywhere; validation (both 100%)
    # cannot see what the deeper cut cost, so the less compressed one is deployed
    fid, source = _fid(monkeypatch, tmp_path, None)
    assert source["val_views"] == 4 * 12 and source["unlabeled"] is None
    assert (
        fid["pruned/onnxruntime/fp32"]["agreement"] == 1.0 == fid["sweep/r0.5/onnxruntime/fp32"]["agreement"]
    )
    assert fid["student/onnxruntime/fp32"]["agreement_kl"] == pytest.approx(0.0, abs=1e-12)
    rows = [student, *({**r, **fid[r["key"]]} for r in rows_of.values())]
    chosen, why = choose(rows)
    assert chosen["stage"] == "pruned" and chosen["validation_saturated"]
    assert "least compressed" in why and "cannot tell them apart" in why

    # with production images the fast one is seen to disagree with the student, and loses
    fid, source = _fid(monkeypatch, tmp_path, str(_unlabeled(tmp_path)))
    assert source["unlabeled"]["images"] == 10
    bad, good = fid["sweep/r0.5/onnxruntime/fp32"], fid["pruned/onnxruntime/fp32"]
    assert good["agreement"] == 1.0 and bad["agreement"] == pytest.approx(48 / 58)
    assert bad["agreement_kl"] > good["agreement_kl"] and bad["view_accuracy"] == 1.0
    rows = [student, *({**r, **fid[r["key"]]} for r in rows_of.values())]
    chosen, why = choose(rows)
    assert chosen["stage"] == "pruned" and chosen["validation_saturated"] and saturated(rows[1:])
    assert "cannot tell them apart" in why and "agreement with the student" in why
    # the views the agreement was measured on are named once, and the saturation said once
    assert why.count("names the student's class too") == 1 and why.count("cannot tell") == 1
    assert why.endswith("deploy the least compressed candidate that meets them")
    # a budgeted choice with no agreement floor: both fit and tie on validation; agreement breaks the tie
    assert choose(rows, budget_ms=5.0, min_agreement=0)[0]["stage"] == "pruned"
    # the same disagreement on the less compressed candidate: agreement comes before compression
    swapped = [student, {**rows[1], **bad}, {**rows[2], **good}]
    assert choose(swapped, min_agreement=0)[0]["stage"] == "sweep/r0.5"


def test_unlabeled_images_unlike_validation_are_reported_as_such(monkeypatch, tmp_path):
    from slimvit.report.overview import _shift_line

    variants = [
        _variant("student", _red, reference=True),
        _variant("teacher", _red),
        _variant("pruned", _green_flips),  # right on validation, the other class on every green image
    ]
    _, source = _fid(monkeypatch, tmp_path, str(_unlabeled(tmp_path)), variants)
    shift = source["unlabeled"]["shift"]
    assert (shift["views"], shift["images"], shift["teacher"]) == (48, 10, "teacher/onnxruntime/fp32")
    fig = shift["by_variant"]["pruned/onnxruntime/fp32"]
    assert fig["teacher_views"] == 1.0 == fig["student_views"] and fig["teacher_unlabeled"] == 0.0
    assert shift["by_variant"]["teacher/onnxruntime/fp32"]["teacher_unlabeled"] == 1.0
    run = {"bench": {"fidelity": source}}
    line = _shift_line(run, {"key": "pruned/onnxruntime/fp32"})
    assert line.startswith("- **Your 10 unlabeled images are not like the test images**: the deployed model")
    assert (
        "names the teacher's class on 0.0% of them (0.0-27.8) against 100.0% of the 48 validation views"
        in line
    )
    # the teacher deployed: compared with the student, which agrees with it everywhere
    line = _shift_line(run, {"key": "teacher/onnxruntime/fp32", "stage": "teacher"})
    assert "names the student's class on 100.0%" in line and "nothing in them suggests" in line
    assert _shift_line({"bench": {"fidelity": {"unlabeled": None}}}, {"key": "pruned/onnxruntime/fp32"}) == ""


def test_agreement_counts_the_images_where_the_teacher_agrees_with_the_student(monkeypatch, tmp_path):
    unlabeled = str(_unlabeled(tmp_path))
    variants = [
        _variant("student", _red, reference=True),
        _variant("teacher", _green_flips),  # the teacher takes the other class on the 10 unlabeled images
        _variant("pruned", _green_flips),  # as does this compression: no standard to hold it to there
        _variant("sweep/r0.5", lambda x: -_red(x)),  # the other class everywhere
    ]
    fid, source = _fid(monkeypatch, tmp_path, unlabeled, variants)
    assert source["consensus"] == {"teacher": "teacher/onnxruntime/fp32", "images": 48, "of": 58}
    assert (
        fid["pruned/onnxruntime/fp32"]["agreement"] == 1.0
        and fid["pruned/onnxruntime/fp32"]["agreement_n"] == 48
    )
    assert fid["sweep/r0.5/onnxruntime/fp32"]["agreement"] == 0.0
    teacher = fid["teacher/onnxruntime/fp32"]  # its own row: against the student on every image
    assert teacher["agreement"] == pytest.approx(48 / 58) and teacher["agreement_n"] == 58
    # without a teacher row every image counts (the unlabeled images' disagreement included)
    fid, source = _fid(monkeypatch, tmp_path, unlabeled, variants[::2])
    assert source["consensus"]["teacher"] is None and fid["pruned/onnxruntime/fp32"][
        "agreement"
    ] == pytest.approx(48 / 58)


def test_unlabeled_folder_must_hold_images(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        check_unlabeled(tmp_path / "nosuch")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="has no images"):
        check_unlabeled(tmp_path / "empty")


@pytest.mark.parametrize("command", ["run", "bench"])
def test_cli_unlabeled_missing_or_empty_is_one_line_and_exit_2(tmp_path, capsys, command):
    from slimvit.cli import main

    (tmp_path / "empty").mkdir()
    for folder in ("nosuch", "empty"):
        out = tmp_path / f"run-{folder}"
        rc = main([command, "--preset", "smoke", "--out", str(out), "--unlabeled", str(tmp_path / folder)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "--unlabeled" in err[0]
        assert not out.exists()  # refused before anything was written


def test_the_unlabeled_folder_stays_the_runs_setting(tmp_path):
    """After `slimvit run --unlabeled DIR`, a later command without the flag keeps it (not a changed config)."""
    import dataclasses

    from slimvit.config import save_config
    from slimvit.runs import unlabeled_of_run

    cfg = Config()
    save_config(
        dataclasses.replace(cfg, bench=dataclasses.replace(cfg.bench, unlabeled="/prod")),
        tmp_path / "config.yaml",
    )
    assert unlabeled_of_run(cfg, tmp_path, None, []).bench.unlabeled == "/prod"
    assert unlabeled_of_run(cfg, tmp_path, None, ["bench.unlabeled=null"]).bench.unlabeled is None
    assert unlabeled_of_run(cfg, tmp_path, "/other", []) is cfg  # --unlabeled given: the caller sets it


# --------------------------------------------------------------------------- views, rows and bench.md


@pytest.mark.parametrize(("flips", "rot90"), [(True, False), (False, True), (False, False)])
def test_views_match_the_training_views_for_every_setting(flips, rot90):
    import torch

    from slimvit.recipe import n_views, views

    x = np.random.default_rng(1).integers(0, 255, (2, 4, 4, 3), dtype=np.uint8)
    ours = val_views(x, flips, rot90)
    theirs = torch.cat(views(torch.from_numpy(x).permute(0, 3, 1, 2), flips, rot90)).permute(0, 2, 3, 1)
    assert ours.shape == (2 * n_views(flips, rot90), 4, 4, 3) and ours.flags.c_contiguous
    assert np.array_equal(ours, theirs.numpy())
    assert np.array_equal(ours[:2], x)  # the image itself comes first
    if flips:
        assert np.array_equal(ours[2:4], x[:, :, ::-1])  # then its left-right mirror


def _timed(stage="pruned", precision="fp32", runtime="onnxruntime", **kw):
    v = Variant(stage, runtime, precision, f"{stage}.onnx", 2_500_000, 3_000_000, lambda x: x, **kw)
    v.times = [1.0, 2.0, 3.0, 4.0, 100.0]
    v.batch_times = [10.0, 30.0, 20.0]
    return v


_METRICS = {
    "accuracy": 0.9,
    "accuracy_ci": [0.8, 0.95],
    "n": 60,
    "balanced_accuracy": 0.85,
    "macro_f1": 0.8765,
}


def test_row_figures_by_hand():
    v = _timed(candidate=True, ratio=0.2, portability={"portable": False, "safe_on": ["vnni"]})
    r = bench.row(
        v, _METRICS, 1.25, batch=8, val={**_METRICS, "accuracy": 1.0, "n": 18}, fid={"agreement": 0.97}
    )
    assert set(bench.ROW_KEYS) <= set(r)  # bench.json keeps exactly these
    assert r["key"] == "pruned/onnxruntime/fp32" and r["ratio"] == 0.2 and r["candidate"]
    assert r["latency_ms_p50"] == 3.0  # the median, not the mean the 100 ms outlier would drag up
    assert r["latency_ms_p90"] == pytest.approx(4.0 + 0.6 * 96.0) and r["latency_runs"] == 5
    assert r["throughput_ips"] == pytest.approx(8 / 0.020)  # batch of 8 in a median 20 ms
    assert r["gmacs_per_s"] == pytest.approx(3e6 / 0.003 / 1e9)
    assert r["val_accuracy"] == 1.0 and r["val_n"] == 18 and r["accuracy"] == 0.9
    assert r["agreement"] == 0.97 and r["agreement_kl"] is None
    assert r["portable"] is False and r["safe_on"] == ["vnni"]
    plain = bench.row(_timed(), _METRICS, 1.0, batch=8)
    assert plain["val_accuracy"] is None and plain["val_n"] is None and plain["portable"] is True


def test_precision_label():
    assert bench.precision_label({"precision": "fp32", "ran_precision": None}) == "fp32"
    assert bench.precision_label({"precision": "fp32", "ran_precision": "fp32"}) == "fp32"
    assert bench.precision_label({"precision": "fp32", "ran_precision": "bf16"}) == "fp32 (ran bf16)"
    assert bench.precision_label({"precision": "int8-static", "ran_precision": "bf16"}) == (
        "int8-static (float parts bf16)"
    )
    assert bench.precision_label({"precision": "int8-dynamic"}) == "int8-dynamic"


def test_bench_table_by_hand():
    ref = bench.row(_timed("student", reference=True), _METRICS, 2.0, batch=8, val=_METRICS)
    ref["latency_ms_p50"] = 6.0
    fast = bench.row(
        _timed(
            "sweep/r0.5", "int8-static", "openvino", ran_precision="bf16", portability={"portable": False}
        ),
        {**_METRICS, "accuracy_ci": None},
        0.5,
        batch=8,
    )
    fast["deployed"] = True
    table = bench.bench_table([ref, fast])
    lines = table.splitlines()
    assert table.endswith("\n") and len(lines) == 4
    assert len({line.count("|") for line in lines}) == 1  # every row has every column
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:3] == ["student (reference)", "onnxruntime", "fp32"]
    assert cells[3:6] == ["2.50", "2.00", "3"]  # params (M), MB, MACs (M)
    assert cells[6] == cells[7] == "90.00 (80.0-95.0)"  # accuracy % with its 95% interval
    assert cells[8] == "0.8765" and cells[9:12] == ["6.00", "61.60", "1.00"]
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    assert cells[0] == "sweep/r0.5 **(deployed)** (VNNI only)"
    assert cells[2] == "int8-static (float parts bf16)"
    assert cells[6] == "-" and cells[7] == "90.00"  # no validation figure; no interval given
    assert cells[11] == "0.50"  # 3 ms against the reference's 6


def test_bench_table_needs_a_reference_row():
    with pytest.raises(StopIteration):
        bench.bench_table([bench.row(_timed(), _METRICS, 1.0, batch=8)])


def test_read_unlabeled_searches_samples_and_counts_what_it_cannot_decode(tmp_path):
    root = tmp_path / "prod"
    for i in range(5):
        sub = root / ("day1" if i < 3 else "day2/cam")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((10, 14, 3), 40 * i, np.uint8)).save(sub / f"{i}.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    (root / "notes.txt").write_text("not an image")
    images, info = read_unlabeled(root, 8, limit=100)
    assert images.shape == (5, 8, 8, 3) and images.dtype == np.uint8
    assert info == {"path": str(root), "images": 5, "files": 6, "undecodable": 1}
    assert sorted(int(images[i, 0, 0, 0]) for i in range(5)) == [0, 40, 80, 120, 160]
    few, info = read_unlabeled(root, 8, limit=3)
    assert info["files"] == 6 and info["images"] + info["undecodable"] == 3
    again, _ = read_unlabeled(root, 8, limit=3)
    assert np.array_equal(few, again)  # a seeded sample: the same images every bench
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="none of its 1 image files could be decoded"):
        read_unlabeled(tmp_path / "bad", 8, limit=10)
