"""Unit tests of report text that need no run folder."""

import numpy as np


def test_report_names_the_class_balance_mode():
    from slimvit.report import _balance_text

    def run(mode):
        return {"train": {name: {"balance": mode} for name in ("teacher", "student", "pruned")}}

    assert "once per epoch" in _balance_text(run("none"))
    assert "with replacement" in _balance_text(run("sampler"))
    assert "logit-adjusted" in _balance_text(run("logit"))
    mixed = {"train": {"teacher": {"balance": "logit"}, "student": {"balance": "sampler"}}}
    assert "teacher: logit" in _balance_text(mixed) and "student: sampler" in _balance_text(mixed)
    assert "not recorded" in _balance_text({"train": {"teacher": {}}})


def test_report_warns_when_one_validation_image_moves_the_choice():
    from slimvit.report import _validation_grain

    def data(val):
        return {"split_per_class": {"val": val}}

    # NEU-DET: 30 validation images per class -> one image is 100 / (6 * 30) = 0.56 points: silent
    assert _validation_grain(data(dict.fromkeys("abcdef", 30))) == []
    # the imbalanced subset: 3 validation images of the rarest class -> 100 / (6 * 3) = 5.6 points
    (line,) = _validation_grain(data({"a": 30, "b": 20, "c": 12, "d": 8, "e": 5, "f": 3}))
    assert "78 images, 3 of f" in line and "5.6 points" in line and "data.split" in line
    (line,) = _validation_grain(data({"a": 30, "b": 0}))
    assert "no image of b" in line and "the other 1 classes" in line
    (line,) = _validation_grain(data({"a": 30, "b": 0, "c": 4, "d": 0}))
    assert "no image of b, d" in line and "the other 2 classes" in line
    # the boundary: 5 classes of 10 -> exactly 2.0 points stays silent, 9 of the rarest speaks
    assert _validation_grain(data(dict.fromkeys("abcde", 10))) == []
    assert len(_validation_grain(data({**dict.fromkeys("abcd", 10), "e": 9}))) == 1
    assert _validation_grain({}) == []


def _run_with_mistakes(tmp_path):
    import numpy as np
    from PIL import Image

    from slimvit.layout import LOGITS, write_logits

    key = "pruned/onnxruntime/int8-dynamic"
    (tmp_path / "ds" / "a").mkdir(parents=True)
    (tmp_path / "ds" / "b").mkdir(parents=True)
    paths = ["a/1.png", "a/2.png", "b/3.png", "b/4.png"]
    for p in paths:
        Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(tmp_path / "ds" / p)
    logits = np.array([[2.0, 0.0], [0.0, 3.0], [0.0, 1.0], [1.0, 0.0]], np.float32)  # 2 and 4 wrong
    write_logits(tmp_path / LOGITS, {f"test|{key}": logits})
    row = {"key": key, "stage": "pruned", "runtime": "onnxruntime", "precision": "int8-dynamic", "n": 4}
    return {
        "run_dir": tmp_path,
        "bench": {
            "classes": ["a", "b"],
            "rows": [{**row, "deployed": True}],
            "predictions": {key: logits.argmax(1).tolist()},
            "test_images": {"root": str(tmp_path / "ds"), "paths": paths, "labels": ["a", "a", "b", "b"]},
        },
    }


def test_report_lists_each_wrong_test_image_with_its_confidence(tmp_path):
    from slimvit import report

    run = _run_with_mistakes(tmp_path)
    wrong = report.mistakes(run)
    assert [(m["path"], m["true"], m["predicted"]) for m in wrong] == [
        ("a/2.png", "a", "b"),
        ("b/4.png", "b", "a"),
    ]
    assert abs(wrong[0]["confidence"] - 1 / (1 + np.exp(-3.0))) < 1e-6  # softmax of the named class
    assert report.plot_mistakes(run, tmp_path / "plots" / "mistakes.png")
    text = "\n".join(report._mistakes(run))
    assert "2 of 4 test images wrong" in text and "| `a/2.png` | a | b | 0.953 |" in text
    assert "plots/mistakes.png" in text


def test_report_says_the_epochs_that_ran():
    from slimvit.report import _epochs_ran

    run = {
        "train": {"teacher": {"epochs": 300, "epochs_run": 300}, "student": {"epochs": 40, "epochs_run": 31}}
    }
    assert (
        _epochs_ran(run, "teacher", 30)
        == "300 epochs: 30 configured, raised to 300 by train.steps_floor_images"
    )
    assert _epochs_ran(run, "student", 40) == "31 epochs, stopped early of 40"
    assert _epochs_ran({"train": {}}, "teacher", 30) == "30 epochs"
