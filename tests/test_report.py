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
