"""Calibration (temperature on validation), the review threshold (chosen on validation only) and the
`review` flag in every output of `slimvit predict`."""

import csv
import io
import json

import numpy as np
import pytest

from slimvit import calibrate


def _sampled(temperature: float, n: int = 4000, seed: int = 0):
    """Logits and labels drawn from softmax(logits / temperature): that temperature calibrates them."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (n, 4))
    p = calibrate.softmax(logits, temperature)
    labels = np.array([rng.choice(4, p=q) for q in p])
    return logits, labels


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_temperature_fitting_recovers_a_known_temperature(true_t):
    logits, labels = _sampled(true_t)
    t = calibrate.fit_temperature(logits, labels)
    assert t == pytest.approx(true_t, rel=0.08)
    # and it calibrates: ECE after is small and below ECE before when the model was mis-calibrated
    c = calibrate.calibration(logits[:2000], labels[:2000], logits[2000:], labels[2000:])
    assert c["ece_t"] < 0.04 and c["nll_t"] <= c["nll"] + 1e-9
    if true_t != 1.0:
        assert c["ece_t"] < c["ece"]


def test_ece_and_brier_of_known_cases():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    labels = np.array([0, 1, 0, 0])
    # bins: 0.9 (2 images, 1 right: gap 0.4), 0.6 (2 images, 2 right: gap 0.4)
    assert calibrate.ece(probs, labels) == pytest.approx(0.4)
    assert calibrate.brier(np.array([[1.0, 0.0]]), np.array([0])) == 0.0
    assert calibrate.brier(np.array([[0.0, 1.0]]), np.array([0])) == pytest.approx(2.0)


def test_review_thresholds_on_known_confidences():
    conf = np.array([0.99, 0.98, 0.97, 0.9, 0.8, 0.7, 0.6, 0.55, 0.52, 0.51])
    right = np.array([1, 1, 1, 1, 1, 1, 0, 1, 0, 0], bool)
    t = calibrate.threshold_for_rate(conf, 0.2)  # at most 2 of 10 to review
    assert t == 0.55 and calibrate.operating_point(conf, right, t)["review"] == 2
    assert calibrate.threshold_for_rate(conf, 0.0) == 0.0
    t = calibrate.threshold_for_accuracy(conf, right, 1.0)  # the 6 most confident are all right
    assert t == 0.7 and calibrate.operating_point(conf, right, t)["accuracy_accepted"] == 1.0
    assert calibrate.threshold_for_accuracy(np.array([0.9]), np.array([False]), 0.99) is None


def _bench(tmp_path, test_labels):
    from slimvit.layout import LOGITS, write_logits

    rng = np.random.default_rng(0)
    key = "pruned/onnxruntime/fp32"
    val, test = rng.normal(0, 2, (60, 3)), rng.normal(0, 2, (40, 3))
    y_val = val.argmax(1).copy()
    y_val[:10] = (y_val[:10] + 1) % 3  # some wrong
    write_logits(
        tmp_path / LOGITS, {f"val|{key}": val.astype(np.float32), f"test|{key}": test.astype(np.float32)}
    )
    return key, {
        "classes": ["a", "b", "c"],
        "calibration": {key: {"temperature": 1.7}},
        "val_labels": y_val.tolist(),
        "test_images": {"labels": [["a", "b", "c"][i] for i in test_labels]},
    }


def test_the_review_threshold_reads_validation_only(tmp_path):
    """The threshold and its validation figures are the same whatever the test labels say (they are read
    only to report what the threshold does on test)."""
    from slimvit.deploy import review_plan

    rng = np.random.default_rng(1)
    plans = []
    for seed in range(3):
        key, bench = _bench(tmp_path, np.random.default_rng(seed).integers(0, 3, 40))
        plans.append(review_plan(tmp_path, bench, key, review_rate=0.1))
    assert len({p["threshold"] for p in plans}) == 1 and len({json.dumps(p["val"]) for p in plans}) == 1
    assert len({json.dumps(p["test"]) for p in plans}) > 1  # test is reported, so it does move
    p = plans[0]
    assert p["val"]["review"] <= 6 and p["temperature"] == 1.7
    assert p["threshold_range"]["lo"] <= p["threshold"] <= p["threshold_range"]["hi"]
    key, bench = _bench(tmp_path, rng.integers(0, 3, 40))
    t = review_plan(tmp_path, bench, key, target_accuracy=100.0)
    assert t["val"]["accuracy_accepted"] == 1.0


def test_review_flag_in_every_output_format(tmp_path, capsys):
    """A model deployed with a review threshold: the TSV, CSV and JSON outputs carry the top class and the
    `review` flag; images above the threshold are `ok`; the exit code is unchanged."""
    from test_edge import LEVELS, write_gray
    from tiny_onnx import write_tiny_onnx

    from slimvit.cli import main

    d = tmp_path / "deploy"
    write_tiny_onnx(d / "model.onnx")
    imgs = tmp_path / "imgs"
    for level in LEVELS:
        write_gray(imgs / f"{level:03d}.png", level)
    (d / "deploy.json").write_text(
        json.dumps({"file": "model.onnx", "temperature": 1.0, "review_threshold": 0.0})
    )
    assert main(["predict", str(d), str(imgs)]) == 0
    assert all(line.endswith("\tok") for line in capsys.readouterr().out.splitlines())
    (d / "deploy.json").write_text(
        json.dumps({"file": "model.onnx", "temperature": 1.0, "review_threshold": 1.0})
    )
    out_csv, out_json = tmp_path / "p.csv", tmp_path / "p.json"
    assert main(["predict", str(d), str(imgs), "--csv", str(out_csv), "--json", str(out_json)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == len(LEVELS) and all(line.split("\t")[-1] == "review" for line in lines)
    assert all(line.split("\t")[1] for line in lines)  # the top class is still named
    rows = list(csv.DictReader(io.StringIO(out_csv.read_text())))
    assert all(r["review"] == "yes" and r["class"] for r in rows)
    preds = json.loads(out_json.read_text())["predictions"]
    assert all(p["review"] is True and p["class"] for p in preds)
    assert f"({len(LEVELS)} below the review threshold" in err


def test_a_validation_split_without_errors_leaves_the_temperature_at_one():
    """Every validation image right: the likelihood only rises as T -> 0, so a fit would make the model
    absurdly sure; it is left at 1.0 and the record says why."""
    logits = np.array([[3.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
    t, why = calibrate.fitted_temperature(logits, np.array([0, 1, 0]))
    assert t == 1.0 and "all 3 validation images right" in why
    c = calibrate.calibration(logits, np.array([0, 1, 0]), logits, np.array([0, 0, 0]))
    assert c["temperature"] == 1.0 and c["ece"] == c["ece_t"] and c["not_fitted"]
    assert (
        calibrate.T_RANGE[0] <= calibrate.fit_temperature(logits, np.array([0, 1, 1])) <= calibrate.T_RANGE[1]
    )


def test_a_target_accuracy_threshold_never_splits_tied_confidences():
    """`conf >= threshold` accepts every image tied at it, so the threshold may only sit where a group of
    tied confidences ends: three images at 1.0 with one wrong cannot give 99%."""
    conf = np.array([1.0, 1.0, 1.0, 0.9])
    right = np.array([True, False, True, True])
    assert calibrate.threshold_for_accuracy(conf, right, 0.99) is None
    t = calibrate.threshold_for_accuracy(conf, right, 0.6)
    assert calibrate.operating_point(conf, right, t)["accuracy_accepted"] >= 0.6
