"""The one set of percentage and row-label helpers (slimvit.labels) the report, bench.md and deploy share."""

from slimvit import deploy
from slimvit.labels import pct, pct_ci, ratio_text, row_label, shape_label


def test_pct_and_its_interval():
    assert pct(None) == "-" and pct(0.98889) == "98.89%" and pct(0.5, 1) == "50.0%"
    assert pct(0.5, unit="") == "50.00"  # a column whose header already says %
    assert pct_ci(0.9, [0.8, 0.95]) == "90.00% (80.0-95.0)"
    assert pct_ci(0.9, None) == "90.00%" and pct_ci(None, [0.8, 0.95]) == "-"
    assert pct_ci(0.9, [0.8, 0.95], unit="") == "90.00 (80.0-95.0)"  # bench.md's cells


def test_row_labels():
    r = {"stage": "pruned", "runtime": "onnxruntime", "precision": "int8-static", "ratio": 0.3, "depth": None}
    assert row_label(r) == "pruned ORT int8-static"
    assert row_label({**r, "runtime": "openvino"}) == "pruned OpenVINO int8-static"
    assert row_label({**r, "runtime": "tensorrt"}) == "pruned tensorrt int8-static"  # unknown: as written
    assert (
        ratio_text(r) == ", pruning ratio 0.3"
        and ratio_text({**r, "depth": 6}) == ", pruning ratio 0.3, 6 blocks"
    )
    assert ratio_text({**r, "ratio": None}) == ""
    assert deploy.shape_label is shape_label  # one function for the deploy line and the report
    assert shape_label(r) == "r=0.3" and shape_label({**r, "ratio": None}) == ""
    assert shape_label({**r, "depth": 6}) == "r=0.3 d6"
