"""Bench's label-free fidelity (agreement with the student on validation views and unlabeled images) and
the deploy choice that reads it."""

import numpy as np
import pytest
from PIL import Image
from test_deploy import STUDENT, _row

from slimvit import bench
from slimvit.bench import Variant, fidelity, val_views
from slimvit.config import Config
from slimvit.deploy import choose, saturated
from slimvit.errors import DataError


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


def _fid(monkeypatch, tmp_path, unlabeled):
    import dataclasses

    monkeypatch.setattr(bench, "read_spec", lambda _p: _Spec)
    cfg = Config()
    cfg = dataclasses.replace(cfg, bench=dataclasses.replace(cfg.bench, unlabeled=unlabeled))
    variants = [
        _variant("student", _red, reference=True),
        _variant("pruned", lambda x: 0.5 * _red(x)),
        _variant("sweep/r0.5", _green_flips),
    ]
    return fidelity(tmp_path, variants, _Data(), cfg)


def test_views_match_the_training_views():
    import torch

    from slimvit.train import views

    x = np.random.default_rng(0).integers(0, 255, (3, 5, 5, 3), dtype=np.uint8)
    ours = val_views(x, True, True)
    theirs = torch.cat(views(torch.from_numpy(x).permute(0, 3, 1, 2), True, True)).permute(0, 2, 3, 1)
    assert ours.shape == (24, 5, 5, 3) and np.array_equal(ours, theirs.numpy())
    four = val_views(x, True, True, limit=4)  # as the fine-tunes compare: the image, 180 degrees, 2 mirrors
    assert np.array_equal(four, np.concatenate([ours[i * 3 : (i + 1) * 3] for i in (0, 2, 4, 6)]))


def test_a_candidate_that_disagrees_on_unlabeled_images_loses_at_equal_validation_accuracy(
    monkeypatch, tmp_path
):
    rows_of = {
        "pruned": _row(0.2, "int8-dynamic", 2.0, 2.0, 1.0, 1.0, key="pruned/onnxruntime/fp32"),
        "sweep/r0.5": _row(0.5, "int8-dynamic", 1.0, 1.0, 1.0, 1.0, key="sweep/r0.5/onnxruntime/fp32"),
    }
    student = {**STUDENT, "val_accuracy": 1.0}

    # validation views only: both candidates name the student's class everywhere, the faster one wins
    fid, source = _fid(monkeypatch, tmp_path, None)
    assert source["val_views"] == 4 * 12 and source["unlabeled"] is None
    assert (
        fid["pruned/onnxruntime/fp32"]["agreement"] == 1.0 == fid["sweep/r0.5/onnxruntime/fp32"]["agreement"]
    )
    assert fid["student/onnxruntime/fp32"]["agreement_kl"] == pytest.approx(0.0, abs=1e-12)
    rows = [student, *({**r, **fid[r["key"]]} for r in rows_of.values())]
    assert choose(rows)[0]["stage"] == "sweep/r0.5"

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
    # a budgeted choice with no agreement floor: both fit and tie on validation; agreement breaks the tie
    assert choose(rows, budget_ms=5.0, min_agreement=0)[0]["stage"] == "pruned"


def test_unlabeled_folder_must_hold_images(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        bench.check_unlabeled(tmp_path / "nosuch")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="has no images"):
        bench.check_unlabeled(tmp_path / "empty")


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
    import argparse
    import dataclasses

    from slimvit.cli import _unlabeled_of_run
    from slimvit.config import save_config

    cfg = Config()
    save_config(
        dataclasses.replace(cfg, bench=dataclasses.replace(cfg.bench, unlabeled="/prod")),
        tmp_path / "config.yaml",
    )
    args = argparse.Namespace(unlabeled=None, overrides=[])
    assert _unlabeled_of_run(cfg, tmp_path, args).bench.unlabeled == "/prod"
    given = argparse.Namespace(unlabeled=None, overrides=["bench.unlabeled=null"])
    assert _unlabeled_of_run(cfg, tmp_path, given).bench.unlabeled is None
