"""The statistics the report's sentences rest on: the accuracy/latency front, paired tests and their verdict,
per-class recall.

The tests themselves (exact McNemar, Wilson intervals, balanced accuracy) are in `slimvit.evaluate`; what is
here applies them to bench rows and eval.json predictions and reads like the report, so it stays beside it.
"""

from __future__ import annotations

import numpy as np

from slimvit.deploy import val_score
from slimvit.evaluate import mcnemar, wilson
from slimvit.labels import pct_ci
from slimvit.report.load import bench_predictions


def front(rows: list[dict]) -> list[dict]:
    """Candidates no other candidate beats on both validation balanced accuracy (`deploy.val_score`, what the
    deploy choice reads) and batch-1 latency (fastest first)."""
    cands = sorted(
        (r for r in rows if r.get("candidate") and r.get("val_accuracy") is not None),
        key=lambda r: (r["latency_ms_p50"], -val_score(r)),
    )
    out, best = [], -1.0
    for r in cands:
        if val_score(r) > best + 1e-12:
            out.append(r)
            best = val_score(r)
    return out


def paired(run: dict, key_a: str, key_b: str) -> dict | None:
    """Exact McNemar test of two bench rows on the same test images (None if predictions are missing)."""
    a, b = bench_predictions(run, key_a), bench_predictions(run, key_b)
    if a is None or b is None:
        return None
    return mcnemar(a[0] == a[1], b[0] == b[1])


def eval_paired(ev: dict, a: str, b: str) -> dict | None:
    """Exact McNemar test of two trained models' eval.json predictions on the same test images."""
    if a not in ev or b not in ev or "pred" not in ev[a] or "pred" not in ev[b]:
        return None
    y_a, y_b = np.array(ev[a]["labels"]), np.array(ev[b]["labels"])
    if y_a.shape != y_b.shape or (y_a != y_b).any():
        return None
    return mcnemar(np.array(ev[a]["pred"]) == y_a, np.array(ev[b]["pred"]) == y_b)


def verdict(t: dict | None, a: str, b: str) -> str:
    """One phrase for a paired test: whether A and B differ on these images."""
    if t is None:
        return "no paired test (predictions missing)"
    diff = t["a_only"] - t["b_only"]
    if t["p"] >= 0.05:
        return (
            f"no real difference ({t['a_only']} images only {a} got right, {t['b_only']} only {b}; "
            f"exact McNemar p={t['p']:.2g})"
        )
    better = a if diff > 0 else b
    return (
        f"{better} is better ({t['a_only']} vs {t['b_only']} discordant images, exact McNemar p={t['p']:.2g})"
    )


def accuracy_text(correct: np.ndarray) -> str:
    """Accuracy of a correct-per-image array in points with its Wilson 95% interval, e.g. `98.89 (97.2-99.6)`:
    the benchmark scripts' table cells."""
    return pct_ci(correct.mean(), wilson(int(correct.sum()), len(correct)), unit="")


def paired_text(a: np.ndarray, b: np.ndarray) -> str:
    """A minus B in points on the same images, with the exact McNemar test: `+0.28 (2/1, p=1)` (images only A
    got right / only B, p)."""
    t = mcnemar(a, b)
    return f"{100 * (a.mean() - b.mean()):+.2f} ({t['a_only']}/{t['b_only']}, p={t['p']:.2g})"


def recalls(pred: np.ndarray, labels: np.ndarray, k: int) -> list[tuple[int, int]]:
    """(right, images) per class."""
    return [(int(((pred == c) & (labels == c)).sum()), int((labels == c).sum())) for c in range(k)]


def weakest(per_class: list[tuple[int, int]]) -> int:
    """The class of lowest recall among those with images (`recalls`); of two alike, the larger."""
    r = per_class
    return min((i for i in range(len(r)) if r[i][1]), key=lambda i: (r[i][0] / r[i][1], -r[i][1]))
