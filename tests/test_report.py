"""Unit tests of report text that need no run folder: each section rendered from a tiny synthetic run dict."""

from types import SimpleNamespace

import numpy as np
import pytest

from slimvit import deploy
from slimvit.config import load_config
from slimvit.labels import ratio_text, row_label, sweep_table
from slimvit.report import SECTIONS, classes, compression, context, deployment, overview, render
from slimvit.report.stats import front, verdict
from slimvit.trust import calibration_change

CLASSES = ["a", "b", "c"]
LABELS = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]  # the test images: 4 of a, 4 of b, 2 of c
DEPLOYED = [0, 0, 0, 1, 1, 1, 1, 1, 2, 0]  # one a taken for b, one c for a
PRUNED = [0, 0, 0, 0, 1, 1, 1, 1, 2, 0]  # one c taken for a
FILE = "onnx/pruned_int8-static.onnx"


def _row(stage, runtime, precision, **kw) -> dict:
    r = {
        "key": f"{stage}/{runtime}/{precision}",
        "stage": stage,
        "runtime": runtime,
        "precision": precision,
        "reference": False,
        "deployed": False,
        "candidate": runtime != "pytorch",
        "ratio": None if stage == "student" else 0.2,
        "depth": None,
        "params": 4e6,
        "macs": 1e9,
        "size_mb": 16.0,
        "accuracy": 0.9,
        "accuracy_ci": [0.6, 0.98],
        "macro_f1": 0.9,
        "latency_ms_p50": 8.0,
        "latency_ms_p90": 9.0,
        "throughput_ips": 100.0,
        "val_accuracy": 0.9,
        "val_balanced_accuracy": 0.9,
        "val_n": 100,
        "n": len(LABELS),
    }
    return {**r, **kw}


def _run() -> dict:
    """A finished run: the student, its pruned model in four precisions, a sweep model; int8-static deployed."""
    rows = [
        _row("student", "pytorch", "fp32", reference=True),
        _row("pruned", "pytorch", "fp32", latency_ms_p50=6.0, size_mb=12.0),
        _row("pruned", "onnxruntime", "fp32", latency_ms_p50=3.0, size_mb=12.0),
        _row("pruned", "onnxruntime", "fp16", latency_ms_p50=4.5, size_mb=6.0),
        _row("pruned", "onnxruntime", "int8-dynamic", latency_ms_p50=2.0, size_mb=4.0),
        _row(
            "pruned", "onnxruntime", "int8-static", latency_ms_p50=1.5, size_mb=4.0, deployed=True, file=FILE
        ),
        _row("sweep/r0.5", "onnxruntime", "int8-static", ratio=0.5, latency_ms_p50=1.0, portable=False),
    ]
    dep = rows[5]
    ev = {"pred": LABELS, "labels": LABELS, "accuracy": 1.0, "macro_f1": 1.0}
    train = {"distill": "kd", "epochs": 10, "best_val_acc": 0.95, "best_epoch": 7, "seconds": 60.0}
    return {
        "run_dir": "/nonexistent-run",  # no logits, no plots
        "config": None,
        "data": None,
        "sweep": None,
        "quantize": None,
        "prune": _prune(),
        "manifest": {
            "stages": {"teacher": {"status": "done", "seconds": 120.0}, "report": {"status": "running"}},
            "decode_seconds": 30.0,
        },
        "train": {"teacher": train, "student": train},
        "eval": {"teacher": ev, "student": ev, "pruned": {**ev, "pred": PRUNED}},
        "curves": {},
        "bench": {
            "rows": rows,
            "classes": CLASSES,
            "predictions": {dep["key"]: DEPLOYED, "pruned/onnxruntime/fp32": LABELS},
            "confusion": {dep["key"]: [[3, 1, 0], [0, 4, 0], [1, 0, 1]]},
            "test_images": {"paths": [f"{i}.png" for i in LABELS], "labels": [CLASSES[i] for i in LABELS]},
            "deployed_why": "the fastest candidate that fits",
            "budgets": {},
            "predict_check": {"n": 10, "accuracy": 0.8, "failed": 0, "agrees": True, "identical": True},
            "threads": 2,
            "cpu": "Test CPU",
            "isa": ["avx2"],
            "date": "2026-01-01",
            "versions": {"onnxruntime": "1.0"},
            "settings": {"warmup": 2, "runs": 10, "rounds": 2, "throughput_batch": 4},
            "validated_on": {"cpu": "Test CPU", "isa": ["avx2"], "onnxruntime": "1.0"},
        },
    }


def _prune() -> dict:
    block = {"num_heads": 3, "head_dim": 64, "attn_dim": 192, "mlp_hidden": 768}
    after = {"num_heads": 3, "head_dim": 48, "attn_dim": 144, "mlp_hidden": 576}
    return {
        "ratio": 0.2,
        "importance": "taylor",
        "global_pruning": False,
        "round_to": 8,
        "widths_before": {"embed_dim": 192, "blocks": {"blocks.0": block}},
        "widths_after": {"embed_dim": 144, "blocks": {"blocks.0": after}},
        "params_before": 5e6,
        "params_after": 3e6,
        "params_ratio": 0.6,
        "macs_before": 1e9,
        "macs_after": 6.4e8,
        "macs_ratio": 0.64,
        "latency_ms_before": {"p50": 8.0},
        "latency_ms_after": {"p50": 6.0},
        "latency_ratio": 0.75,
        "val_acc": 0.9,
        "val_acc_pruned": 0.5,
        "test_acc": 0.9,
        "finetune": {"epochs": 10, "epochs_run": 4, "stopped": "recovered"},
    }


def test_render_walks_the_sections_in_order():
    text = render(_run(), command="slimvit report --out runs/x")
    headings = [line for line in text.splitlines() if line.startswith("#")]
    assert headings == [
        "# slimvit report",
        "## Conclusions",
        "## Stages",
        "## Distillation",
        "## Pruning",
        "## Quantization",
        "## Deployment candidates",
        "## Deployed model",
        "## Where the models look",  # trust.localisation_section; no calibration, so no "Trusting" section
        "## Classes",
        "## Wrong test images",
        "## Portability",
        "## Environment",
        "## Dataset and configuration",
        "## Time per stage",
    ]
    assert text.splitlines()[2].startswith(
        "Deployed: **pruned ORT int8-static, pruning ratio 0.2**, 90.00% (60.0-98.0)"
    )
    assert "Produced by `slimvit report --out runs/x`." in text
    assert len(SECTIONS) == len(set(SECTIONS))
    no_deploy = _run()
    no_deploy["bench"]["rows"][5]["deployed"] = False
    no_deploy["bench"]["deploy_error"] = "no candidate fits the 1 MB budget"
    assert overview.head(no_deploy)[2] == "**Nothing deployed**: no candidate fits the 1 MB budget."


def test_conclusions_are_computed_from_the_rows():
    text = "\n".join(overview.conclusions(_run()))
    assert (
        "- **Deploy `deploy/model.onnx` (pruned ORT int8-static, pruning ratio 0.2) on this CPU**: 1.50 ms per "
        "image (5.3x faster than the reference eager student), 4.00 MB (4.0x smaller)"
    ) in text
    assert (
        "**c**, test recall 50.0% (1 of 2; 95% interval 9.5-90.5%); it was mostly taken for a (1 images)"
        in text
    )
    assert "Distillation against no distillation: not measured" in text
    assert (
        "the 10 test images were drawn at random from the same folder as the training images, so 90.00% holds "
        "for images like those, within its 95% interval 60.0-98.0% (one image is 10.0 points). 10 images "
        "cannot pin it closer"
    ) in text
    assert "`slimvit verify deploy/ DIR`" in text
    seq = {**_run(), "config": load_config(overrides=["data.split_by=sequence"])}
    assert (
        "the 10 test images were held out as runs of consecutive files (`data.split_by: sequence`)"
        in "\n".join(overview.conclusions(seq))
    )
    assert "removed 40% of the parameters and 36% of the MACs; eager FP32 latency fell to 0.75x" in text
    assert "FP16 on this CPU (this CPU has no AVX-512 FP16 arithmetic)" in text and "1.50x FP32 ONNX" in text
    assert "It saves disk, not time" in text
    assert "dynamic 2.00 ms (90.00%), static QDQ 1.50 ms (90.00%), FP32 3.00 ms (90.00%)" in text
    assert (
        "6.00 ms in eager PyTorch and 3.00 ms in ONNX Runtime at batch 1 (ONNX Runtime 2.0x faster)." in text
    )
    run = _run()
    run["eval"]["student_nokd"] = {**run["eval"]["student"], "pred": [1] * 10, "accuracy": 0.4}
    text = "\n".join(overview.conclusions(run))
    assert "(+60.00 points)" in text
    assert "the distilled student is better (6 vs 0 discordant images, exact McNemar p=0.031)" in text


def test_verdict_says_which_is_better_only_when_the_test_does():
    assert verdict(None, "A", "B") == "no paired test (predictions missing)"
    same = verdict({"a_only": 3, "b_only": 1, "p": 0.62}, "A", "B")
    assert same.startswith("no real difference (3 images only A got right, 1 only B")
    assert verdict({"a_only": 0, "b_only": 9, "p": 0.004}, "A", "B").startswith("B is better (0 vs 9")


def test_stage_table_tags_rows_and_leaves_the_sweep_to_the_candidates():
    lines = compression.stages(_run())
    assert "| student (reference) | pytorch | fp32 | 4.00 | 16.00 | 1000 | 90.00% (60.0-98.0) |" in "\n".join(
        lines
    )
    (dep,) = [line for line in lines if "**(deployed)**" in line]
    assert dep.startswith("| pruned **(deployed)** | onnxruntime | int8-static |")
    assert dep.endswith("| 1.50 | 9.00 | 100 (4) | 0.19 | 0.25 |")  # 1.5 / 8 ms, 4 / 16 MB
    assert not any(line.startswith("| sweep/") for line in lines)


def test_pruning_section_and_sweep_table():
    text = "\n".join(compression.pruning(_run()))
    assert "ratio 0.2, importance `taylor`, uniform, round_to 8" in text
    assert "| embedding width | 192 | 144 | 0.75 |" in text
    assert "| heads x head dim (block 0) | 3 x 64 | 3 x 48 | 0.75 |" in text
    assert "| MACs | 1000.0 M | 640.0 M | 0.640 |" in text
    assert "| val accuracy | 95.00% | 90.00% (50.00% right after pruning) | |" in text
    assert "Fine-tune: 4 of at most 10 epochs (stopped early: recovered)." in text
    assert "competed" not in text  # every trained epoch competed (prune.select_from 0)
    late = {"finetune": {"epochs": 10, "epochs_run": 10, "first_competing_epoch": 6, "best_epoch": 8}}
    assert compression._finetune_text(late).endswith(
        "Only epochs from 6 on competed for the kept weights (`prune.select_from`): it kept epoch 8."
    )
    # prune.select_from 1: the stop rule can fire only at the last epoch, which is kept; not "stopped early"
    last = {"finetune": {"epochs": 10, "epochs_run": 10, "first_competing_epoch": 10, "best_epoch": 10}}
    last["finetune"]["stopped"] = "recovered: validation balanced accuracy 0.99 >= 0.98"
    assert compression._finetune_text(last).startswith(
        "Fine-tune: all 10 epochs, the last kept (`prune.select_from`"
    )
    assert "early" not in compression._finetune_text(last)
    # the sweep's sentence says the same: under prune.select_from 1 no fine-tune stops once "back"
    pc = SimpleNamespace(sweep_from="previous", sweep_epochs=10, recover=True, select_from=0.0)
    sweep_run = {"config": SimpleNamespace(prune=pc), "sweep": {"points": []}}
    assert "at most 10 epochs, stopping once validation balanced accuracy is back" in compression._sweep_text(
        sweep_run
    )
    pc.select_from = 1.0
    said = compression._sweep_text(sweep_run)
    assert "fine-tuned for all its epochs (10, more on a small training split), the last kept;" in said
    assert "stopping" not in said
    assert "### Sweep" not in text
    base = {"params": 4e6, "macs": 1e9, "latency_ms": 8.0, "val_acc": 0.9, "test_acc": None}
    point = {"ratio": 0.5, "depth": None, "params_after": 2e6, "macs_after": 5e8, "latency_ms_after": 4.0}
    point.update(val_acc=0.85, test_acc=0.8, finetune_epochs_run=3)
    table = sweep_table(base, [point, {**point, "depth": 1, "finetune_epochs_run": None}])
    assert table.splitlines()[2:] == [
        "| 0 (student) | all | 4.000 | 1000.0 | 8.00 | 90.00 | - | - |",
        "| 0.5 | all | 2.000 | 500.0 | 4.00 | 85.00 | 80.00 | 3 |",
        "| 0.5 | 1 | 2.000 | 500.0 | 4.00 | 85.00 | 80.00 | - |",
    ]
    from slimvit import prune

    assert prune.sweep_table is sweep_table  # prune_sweep.md and the report's table are one function


def test_quantization_section_lists_each_variant_and_its_float_ops():
    run = _run()
    assert compression.quantization(run)[2] == "The quantization stage has not run."
    ops = {"int8": {"MatMulInteger": 12}, "fp16": {}, "float32": {"Softmax": 2}}
    run["quantize"] = {
        "models": {
            "pruned": {
                "fp32": {"size_mb": 12.0, "accuracy": 0.9, "ops": {"float32": {"MatMul": 12}}},
                "int8-static": {"size_mb": 3.0, "accuracy": 0.8, "agreement_fp32": 0.95, "ops": ops},
            }
        }
    }
    run["quantize"]["models"]["pruned"]["int8-static"]["float_reasons"] = {"Softmax": "no int8 kernel"}
    text = "\n".join(compression.quantization(run))
    assert "| fp32 | 12.00 | 1.00 | 90.00% | - | - | - | MatMul 12 |" in text
    assert "| int8-static | 3.00 | 0.25 | 80.00% | 95.00% | MatMulInteger 12 | - | Softmax 2 |" in text
    assert "  Float ops and why: Softmax: no int8 kernel." in text


def test_classes_section_gives_each_models_recall_and_each_steps_paired_test():
    text = "\n".join(classes.class_recall(_run()))
    names = "teacher | student (distilled) | pruned + fine-tune | pruned FP32 ONNX (before quantization)"
    assert f"| class | test images | {names} | deployed (pruned ORT int8-static) |" in text
    assert (
        "| a | 4 | 100.0 (51-100) | 100.0 (51-100) | 100.0 (51-100) | 100.0 (51-100) | 75.0 (30-95) |" in text
    )
    assert "| c | 2 | 100.0 (34-100) | 100.0 (34-100) | 50.0 (9-91) | 100.0 (34-100) | 50.0 (9-91) |" in text
    assert (
        "| **balanced accuracy** | | **100.00** | **100.00** | **83.33** | **100.00** | **75.00** |" in text
    )
    assert (
        "| pruned + fine-tune -> pruned FP32 ONNX (before quantization) | 83.33 | 100.00 | +16.67 | 1 / 0 | 1 |"
        in text
    )
    assert "| teacher -> student (distilled) | 100.00 | 100.00 | +0.00 | 0 / 0 | 1 |" in text


def test_wrong_images_and_portability_and_deployed_model():
    run = _run()
    text = "\n".join(classes.wrong_images(run))
    assert "gets 2 of 10 test images wrong" in text
    assert "| `0.png` | a | b | - |" in text and "| `2.png` | c | a | - |" in text  # no logits: no confidence
    text = "\n".join(deployment.portability(run))
    assert "on Test CPU (avx2) with ONNX Runtime 1.0" in text
    assert (
        "2 of 3 int8 candidates are safe on every x86 class and ARM64; the others (marked VNNI only)" in text
    )
    text = "\n".join(deployment.deployed_model(run))
    assert f"`deploy/model.onnx` = `{FILE}`. Why: the fastest candidate that fits." in text
    assert "on the 10 test image files: 80.00% (0 undecodable), the same as the benchmark measured." in text
    check = {
        "n": 10,
        "accuracy": 0.8,
        "failed": 1,
        "agrees": False,
        "paired": {"a_only": 0, "b_only": 1, "p": 1.0},
    }
    run["bench"]["predict_check"] = check
    text = "\n".join(deployment.deployed_model(run))
    assert (
        "against the benchmark's 90.00%: **a real difference** (paired test on the same images: 0 right"
        in text
    )
    run["bench"]["rows"][5]["deployed"] = False
    run["bench"]["deploy_error"] = "no candidate fits"
    assert deployment.deployed_model(run)[2] == "Nothing deployed: no candidate fits."


def test_timing_and_environment():
    run = _run()
    assert context.timing(run)[4:] == [
        "| teacher | done | 2.0 |",
        "| report | writing this report | 0.0 |",
        "| (decoding the images) | done | 0.5 |",
        "| total | | 2.5 |",
        "",
    ]
    text = "\n".join(context.environment(run))
    assert "- CPU: Test CPU (? cores visible; avx2)" in text
    assert "2 warm-up runs, 10+ timed batch-1 runs per variant in 2 interleaved rounds" in text
    assert "throughput at batch 4." in text


def _imbalanced_run() -> dict:
    """Three candidates on a validation split where a rare class decides: by accuracy A is best, by balanced
    accuracy (what deploy reads) B is; C is the best that fits in 1.8 MB."""
    rows = [
        _row("student", "pytorch", "fp32", reference=True, val_accuracy=0.93, val_balanced_accuracy=0.92),
        _row("pruned", "onnxruntime", "int8-dynamic", latency_ms_p50=1.0, size_mb=1.0, val_accuracy=0.95),
        _row("pruned", "onnxruntime", "fp32", latency_ms_p50=2.0, size_mb=2.0, val_accuracy=0.90),
        _row(
            "sweep/r0.5", "onnxruntime", "fp32", ratio=0.5, latency_ms_p50=3.0, size_mb=1.5, val_accuracy=0.85
        ),
    ]
    for r, bal in zip(rows[1:], (0.80, 0.92, 0.85), strict=True):
        r["val_balanced_accuracy"] = bal
    run = _run()
    run["bench"]["rows"] = rows
    return run


@pytest.mark.parametrize("budget_mb", [10.0, 1.8])
def test_report_names_what_deploy_chooses_when_accuracy_and_balanced_accuracy_disagree(budget_mb):
    run = _imbalanced_run()
    rows = run["bench"]["rows"]
    a, b, _ = rows[1:]
    assert max(rows[1:], key=lambda r: r["val_accuracy"]) is a  # what the report read before
    chosen, _ = deploy.choose(rows, max_drop=20, budget_mb=budget_mb)
    best, _ = deploy.choose(rows, max_drop=20, budget_mb=100.0)  # no budget binds: the most accurate
    assert best["key"] == b["key"]
    assert front(rows)[-1] is b  # the front's most accurate end
    for r in rows:
        r["deployed"] = r["key"] == chosen["key"]
    run["bench"]["budgets"] = {"budget_mb": budget_mb}
    (sentence,) = deployment.budget_sentences(run)
    assert (
        f"within it ({row_label(chosen)}{ratio_text(chosen)}, {chosen['size_mb']:.2f} MB) scores " in sentence
    )
    assert sentence.endswith(f"for the most accurate of all ({row_label(b)}{ratio_text(b)}).")
    text = "\n".join(deployment.candidates(run))
    assert f"| p50 ms | {deploy.VAL_METRIC} | test accuracy (95% CI) |" in text and "val accuracy" not in text
    assert "| 0.2 | onnxruntime | int8-dynamic | 1.00 | 1.00 | 80.00% |" in text
    fp32 = "| 0.2 **(deployed)** |" if chosen["key"] == b["key"] else "| 0.2 |"
    assert f"{fp32} onnxruntime | fp32 | 2.00 | 2.00 | 92.00% |" in text
    assert "- Most accurate candidate <= 2.5 MB: pruned ORT fp32, pruning ratio 0.2, 2.00 MB" in text


def test_report_names_the_class_balance_mode():
    def run(mode):
        return {"train": {name: {"balance": mode} for name in ("teacher", "student", "pruned")}}

    text = classes._balance_text
    assert "once per epoch" in text(run("none"))
    assert "with replacement" in text(run("sampler"))
    assert "logit-adjusted" in text(run("logit"))
    mixed = {"train": {"teacher": {"balance": "logit"}, "student": {"balance": "sampler"}}}
    assert "teacher: logit" in text(mixed) and "student: sampler" in text(mixed)
    assert "not recorded" in text({"train": {"teacher": {}}})


def test_report_warns_when_one_validation_image_moves_the_choice():
    grain = classes._validation_grain

    def data(val):
        return {"split_per_class": {"val": val}}

    # NEU-DET: 30 validation images per class -> one image is 100 / (6 * 30) = 0.56 points: silent
    assert grain(data(dict.fromkeys("abcdef", 30))) == []
    # the imbalanced subset: 3 validation images of the rarest class -> 100 / (6 * 3) = 5.6 points
    (line,) = grain(data({"a": 30, "b": 20, "c": 12, "d": 8, "e": 5, "f": 3}))
    assert "78 images, 3 of f" in line and "5.6 points" in line and "data.split" in line
    (line,) = grain(data({"a": 30, "b": 0}))
    assert "no image of b" in line and "the other 1 classes" in line
    (line,) = grain(data({"a": 30, "b": 0, "c": 4, "d": 0}))
    assert "no image of b, d" in line and "the other 2 classes" in line
    # the boundary: 5 classes of 10 -> exactly 2.0 points stays silent, 9 of the rarest speaks
    assert grain(data(dict.fromkeys("abcde", 10))) == []
    assert len(grain(data({**dict.fromkeys("abcd", 10), "e": 9}))) == 1
    assert grain({}) == []


def _run_with_mistakes(tmp_path):
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
    from slimvit.report.plots import plot_mistakes

    run = _run_with_mistakes(tmp_path)
    wrong = report.mistakes(run)
    assert [(m["path"], m["true"], m["predicted"]) for m in wrong] == [
        ("a/2.png", "a", "b"),
        ("b/4.png", "b", "a"),
    ]
    assert abs(wrong[0]["confidence"] - 1 / (1 + np.exp(-3.0))) < 1e-6  # softmax of the named class
    assert plot_mistakes(run, tmp_path / "plots" / "mistakes.png")
    text = "\n".join(classes.wrong_images(run))
    assert "2 of 4 test images wrong" in text and "| `a/2.png` | a | b | 0.953 |" in text
    assert "plots/mistakes.png" in text


def test_report_says_the_epochs_that_ran():
    run = {
        "train": {"teacher": {"epochs": 300, "epochs_run": 300}, "student": {"epochs": 40, "epochs_run": 31}}
    }
    assert (
        context._epochs_ran(run, "teacher", 30)
        == "300 epochs: 30 configured, raised to 300 by train.steps_floor_images"
    )
    assert context._epochs_ran(run, "student", 40) == "31 epochs, stopped early of 40"
    assert context._epochs_ran({"train": {}}, "teacher", 30) == "30 epochs"


def test_report_names_the_students_attention_when_it_is_not_timms():
    def preset_line(overrides):
        run = {**_run(), "config": load_config(overrides=overrides), "train": {}}
        return next(line for line in context.dataset(run) if line.startswith("- Preset"))

    assert "with `conv` stem and `locality` attention (" in preset_line(["model.student_attention=locality"])
    assert "with `conv` stem (" in preset_line([])


def test_report_says_which_epochs_competed_for_the_students_kept_weights():
    run = _run()
    assert not any("competed" in line or "select_from" in line for line in compression.distillation(run))
    run["train"] = {**run["train"], "student": {**run["train"]["student"], "first_competing_epoch": 8}}
    assert any(
        "best validation epoch of epochs 8-10 (`train.select_from`)" in line
        for line in compression.distillation(run)
    )
    run["train"]["student"]["first_competing_epoch"] = 10
    assert any(
        "The student kept its last epoch (`train.select_from`)" in line
        for line in compression.distillation(run)
    )


def test_calibration_change_never_says_minus_zero():
    said = calibration_change({"ece_t": 0.0200}, {"ece_t": 0.0196}, 360)  # -0.04 points rounds to zero
    assert said.startswith(
        "Compression changed calibration by +0.0 points of ECE after temperature (student 2.0,"
    )
    assert "with 360 test images an ECE moves by about 5 points" in said
    assert calibration_change({"ece_t": 0.02}, {"ece_t": 0.035}, 100).startswith(
        "Compression changed calibration by +1.5"
    )
