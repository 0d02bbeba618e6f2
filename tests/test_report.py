"""Unit tests of report text that need no run folder."""


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
