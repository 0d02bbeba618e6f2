"""The deploy choice (validation only, budgets, portability), the statistics it reports, and int8 portability."""

import math

import numpy as np
import pytest
from test_export import tiny

from slimvit.config import DeployConfig, QuantizeConfig
from slimvit.deploy import NothingFits, choose
from slimvit.errors import ConfigError
from slimvit.evaluate import compare, mcnemar, wilson
from slimvit.export import export_onnx
from slimvit.quantize import MODES, SAFE_WEIGHT, int8_products, portability


def _row(ratio, precision, ms, mb, val, test, portable=True, **kw):
    return {
        "key": f"r{ratio}/{precision}",
        "stage": "pruned" if ratio == 0.2 else f"sweep/r{ratio}",
        "ratio": ratio,
        "runtime": "onnxruntime",
        "precision": precision,
        "candidate": True,
        "reference": False,
        "latency_ms_p50": ms,
        "size_mb": mb,
        "val_accuracy": val,
        "val_n": 180,
        "accuracy": test,
        "portable": portable,
        **kw,
    }


STUDENT = {
    "key": "student/pytorch/fp32",
    "stage": "student",
    "runtime": "pytorch",
    "precision": "fp32",
    "candidate": False,
    "reference": True,
    "latency_ms_p50": 8.0,
    "size_mb": 22.0,
    "val_accuracy": 0.99,
    "accuracy": 0.99,
}


def rows():
    return [
        STUDENT,
        _row(0.2, "fp32", 2.0, 14.0, 0.99, 0.99),
        _row(0.2, "int8-dynamic", 1.2, 4.6, 0.99, 0.9833),
        _row(0.5, "fp32", 1.0, 5.0, 0.9722, 0.9972),  # best on test, 3 images worse on validation
        _row(0.5, "int8-dynamic", 0.7, 1.6, 0.9667, 0.9972),
    ]


def test_no_budget_fastest_within_the_drop_on_validation():
    best, why = choose(rows(), max_drop=0.5)
    assert best["key"] == "r0.2/int8-dynamic"  # r=0.5 is faster but 3+ validation images below the student
    assert "validation" in why and "reported only" in why
    best, _ = choose(rows(), max_drop=3.0)
    assert best["key"] == "r0.5/int8-dynamic"  # a looser drop admits the faster ratio


def test_choice_never_reads_test_accuracy():
    base = rows()
    shuffled = [
        dict(r, accuracy=float(a))
        for r, a in zip(base, np.random.default_rng(0).random(len(base)), strict=True)
    ]
    for kw in ({}, {"budget_mb": 6.0}, {"budget_ms": 1.5}, {"max_drop": 5.0}):
        assert choose(base, **kw)[0]["key"] == choose(shuffled, **kw)[0]["key"], kw


def test_budgets_pick_the_most_accurate_that_fits():
    best, why = choose(rows(), max_drop=5.0, budget_mb=2.5)
    assert best["key"] == "r0.5/int8-dynamic" and best["size_mb"] <= 2.5
    assert "file <= 2.5 MB" in why
    best, _ = choose(rows(), max_drop=5.0, budget_ms=1.5)
    assert best["key"] == "r0.2/int8-dynamic"  # as accurate as fp32 r=0.2 on validation, and within budget


def test_ties_within_one_validation_image_go_to_the_faster():
    r = rows()
    r[3]["val_accuracy"] = 0.99 - 0.5 / 180  # half an image below the best: a tie
    best, _ = choose(r, max_drop=5.0, budget_ms=5.0)
    assert best["key"] == "r0.5/fp32"


def test_nothing_fits_names_the_budget_and_the_closest():
    with pytest.raises(NothingFits) as e:
        choose(rows(), budget_ms=0.01)
    msg = str(e.value)
    assert "batch-1 p50 <= 0.01 ms" in msg and "closest:" in msg and "r=0.5" in msg and "0.70 ms" in msg
    assert "\n" not in msg


def test_non_portable_variants_are_never_deployed():
    r = rows()
    r.append(_row(0.2, "int8-static", 0.5, 3.0, 0.995, 0.995, portable=False))
    best, why = choose(r)
    assert best["precision"] != "int8-static" and "not portable" in why
    with pytest.raises(NothingFits):
        choose([STUDENT, r[-1]])


def test_deploy_config_checks_values():
    assert DeployConfig(budget_ms=1.0, budget_mb=2.5).max_drop == 0.5
    for bad in (
        {"budget_ms": 0},
        {"budget_mb": -1.0},
        {"budget_ms": math.inf},
        {"max_drop": math.nan},
        {"min_speedup": -1.0},
    ):
        with pytest.raises(ConfigError, match="deploy."):
            DeployConfig(**bad)


def test_choice_reads_balanced_accuracy_where_the_bench_has_it():
    """On imbalanced validation data the rare classes count: a row that is better on accuracy only
    (it gives up a rare class for common images) loses to one that is better balanced."""
    r = rows()
    for row in r:
        row["val_balanced_accuracy"] = row["val_accuracy"]
    r[4]["val_accuracy"], r[4]["val_balanced_accuracy"] = 0.995, 0.90  # r0.5 int8: accurate, blind to a class
    r[2]["val_accuracy"], r[2]["val_balanced_accuracy"] = 0.97, 0.99
    best, why = choose(r, max_drop=0.5)
    assert best["key"] == "r0.2/int8-dynamic" and "balanced accuracy" in why
    best, _ = choose(r, max_drop=5.0, budget_mb=5.0)
    assert best["key"] == "r0.2/int8-dynamic"  # r0.5 fp32 fits too, but its balanced accuracy is lower


def test_balanced_accuracy_and_per_class_intervals():
    from slimvit.evaluate import balanced_accuracy, metrics_from_predictions

    labels = np.array([0] * 8 + [1] * 2)
    pred = np.array([0] * 8 + [0, 1])
    assert balanced_accuracy(pred, labels) == pytest.approx((1 + 0.5) / 2)
    m = metrics_from_predictions(pred, labels, ["big", "rare", "absent"])
    assert m["accuracy"] == pytest.approx(0.9) and m["balanced_accuracy"] == pytest.approx(0.75)
    assert m["per_class_support"] == {"big": 8, "rare": 2, "absent": 0}
    lo, hi = m["per_class_recall_ci"]["rare"]
    assert lo < 0.5 < hi and (hi - lo) > 0.5  # one of two: a wide interval
    assert m["per_class_recall_ci"]["absent"] == [0.0, 1.0]


def test_balanced_accuracy_difference_on_other_images():
    from slimvit.evaluate import balanced_accuracy_diff, balanced_accuracy_se

    # per class (k+1)/(n+2): 30/30 -> 31/32, 5/10 -> 6/12; se = sqrt(sum p(1-p)/(n+2)) / classes
    labels = np.array([0] * 30 + [1] * 10)
    pred = np.array([0] * 30 + [1] * 5 + [0] * 5)
    want = math.sqrt((31 / 32) * (1 / 32) / 32 + 0.5 * 0.5 / 12) / 2
    assert balanced_accuracy_se(pred, labels) == pytest.approx(want)
    # a class at 100% on 6 images still counts as uncertain; on 600 much less so
    assert balanced_accuracy_se(np.zeros(6, int), np.zeros(6, int)) > 0.05
    assert balanced_accuracy_se(np.zeros(600, int), np.zeros(600, int)) < 0.003
    # the difference is the plain difference (0.75 - 1.0), its interval the two errors combined
    zeros = np.zeros(600, int)
    d, lo, hi = balanced_accuracy_diff(pred, labels, zeros, zeros)
    assert d == pytest.approx(-0.25) and lo < -0.25 < hi < 0  # this much worse is real, even on 40 images
    half = 1.959964 * math.hypot(balanced_accuracy_se(pred, labels), balanced_accuracy_se(zeros, zeros))
    assert hi - d == pytest.approx(half) and d - lo == pytest.approx(half)
    d, lo, hi = balanced_accuracy_diff(pred[:30], labels[:30], pred[:30], labels[:30])
    assert d == 0 and lo < 0 < hi
    with pytest.raises(ValueError):
        balanced_accuracy_se([], [])


def test_wilson_interval():
    lo, hi = wilson(356, 360)
    assert 0.971 < lo < 0.973 and 0.995 < hi < 0.997  # 98.89% of 360
    assert wilson(360, 360)[1] == 1.0 and wilson(360, 360)[0] > 0.989
    assert wilson(0, 0) == (0.0, 1.0)


def test_mcnemar_exact():
    a = np.array([1] * 90 + [0] * 10, bool)
    b = a.copy()
    assert mcnemar(a, b) == {"a_only": 0, "b_only": 0, "p": 1.0, "n": 100}
    b[:6] = False  # A right and B wrong on 6 images, never the other way: p = 2 / 2**6
    t = mcnemar(a, b)
    assert (t["a_only"], t["b_only"]) == (6, 0) and t["p"] == pytest.approx(2 / 64)
    assert compare(a, b) == "better" and compare(b, a) == "worse"
    b[:6] = True
    b[:2] = False  # 2 discordant images: never significant
    assert compare(a, b) == "same"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("port")
    model, spec = tiny(pruned=True)
    export_onnx(model, spec, d / "fp32.onnx", stage="pruned")
    return d


@pytest.mark.parametrize("mode", ["int8-dynamic", "int8-static", "int8-mixed"])
def test_int8_weights_fit_non_vnni_kernels(exported, mode):
    """Read from the graph, so the check holds whatever CPU runs the test."""
    fn, needs_calib = MODES[mode]
    calib = (
        np.random.default_rng(0).standard_normal((16, 3, 32, 32), dtype=np.float32) if needs_calib else None
    )
    safe, full = exported / f"{mode}.onnx", exported / f"{mode}_full.onnx"
    fn(exported / "fp32.onnx", safe, QuantizeConfig(calibration_images=16), calib)
    fn(exported / "fp32.onnx", full, QuantizeConfig(calibration_images=16, reduce_range=False), calib)
    products = int8_products(safe)
    assert products, "no int8 products found"
    assert all(-SAFE_WEIGHT <= p["weight_min"] and p["weight_max"] <= SAFE_WEIGHT for p in products)
    assert portability(safe)["portable"] and "x86-64 AVX2" in portability(safe)["safe_on"]
    p_full = portability(full)
    assert (
        not p_full["portable"]
        and p_full["max_abs_weight"] > SAFE_WEIGHT
        and "x86-64 AVX2" not in p_full["safe_on"]
    )


def test_predict_runs_a_model_deployed_on_openvino(exported, tmp_path):
    """A model the deploy step put on OpenVINO is run by OpenVINO in predict, with the same answers."""
    pytest.importorskip("openvino")
    import onnx
    from conftest import write_image

    from slimvit import runtime
    from slimvit.predict import predict_files

    model = onnx.load(str(exported / "fp32.onnx"))
    runtime.embed_metadata(model, {**runtime.proto_metadata(model), "runtime": "openvino"})
    dep = tmp_path / "deploy"
    dep.mkdir()
    onnx.save_model(model, str(dep / "model.onnx"))
    images = [write_image(tmp_path / "img" / f"{i}.png", seed=i, size=40) for i in range(6)]
    run, meta = runtime.runner(dep / "model.onnx", 1)
    assert meta["runtime"] == "openvino" and run.__module__ == "slimvit.openvino_runtime"
    got, failed = predict_files(dep, images, threads=1)
    ref, _ = predict_files(exported / "fp32.onnx", images, threads=1)
    assert not failed and len(got) == 6
    for a, b in zip(got, ref, strict=True):
        assert abs(a["confidence"] - b["confidence"]) < 0.05  # bf16 on CPUs that have it, else fp32


def test_saturated_validation_deploys_the_least_compressed_candidate_the_budgets_allow():
    # 18 validation images, every candidate at 100% and in full agreement with the student (the issue's
    # small dataset): nothing shows what the deeper cuts cost, so the fastest is not the choice
    def row(ratio, depth, precision, ms, mb, params):
        stage = (
            "pruned"
            if ratio == 0.2 and depth is None
            else f"sweep/r{ratio}" + (f"-d{depth}" if depth else "")
        )
        return _row(
            ratio,
            precision,
            ms,
            mb,
            1.0,
            0.9,
            val_n=18,
            depth=depth,
            params=params,
            agreement=1.0,
            stage=stage,
            key=f"{stage}/{precision}",
        )

    rows = [
        {**STUDENT, "val_accuracy": 1.0},
        row(0.2, None, "fp32", 2.0, 14.0, 3.5e6),
        row(0.2, None, "int8-mixed", 1.0, 4.0, 3.5e6),
        row(0.2, None, "int8-static", 1.02, 3.8, 3.5e6),  # within 5% of the shape's fastest: smaller wins
        row(0.5, None, "int8-mixed", 0.6, 1.6, 1.4e6),
        row(0.5, 6, "int8-mixed", 0.3, 0.9, 0.7e6),
    ]
    best, why = choose(rows)
    assert best["key"] == "pruned/int8-static" and best["validation_saturated"]
    assert "least compressed" in why and "cannot tell them apart" in why and "--budget-ms" in why
    # a budget buys the deeper cut, but no deeper than it asks
    assert choose(rows, budget_ms=0.8)[0]["key"] == "sweep/r0.5/int8-mixed"
    assert choose(rows, budget_ms=0.4)[0]["key"] == "sweep/r0.5-d6/int8-mixed"
    # the least compressed that buys the speed-up compression is for: at least `min_speedup` times the
    # student's ONNX FP32 file
    onnx_fp32 = {**STUDENT, "key": "student/onnxruntime/fp32", "runtime": "onnxruntime", "reference": False}
    assert choose([*rows, {**onnx_fp32, "latency_ms_p50": 2.4}])[0]["key"] == "pruned/int8-static"  # 2.35x
    best, why = choose([*rows, {**onnx_fp32, "latency_ms_p50": 1.6}])  # pruned 1.6x: r0.5 (2.7x) is the cut
    assert best["key"] == "sweep/r0.5/int8-mixed" and "2x faster than the student's ONNX FP32" in why
    assert (
        choose([*rows, {**onnx_fp32, "latency_ms_p50": 1.6}], min_speedup=1)[0]["key"] == "pruned/int8-static"
    )
    best, why = choose([*rows, {**onnx_fp32, "latency_ms_p50": 0.5}])  # nothing 2x faster: no floor
    assert best["key"] == "pruned/int8-static" and "speed floor dropped" in why
    # one validation image between the candidates is not saturation (NEU-DET's 180 images are another
    # matter: there the fastest within the drop is deployed)
    rows[-1] = {**rows[-1], "val_accuracy": 17 / 18}
    rows[-2] = {**rows[-2], "val_accuracy": 16 / 18}
    best, _ = choose(rows, max_drop=20.0)
    assert not best["validation_saturated"] and best["key"] == "sweep/r0.5-d6/int8-mixed"


def test_the_teacher_is_a_candidate_judged_on_validation_alone():
    # the run's own teacher: more accurate on validation than any ViT, slower, and (an independently
    # trained model) far from the student's predictions: a budget it fits deploys it
    teacher = {
        **_row(0.2, "fp32", 1.5, 45.0, 1.0, 0.9917, agreement=0.90),
        "key": "teacher/onnxruntime/fp32",
        "stage": "teacher",
        "ratio": None,
        "params": 11.2e6,
    }
    vits = [{**r, "agreement": 0.99} for r in rows()[1:]]
    best, why = choose([STUDENT, *vits, teacher], budget_ms=1.6)
    assert best["stage"] == "teacher" and "more than one validation image" in why
    # within one validation image of the best ViT it is a tie, won by the faster
    tied = {**teacher, "val_accuracy": 0.9944}
    assert choose([STUDENT, *vits, tied], budget_ms=1.6)[0]["key"] == "r0.2/int8-dynamic"
    # a budget it does not fit: the most accurate ViT within it
    assert choose([STUDENT, *vits, teacher], budget_ms=1.4)[0]["key"] == "r0.2/int8-dynamic"
    # where no compression fits (every one far from the student), the teacher does; where nothing fits,
    # the refusal names what the compressions failed
    lost = [{**r, "agreement": 0.5} for r in vits]
    best, why = choose([STUDENT, *lost, teacher])
    assert best["stage"] == "teacher" and "no compression of the student fits" in why
    with pytest.raises(NothingFits, match="agreement"):
        choose([STUDENT, *lost, teacher], budget_ms=1.0)
    # without budgets the fastest within the drop, as before
    assert choose([STUDENT, *vits, teacher])[0]["key"] == choose([STUDENT, *vits])[0]["key"]

    # saturated validation: the teacher has the most parameters but is no compression of the student, and
    # two images below the ViTs it does not stop the choice from seeing that they all tie
    def sat(r):
        return {
            **r,
            "val_accuracy": 1.0,
            "val_n": 18,
            "agreement": 1.0,
            "params": 3.5e6 if r["ratio"] == 0.2 else 1.4e6,
        }

    flat = [sat(r) for r in rows()[1:]]
    for val in (1.0, 16 / 18):
        best, why = choose(
            [{**STUDENT, "val_accuracy": 1.0}, *flat, {**teacher, "val_accuracy": val, "val_n": 18}]
        )
        assert best["validation_saturated"] and best["stage"] == "pruned" and "least compressed" in why


def test_where_no_compression_fits_the_students_own_file_is_deployed():
    # every compression loses more than the drop allows on validation: the student's ONNX FP32 file,
    # uncompressed, is deployed rather than nothing, unless a budget rules it out too
    own = {
        **STUDENT,
        "key": "student/onnxruntime/fp32",
        "runtime": "onnxruntime",
        "reference": False,
        "file": "onnx/student_fp32.onnx",
        "latency_ms_p50": 4.0,
        "size_mb": 22.5,
    }
    lost = [{**r, "val_accuracy": 0.97} for r in rows()[1:]]
    best, why = choose([STUDENT, own, *lost])
    assert best["key"] == "student/onnxruntime/fp32" and not best["validation_saturated"]
    assert "uncompressed" in why and "no compression of the student fits" in why and "98.44%" in why
    assert choose([STUDENT, own, *lost], budget_mb=30.0)[0]["key"] == own["key"]
    # the compressions' refusal names what failed
    with pytest.raises(NothingFits, match="accuracy >= 98.44%"):
        choose([STUDENT, own, *lost], budget_mb=5.0)
    # a compression that fits is still preferred to the uncompressed file
    assert choose([STUDENT, own, *rows()[1:]])[0]["key"] == "r0.2/int8-dynamic"
    # a bench with no compression at all (pruning off): the student's file, saying so, not "run bench"
    best, why = choose([STUDENT, own])
    assert best["key"] == own["key"] and why.endswith("the bench holds no compression of the student")
    # the teacher competes with the student's file as with a compression: without budgets where faster
    teacher = {
        **own,
        "key": "teacher/onnxruntime/fp32",
        "stage": "teacher",
        "candidate": True,
        "val_accuracy": 0.99,
    }
    best, why = choose([STUDENT, own, *lost, {**teacher, "latency_ms_p50": 3.0}])
    assert best["stage"] == "teacher" and "faster than the student's own file" in why
    assert choose([STUDENT, own, *lost, {**teacher, "latency_ms_p50": 5.0}])[0]["key"] == own["key"]
