"""Accuracy, balanced accuracy (with its standard error), macro-F1, per-class recall (with intervals) and the
confusion matrix.

`metrics_from_logits` is pure numpy so the ONNX path (bench, predict checks) computes the very
same numbers as the PyTorch path.
"""

from __future__ import annotations

import math

import numpy as np

from slimvit.spec import ModelSpec


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (sound near 100%, unlike the normal one)."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar(correct_a, correct_b) -> dict:
    """Exact McNemar test of two classifiers on the same images (two-sided binomial on the discordant pairs).

    Returns ``{"a_only", "b_only", "p", "n"}``: images only A got right, only B got right, and the
    probability of a split at least that uneven if both were equally accurate.
    """
    a = np.asarray(correct_a, bool)
    b = np.asarray(correct_b, bool)
    if a.shape != b.shape:
        raise ValueError(f"paired test needs the same images ({a.shape} vs {b.shape})")
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    m = a_only + b_only
    tail = sum(math.comb(m, i) for i in range(min(a_only, b_only) + 1)) / 2**m if m else 1.0
    return {"a_only": a_only, "b_only": b_only, "p": min(1.0, 2 * tail), "n": int(a.size)}


def compare(correct_a, correct_b, alpha: float = 0.05) -> str:
    """`better`, `worse` or `same` for A against B on the same images, by the exact McNemar test."""
    t = mcnemar(correct_a, correct_b)
    if t["p"] >= alpha:
        return "same"
    return "better" if t["a_only"] > t["b_only"] else "worse"


def balanced_accuracy(pred, labels) -> float:
    """Mean recall over the classes present in `labels` (plain accuracy when every class has as many images)."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    present = np.unique(labels)
    if not len(present):
        return 0.0
    return float(np.mean([(pred[labels == c] == c).mean() for c in present]))


def balanced_accuracy_se(pred, labels) -> float:
    """Standard error of balanced accuracy (the mean of independent per-class recalls), each class's
    variance Agresti-Caffo adjusted (one right and one wrong image added: (k+1)/(n+2)) so that a class at
    100% on a few images still counts as uncertain."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    present = np.unique(labels)
    if not len(present):
        raise ValueError("balanced accuracy of no images")
    var = 0.0
    for c in present:
        mask = labels == c
        n = int(mask.sum())
        p = (int((pred[mask] == c).sum()) + 1) / (n + 2)
        var += p * (1 - p) / (n + 2)
    return math.sqrt(var) / len(present)


def balanced_accuracy_diff(
    pred_a, labels_a, pred_b, labels_b, z: float = 1.959964
) -> tuple[float, float, float]:
    """Balanced accuracy of A minus B, with a 95% interval, for models tested on *other* images (other
    subsets or splits, where no paired test can be made): (difference, low, high), normal approximation
    with `balanced_accuracy_se` for each."""
    d = balanced_accuracy(pred_a, labels_a) - balanced_accuracy(pred_b, labels_b)
    half = z * math.hypot(balanced_accuracy_se(pred_a, labels_a), balanced_accuracy_se(pred_b, labels_b))
    return d, d - half, d + half


def metrics_from_predictions(pred: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    k = len(classes)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (labels.astype(np.int64), pred.astype(np.int64)), 1)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(1)
    predicted = cm.sum(0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    f1 = np.divide(
        2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0
    )
    present = support > 0
    return {
        "n": int(len(labels)),
        "accuracy": float(tp.sum() / max(1, len(labels))),
        "accuracy_ci": list(wilson(int(tp.sum()), int(len(labels)))),
        "balanced_accuracy": balanced_accuracy(pred, labels),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class_recall": {c: float(r) for c, r in zip(classes, recall, strict=True)},
        "per_class_recall_ci": {
            c: list(wilson(int(t), int(n))) for c, t, n in zip(classes, tp, support, strict=True)
        },
        "per_class_support": {c: int(n) for c, n in zip(classes, support, strict=True)},
        "classes": list(classes),
        "confusion": cm.tolist(),
        "pred": np.asarray(pred).astype(int).tolist(),
        "labels": np.asarray(labels).astype(int).tolist(),
    }


def metrics_from_logits(logits: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    return metrics_from_predictions(np.asarray(logits).argmax(1), np.asarray(labels), classes)


def predict_logits(model, x, batch_size: int = 128) -> np.ndarray:
    """Eval-mode logits for a float tensor (N, 3, H, W); distilled models average their two heads."""
    import torch

    from slimvit.models import eval_logits

    model.eval()
    outs = []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            outs.append(eval_logits(model(x[i : i + batch_size])).float())
    return torch.cat(outs).numpy()


def evaluate_model(model, data, spec: ModelSpec, split: str = "test") -> dict:
    """Metrics of `model` on one split of `data` (a slimvit.data.Data)."""
    from slimvit.data import to_tensor_batch

    images, labels = data.arrays(split)
    x = to_tensor_batch(images, spec.mean, spec.std)
    m = metrics_from_logits(predict_logits(model, x), labels, data.classes)
    m["split"] = split
    return m
