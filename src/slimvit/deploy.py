"""Choose the model to deploy from bench.json and write `deploy/` (`verify.py` re-checks it where it runs).

Torch-free (numpy + onnxruntime + Pillow): `slimvit deploy` re-chooses from an existing bench.json
in seconds, and `slimvit verify` runs on the edge box itself.

The choice reads **validation** accuracy only; test accuracy is reported, never used to choose.
With 180 validation images one image is 0.56 points, so accuracies within one image count as a tie.

- Without budgets: the fastest candidate within `deploy.max_drop` validation points of the distilled
  student (at least one validation image), the smaller file among those within `TIE` of the fastest.
- With budgets (`deploy.budget_ms`, `deploy.budget_mb`): the most accurate candidate on validation that
  fits every budget (and the drop); candidates within one image of the best are a tie, won by the faster,
  then the smaller.
- When validation cannot tell the candidates apart (all within one image: `saturated`): the least
  compressed candidate that fits the budgets, runs `deploy.min_speedup` times faster than the student's
  ONNX FP32 file and agrees best with the student, on its fastest file.
- Candidates are the ONNX variants of the pruned model and of every pruning-sweep model, and the
  teacher's own ONNX files. The compressions are chosen among first, by the rules above; the teacher
  then wins on validation accuracy alone (its agreement with the student measures no loss): with
  budgets where it is more than one validation image more accurate, without where it is faster. A
  variant marked not portable (int8 weights that saturate x86's non-VNNI kernels) is never deployed.
- Where no compression fits, the student's own ONNX FP32 file, uncompressed (it loses nothing against the
  student), if it fits the budgets; the teacher competes with it as with a compression. Only where neither
  fits is nothing deployed.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np

from slimvit.errors import ModelError, SlimvitError
from slimvit.io import atomic_path, atomic_write_json, read_json
from slimvit.labels import shape_label
from slimvit.layout import BENCH, DEPLOY, DEPLOY_MODEL, DEPLOY_RECORD, DEPLOYED, LOGITS, read_logits

log = logging.getLogger(__name__)

# beside deploy/: the new deployment while it is built, the old one during the swap
_BUILDING, _ASIDE = f".{DEPLOY}.new", f".{DEPLOY}.old"

TIE = 0.05
"""Latencies within this fraction of the fastest count as a tie: run-to-run noise on a shared 2-core
machine is larger than that, so the smaller file wins among them."""


class NothingFits(SlimvitError):
    """No candidate fits the budgets; the message names the budget and the closest candidate."""


VAL_METRIC = "validation balanced accuracy"
"""The name of what `val_score` returns, for sentences and table headers."""


def val_score(r: dict) -> float:
    """What every choice reads (deploy, and the report's front, budget sentences and candidate table): validation balanced accuracy (mean per-class recall: a rare class counts as
    much as a common one; on a split with as many images per class it is accuracy). Rows of an older
    bench.json have accuracy only."""
    b = r.get("val_balanced_accuracy")
    return r["val_accuracy"] if b is None else b


def _n_val(rows: list[dict]) -> int:
    return max((r.get("val_n") or 0) for r in rows) or 180


def is_candidate(r: dict) -> bool:
    return bool(r.get("candidate")) and r["runtime"] != "pytorch"


def is_student(r: dict) -> bool:
    """A row of the student itself (uncompressed): deployed only where no compression fits (`_student_itself`)."""
    return r.get("stage") == "student"


def nothing_deployed(run_dir: str | Path) -> bool:
    """Whether `run_dir` is a finished run whose deploy rule found nothing to deploy (its deploy.json says
    so): `slimvit run` then exits 2, as it does for a refusal that leaves no such record."""
    record = Path(run_dir) / DEPLOYED
    return record.exists() and read_json(record).get("deployed") is False


def is_teacher(r: dict) -> bool:
    """The teacher's own ONNX file: a candidate judged on its validation accuracy alone (it was never
    compressed from the student, so agreement with the student says nothing of what it lost)."""
    return r.get("stage") == "teacher"


def describe(r: dict) -> str:
    shape = shape_label(r)  # the stage's name without the shape its folder name repeats (sweep/r0.3-d6)
    return (
        f"{r['stage'].split('/')[0]} {shape + ' ' if shape else ''}{r['runtime']} {r['precision']}: "
        f"{r['latency_ms_p50']:.2f} ms, "
        f"{r['size_mb']:.2f} MB, validation balanced accuracy {100 * val_score(r):.2f}%"
    )


def _agree(r: dict) -> float | None:
    """A candidate's agreement with the student (fidelity.fidelity); None in a bench.json of an older version."""
    return r.get("agreement")


def fidelity_source(rows: list[dict]) -> str:
    """What the agreement figures were measured on, in words."""
    n = max((r.get("agreement_n") or 0) for r in rows)
    n_val = _n_val(rows)
    return (
        f"{n} views where the teacher, when benched, names the student's class too ({n_val} validation images, "
        "their flips/rotations and any unlabeled images)"
    )


def saturated(cands: list[dict]) -> bool:
    """Validation cannot tell these candidates (those its floor let through) apart: every one within one
    validation image of the best (on 18 images, typically all at 100%)."""
    if len(cands) < 2:
        return False
    vals = [val_score(r) for r in cands]
    return max(vals) - min(vals) <= 1 / _n_val(cands) + 1e-9


def choose(
    rows: list[dict],
    max_drop: float = 0.5,
    budget_ms: float | None = None,
    budget_mb: float | None = None,
    min_agreement: float = 95.0,
    min_speedup: float = 2.0,
) -> tuple[dict, str]:
    """The candidate to deploy and a sentence saying why; NothingFits when no candidate fits.

    The student's compressions are chosen among first (`choose_compressed`), the student's own file where
    none fits (`_student_itself`); then the teacher's own files compete on validation alone
    (`_teacher_instead`). Arguments as `choose_compressed`'s.
    """
    vit = [r for r in rows if not (is_candidate(r) and is_teacher(r))]
    teachers = [r for r in rows if is_candidate(r) and is_teacher(r) and r.get("portable", True) is not False]
    try:
        best, why = choose_compressed(vit, max_drop, budget_ms, budget_mb, min_agreement, min_speedup)
    except (NothingFits, ModelError) as e:  # no compression fits (or none was benchmarked)
        own = _student_itself(rows, budget_ms, budget_mb, e)
        won = _teacher_instead(teachers, own[0] if own else None, rows, max_drop, budget_ms, budget_mb)
        if won is not None:
            return won
        if own is None:  # the compressions' own refusal says what failed
            raise
        return own
    return _teacher_instead(teachers, best, rows, max_drop, budget_ms, budget_mb) or (best, why)


def _student_itself(rows: list[dict], budget_ms, budget_mb, refusal: Exception) -> tuple[dict, str] | None:
    """The student's own ONNX FP32 file, uncompressed, and why, where no compression of it fits (`refusal`
    says what they failed): it loses nothing against the student, so only the budgets can rule it out (None
    where it does not fit them, or the bench has no such row). The teacher then competes with it as with a
    compression (`_teacher_instead`)."""
    s = student_onnx(rows)
    if s is None or s.get("file") is None:
        return None
    if (budget_ms is not None and s["latency_ms_p50"] > budget_ms) or (
        budget_mb is not None and s["size_mb"] > budget_mb
    ):
        return None
    if isinstance(refusal, NothingFits):
        reason = f"no compression of the student fits: {str(refusal).removeprefix('no candidate fits ')}"
    else:  # ModelError: the bench has no compression at all (pruning off, or none exported)
        reason = "the bench holds no compression of the student"
    why = (
        f"the student's own file, uncompressed: {describe(s)} (test {100 * s['accuracy']:.2f}%, reported "
        f"only); {reason}"
    )
    return {**s, "validation_saturated": False}, why


def _teacher_instead(
    teachers: list[dict], best: dict | None, rows: list[dict], max_drop: float, budget_ms, budget_mb
) -> tuple[dict, str] | None:
    """The teacher's file to deploy instead of `best` (the compression chosen, or the student's own file
    where no compression fits), and why; None to keep `best`.

    A teacher file must fit the budgets and lie within `max_drop` of the student on validation (its
    agreement with the student is no test: it was never compressed from it). It wins where no compression
    fits; with budgets, where it beats `best` on validation by more than one image (the most accurate
    that fits); without, where it is faster than `best` beyond `TIE` (the fastest within the drop)."""
    ref = next((r for r in rows if r.get("reference")), None)
    fits = [
        r
        for r in teachers
        if (budget_ms is None or r["latency_ms_p50"] <= budget_ms)
        and (budget_mb is None or r["size_mb"] <= budget_mb)
        and (
            ref is None
            or ref.get("val_accuracy") is None
            or val_score(r) >= val_score(ref) - max(max_drop / 100, 1 / _n_val(rows)) - 1e-9
        )
    ]
    if not fits:
        return None
    budgeted = budget_ms is not None or budget_mb is not None
    t = max(fits, key=lambda r: (val_score(r), -r["latency_ms_p50"])) if budgeted else _fastest(fits)
    own = best is not None and is_student(best)  # no compression fits: the student's file does
    rival = "the student's own file" if own else None
    if best is None:
        reason = "no compression of the student fits" + (
            ", nor does the student's own file" if student_onnx(rows) else ""
        )
    elif budgeted and val_score(t) > val_score(best) + 1 / _n_val(rows) + 1e-9:
        reason = f"it beats {rival or 'the best compression that fits'} ({describe(best)}) by more than one validation image"
    elif not budgeted and t["latency_ms_p50"] < best["latency_ms_p50"] * (1 - TIE):
        reason = f"it is faster than {rival or 'the fastest compression within the drop'} ({describe(best)})"
    else:
        return None
    why = (
        f"the teacher's own file: {describe(t)} (test {100 * t['accuracy']:.2f}%, reported only), within the "
        f"budgets and {max_drop:g} points of the student on validation; "
        + ("no compression of the student fits, and " if own else "")
        + reason
    )
    return {**t, "validation_saturated": False}, why


def choose_compressed(
    rows: list[dict],
    max_drop: float = 0.5,
    budget_ms: float | None = None,
    budget_mb: float | None = None,
    min_agreement: float = 95.0,
    min_speedup: float = 2.0,
) -> tuple[dict, str]:
    """The compression of the student (pruned, sweep) to deploy and a sentence saying why; NothingFits
    when none fits.

    Args:
        rows: bench rows; candidates have ``candidate: True``, every row ``val_balanced_accuracy``
            (or, from an older bench, ``val_accuracy``), and ``agreement`` with the student.
        max_drop: validation balanced-accuracy points a candidate may lose against the distilled student.
        min_agreement: the share (%) of validation views (and unlabeled images) on which a candidate must
            name the student's class; a candidate below it is never deployed.
        min_speedup: on saturated validation, the least compressed candidate at least this many times faster
            than the student's ONNX FP32 file (the bench row ``stage: student, runtime: onnxruntime,
            precision: fp32``) is deployed; where none is, or the bench has no such row, the least
            compressed of all.
    """
    cands = [r for r in rows if is_candidate(r)]
    if not cands:
        raise ModelError("bench.json has no deployment candidates (pruned ONNX models); run `slimvit bench`")
    one_image = 1 / _n_val(cands)
    ref = next((r for r in rows if r.get("reference")), None)
    has_ref = ref is not None and ref.get("val_accuracy") is not None
    ref_val = val_score(ref) if has_ref else max(map(val_score, cands))
    floor = ref_val - max(max_drop / 100, one_image) - 1e-9
    portable = [r for r in cands if r.get("portable", True) is not False]
    agree_floor = min_agreement / 100 - 1e-9
    checks = [
        (
            f"validation balanced accuracy >= {100 * floor:.2f}% (max drop {max_drop:g} points of the student's "
            f"{100 * ref_val:.2f}%, at least one image)",
            lambda r: val_score(r) >= floor,
        ),
    ]
    if any(_agree(r) is not None for r in cands):
        checks.append(
            (
                f"agreement with the student >= {min_agreement:g}% of {fidelity_source(cands)}",
                lambda r: _agree(r) is None or _agree(r) >= agree_floor,
            )
        )
    if budget_ms is not None:
        checks.append((f"batch-1 p50 <= {budget_ms:g} ms", lambda r: r["latency_ms_p50"] <= budget_ms))
    if budget_mb is not None:
        checks.append((f"file <= {budget_mb:g} MB", lambda r: r["size_mb"] <= budget_mb))
    ok = [r for r in portable if all(c(r) for _, c in checks)]
    if not ok:
        closest = min(portable or cands, key=lambda r: _excess(r, floor, budget_ms, budget_mb, agree_floor))
        failed = [name for name, c in checks if not c(closest)]
        raise NothingFits(
            f"no candidate fits {' and '.join(failed) or 'the budgets'}; closest: {describe(closest)}"
        )
    passed_val = [r for r in portable if val_score(r) >= floor]  # what validation alone lets through
    flat = saturated(passed_val)
    if flat:  # validation cannot see what compression cost: compress no further than needed
        fast, speed_rule = _fast_enough(ok, rows, min_speedup)
        pool = _most_faithful(fast)
        most = max(map(_kept, pool))
        best = _fastest([r for r in pool if _kept(r) == most])
        rule = (
            f"of the candidates that fit {', '.join(n for n, _ in checks)}{speed_rule} and agree best with the "
            f"student (within {100 * AGREE_TIE:g} point), the least compressed (the most parameters) on its fastest "
            f"file (the smallest among those within {TIE:.0%} of its p50)"
        )
    elif budget_ms is None and budget_mb is None:
        best = _fastest(ok)
        rule = (
            f"the fastest candidate with {' and '.join(n for n, _ in checks)}; the smallest file among those "
            f"within {TIE:.0%} of the fastest p50"
        )
    else:
        top = max(map(val_score, ok))
        tied = _most_faithful([r for r in ok if val_score(r) >= top - one_image - 1e-9])
        best = min(tied, key=lambda r: (r["latency_ms_p50"], r["size_mb"]))
        rule = (
            f"the most accurate candidate on validation that fits {', '.join(n for n, _ in checks)} "
            f"(within one validation image of the best counts as a tie, won by agreement with the student "
            f"within {100 * AGREE_TIE:g} point, then by the faster)"
        )
    excluded = len(cands) - len(portable)
    why = (
        f"{rule}: {describe(best)} (test {100 * best['accuracy']:.2f}%, reported only); "
        f"{len(ok)} of {len(cands)} candidates qualified"
        + (f"; {excluded} not portable to x86 CPUs without VNNI, never deployed" if excluded else "")
    )
    if flat:
        why += "; " + saturation_note(passed_val, best)
    return {**best, "validation_saturated": flat}, why


def student_onnx(rows: list[dict]) -> dict | None:
    """The bench row of the student's ONNX FP32 file (what compression is measured against); None if absent."""
    return next(
        (
            r
            for r in rows
            if is_student(r) and r.get("runtime") == "onnxruntime" and r.get("precision") == "fp32"
        ),
        None,
    )


def _fast_enough(ok: list[dict], rows: list[dict], min_speedup: float) -> tuple[list[dict], str]:
    """The candidates in `ok` at least `min_speedup` times faster than the student's ONNX FP32 file, and
    the words for the rule; all of `ok` (saying why) where there is no floor or nothing meets it."""
    ref = student_onnx(rows)
    if min_speedup <= 1 or ref is None:
        return ok, ""
    limit = ref["latency_ms_p50"] / min_speedup
    fast = [r for r in ok if r["latency_ms_p50"] <= limit]
    words = (
        f" and run at least {min_speedup:g}x faster than the student's ONNX FP32 file (p50 <= {limit:.2f} ms)"
    )
    if not fast:
        return (
            ok,
            f" (none runs {min_speedup:g}x faster than the student's ONNX FP32 file: speed floor dropped)",
        )
    return fast, words


def _kept(r: dict) -> tuple:
    """How little a candidate was compressed, for comparison: its parameter count, then a lower pruning
    ratio, then more blocks (an older bench row has no parameter count). Every file of one shape ties."""
    depth = r.get("depth")
    return (r.get("params") or 0, -(r.get("ratio") or 0.0), 1e9 if depth is None else depth)


def _most_faithful(rows: list[dict]) -> list[dict]:
    """The rows whose agreement with the student is within AGREE_TIE of the best: fidelity separates what
    validation cannot (all of them where no row has an agreement figure)."""
    if all(_agree(r) is None for r in rows):
        return rows
    best = max(_agree(r) or 0.0 for r in rows)
    return [r for r in rows if (_agree(r) or 0.0) >= best - AGREE_TIE - 1e-9]


def _fastest(rows: list[dict]) -> dict:
    """The fastest row, the smallest file among those within TIE of it."""
    fastest = min(r["latency_ms_p50"] for r in rows)
    return min((r for r in rows if r["latency_ms_p50"] <= fastest * (1 + TIE)), key=lambda r: r["size_mb"])


def saturation_note(cands: list[dict], best: dict) -> str:
    """The sentence saying that validation could not vouch for the choice among `cands` (those its floor
    let through), what it rested on instead, and what the user can do. It follows the rule, which names the
    views the agreement was measured on (fidelity_source)."""
    lo, hi = min(map(val_score, cands)), max(map(val_score, cands))
    scored = f"{100 * hi:.2f}%" if hi - lo < 1e-9 else f"{100 * lo:.2f}-{100 * hi:.2f}%"
    agree = _agree(best)
    return (
        f"validation has {_n_val(cands)} images and the {len(cands)} candidates it lets through scored {scored} "
        "on it, within one image: it cannot tell them apart, so the choice compressed no further than the "
        "budgets and the speed floor (`--min-speedup`) ask"
        + (
            f" (its agreement with the student on the views above: {100 * agree:.2f}%)"
            if agree is not None
            else ""
        )
        + "; more validation images let a choice see what a deeper cut costs, and `--budget-ms` / "
        "`--budget-mb` deploy the least compressed candidate that meets them"
    )


AGREE_TIE = 0.005
"""Agreements with the student within this fraction of the best count as a tie (a budgeted choice)."""


def _excess(r: dict, floor: float, budget_ms, budget_mb, agree_floor: float = 0.0) -> float:
    """How far a candidate is from fitting: the largest relative overshoot of any budget."""
    over = [max(0.0, (floor - val_score(r)) * 10), max(0.0, (agree_floor - (_agree(r) or 1.0)) * 10)]
    if budget_ms is not None:
        over.append(max(0.0, r["latency_ms_p50"] / budget_ms - 1))
    if budget_mb is not None:
        over.append(max(0.0, r["size_mb"] / budget_mb - 1))
    return max(over)


def budgets(cfg) -> dict:
    d = cfg.deploy
    return {
        "budget_ms": d.budget_ms,
        "budget_mb": d.budget_mb,
        "max_drop": d.max_drop,
        "min_agreement": d.min_agreement,
        "min_speedup": d.min_speedup,
    }


def review_settings(cfg) -> dict:
    return {"review_rate": cfg.deploy.review_rate, "target_accuracy": cfg.deploy.target_accuracy}


def split_logits(run_dir: Path, bench: dict, key: str, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(logits, labels) of one bench row on a split (val or test); None where bench kept no logits of it."""
    logits = read_logits(Path(run_dir) / LOGITS, split, key)
    if split == "val":
        labels = bench.get("val_labels")
    else:
        t = bench.get("test_images") or {}
        labels = [bench["classes"].index(c) for c in t.get("labels", [])]
    if logits is None or labels is None or len(labels) != len(logits):
        return None
    return logits, np.asarray(labels)


def _calibrated(run_dir: Path, bench: dict, key: str, split: str, temperature: float):
    """(confidence, correct) of a variant's calibrated predictions on a split; None without its logits."""
    from slimvit.calibrate import softmax

    if (got := split_logits(run_dir, bench, key, split)) is None:
        return None
    p = softmax(got[0], temperature)
    return p.max(1), p.argmax(1) == got[1]


def review_plan(
    run_dir: Path,
    bench: dict,
    key: str,
    review_rate: float | None = None,
    target_accuracy: float | None = None,
) -> dict | None:
    """The confidence threshold under which the deployed model's images go to a person, chosen on the
    **validation** images (calibrated confidences): the one that sends at most `review_rate` of them, or the
    lowest whose accepted images reach `target_accuracy` (%). With its bootstrap range on validation and
    what it does on test (reported, never used to choose). None when neither is asked."""
    from slimvit import calibrate

    if review_rate is None and target_accuracy is None:
        return None
    temperature = (bench.get("calibration") or {}).get(key, {}).get("temperature", 1.0)
    val = _calibrated(run_dir, bench, key, "val", temperature)
    if val is None:
        raise ModelError(
            "bench.json (or bench_logits.npz) has no validation logits to choose a review threshold (a bench "
            "of an older slimvit); run `slimvit bench --force`"
        )
    conf, right = val
    if review_rate is not None:
        rule = f"send at most {100 * review_rate:g}% of images to review"

        def pick(c, r):
            return calibrate.threshold_for_rate(c, review_rate)
    else:
        rule = f"{target_accuracy:g}% accuracy on the images not sent to review"

        def pick(c, r):
            return calibrate.threshold_for_accuracy(c, r, target_accuracy / 100)

    threshold = pick(conf, right)
    if threshold is None:
        best = max(calibrate.risk_coverage(conf, right), key=lambda q: q["accuracy"])
        raise NothingFits(
            f"--target-accuracy {target_accuracy:g}: no threshold reaches it on the {len(conf)} validation images "
            f"(the best is {100 * best['accuracy']:.2f}% on the {100 * best['coverage']:.0f}% most confident)"
        )
    spread = calibrate.threshold_spread(conf, right, pick)
    plan = {
        "rule": rule,
        "threshold": threshold,
        "temperature": temperature,
        "threshold_range": spread,
        "val": calibrate.operating_point(conf, right, threshold),
        "val_range": [
            calibrate.operating_point(conf, right, t) if t is not None else None
            for t in (spread["lo"], spread["hi"])
        ],
    }
    test = _calibrated(run_dir, bench, key, "test", temperature)
    if test is not None:
        plan["test"] = calibrate.operating_point(*test, threshold)  # reported only
    return plan


def write_deploy(
    run_dir: Path,
    bench: dict,
    chosen: dict,
    why: str,
    budget: dict,
    folder: Path | None = None,
    review: dict | None = None,
) -> Path:
    """`model.onnx` (the chosen file, its metadata completed) and `deploy.json` in `folder` (default
    `deploy/`)."""
    from slimvit import runtime

    run_dir = Path(run_dir)
    folder = Path(folder) if folder is not None else run_dir / DEPLOY
    dst = folder / DEPLOY_MODEL
    validated = bench.get("validated_on") or {}
    temperature = (bench.get("calibration") or {}).get(chosen["key"], {}).get("temperature", 1.0)
    try:
        runtime.update_metadata(
            run_dir / chosen["file"],
            dst,
            runtime=chosen["runtime"],
            precision=chosen["precision"],
            stage=chosen["stage"],
            ratio=chosen.get("ratio"),
            depth=chosen.get("depth"),
            portable=chosen.get("portable", True),
            validated_on=validated,
            temperature=temperature,
            review_threshold=review["threshold"] if review else None,
        )
    except ImportError:  # the core (edge) install has no onnx: the file as built; deploy.json says the rest
        with atomic_path(dst) as tmp:
            shutil.copyfile(run_dir / chosen["file"], tmp)
    record = {
        "deployed": True,
        "key": chosen["key"],
        "file": DEPLOY_MODEL,
        "source": chosen["file"],
        "runtime": chosen["runtime"],
        "precision": chosen["precision"],
        "stage": chosen["stage"],
        "ratio": chosen.get("ratio"),
        "depth": chosen.get("depth"),
        "why": why,
        "budgets": budget,
        "temperature": temperature,
        "calibration": (bench.get("calibration") or {}).get(chosen["key"]),
        "review": review,
        "review_threshold": review["threshold"] if review else None,
        "chosen": time.strftime("%Y-%m-%d %H:%M:%S"),
        "threads": bench["threads"],
        "latency_ms_p50": chosen["latency_ms_p50"],
        "size_mb": dst.stat().st_size / 1e6,
        "val_accuracy": chosen["val_accuracy"],
        "val_accuracy_ci": chosen.get("val_accuracy_ci"),
        "val_balanced_accuracy": chosen.get("val_balanced_accuracy"),
        "agreement": chosen.get("agreement"),
        "agreement_n": chosen.get("agreement_n"),
        "validation_saturated": chosen.get("validation_saturated"),
        "balanced_accuracy": chosen.get("balanced_accuracy"),
        "accuracy": chosen["accuracy"],
        "accuracy_ci": chosen.get("accuracy_ci"),
        "portable": chosen.get("portable", True),
        "safe_on": chosen.get("safe_on"),
        "validated_on": validated,
        "test_images": _test_images(bench, chosen),
    }
    atomic_write_json(folder / DEPLOY_RECORD, record)
    return dst


def _test_images(bench: dict, chosen: dict) -> dict | None:
    """The test images with their labels and the deployed model's predictions: `verify` re-checks them."""
    t = bench.get("test_images")
    preds = (bench.get("predictions") or {}).get(chosen["key"])
    if not t or preds is None:
        return None
    classes = bench["classes"]
    return {
        "root": t["root"],
        "paths": t["paths"],
        "labels": t["labels"],
        "pred": [classes[i] for i in preds],
    }


def clear_deploy(run_dir: Path) -> None:
    shutil.rmtree(Path(run_dir) / DEPLOY, ignore_errors=True)


def swap_in(run_dir: Path, new: Path) -> None:
    """Replace `deploy/` by the finished folder `new`: the old one is renamed aside and the new one renamed
    into place, so `deploy/` is never a half-written folder (a reader sees the old model or the new)."""
    dst = Path(run_dir) / DEPLOY
    old = dst.with_name(_ASIDE)
    restore_swap(run_dir)
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        dst.rename(old)
    new.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


def run_deploy(cfg, run_dir: str | Path, strict: bool = True) -> dict:
    """Choose from an existing bench.json (no re-timing), write `deploy/`, and check it where it will run.

    The check is `slimvit verify` in a process of its own (no torch, as on an edge box): the edge path's
    accuracy on the test images must equal bench's (paired), and its batch-1 latency is recorded beside
    bench's. When nothing fits the budgets, `deploy/` holds only deploy.json saying why; `strict` then
    raises NothingFits (the `slimvit deploy` command), else the pipeline goes on to the report and the
    CLI exits non-zero at the end.
    """
    run_dir = Path(run_dir)
    path = run_dir / BENCH
    if not path.exists():
        raise ModelError(f"no '{path}'; run `slimvit bench` (or `slimvit run`) first")
    bench = read_json(path)
    budget = budgets(cfg)
    try:
        chosen, why = choose(bench["rows"], **budget)
    except NothingFits as e:
        if strict:  # `slimvit deploy`: what is deployed stays
            raise NothingFits(f"{e}; {deployed_now(run_dir)}") from None
        new = _fresh(run_dir)
        atomic_write_json(new / DEPLOY_RECORD, {"deployed": False, "error": str(e), "budgets": budget})
        swap_in(run_dir, new)
        return {"deployed": None, "error": str(e)}  # the CLI says it in one line at the end
    review = review_plan(run_dir, bench, chosen["key"], **review_settings(cfg))
    new = _fresh(run_dir)
    write_deploy(run_dir, bench, chosen, why, budget, folder=new, review=review)
    from slimvit.verify import standalone_check

    check = standalone_check(new, chosen)
    record = read_json(new / DEPLOY_RECORD)
    record["predict_check"] = check
    atomic_write_json(new / DEPLOY_RECORD, record)
    swap_in(run_dir, new)
    log.info("deployed: %s", why)
    if review:
        v = review["val"]
        log.info(
            "review: confidence below %.3f goes to a person (%s): on validation %d of %d images (%.1f%%), %s of "
            "the rest right",
            review["threshold"],
            review["rule"],
            v["review"],
            v["n"],
            100 * v["review_rate"],
            "-" if v["accuracy_accepted"] is None else f"{100 * v['accuracy_accepted']:.2f}%",
        )
    if check and not check["agrees"]:
        log.warning(
            "slimvit predict gives %.4f on the test images, bench measured %.4f for the deployed model",
            check["accuracy"],
            chosen["accuracy"],
        )
    return {
        "deployed": chosen["key"],
        "latency_ms_p50": chosen["latency_ms_p50"],
        "size_mb": chosen["size_mb"],
        "val_accuracy": chosen["val_accuracy"],
    }


def deployed_now(run_dir: Path) -> str:
    """What stays deployed in a run folder, in words."""
    restore_swap(run_dir)
    rec = Path(run_dir) / DEPLOYED
    try:
        d = read_json(rec)
    except (OSError, ValueError):
        return "nothing was deployed before, nothing is now"
    if not d.get("deployed", True):
        return "nothing was deployed before, nothing is now"
    return f"{d.get('key')} stays deployed in {rec.parent} (it and REPORT.md are unchanged)"


def restore_swap(run_dir: Path) -> None:
    """A swap killed between its two renames left no `deploy/` and the old one aside: put it back."""
    dst = Path(run_dir) / DEPLOY
    old = dst.with_name(_ASIDE)
    if not dst.exists() and old.is_dir():
        old.rename(dst)


def _fresh(run_dir: Path) -> Path:
    """An empty folder beside `deploy/` to build the new deployment in (a leftover of a killed run is
    removed)."""
    new = Path(run_dir) / _BUILDING
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    return new
