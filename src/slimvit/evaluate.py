"""Accuracy, macro-F1, per-class recall and the confusion matrix.

`metrics_from_logits` is pure numpy so the ONNX path (bench, predict checks) computes the very
same numbers as the PyTorch path.
"""

from __future__ import annotations

import numpy as np


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
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class_recall": {c: float(r) for c, r in zip(classes, recall, strict=True)},
        "classes": list(classes),
        "confusion": cm.tolist(),
    }


def metrics_from_logits(logits: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    return metrics_from_predictions(np.asarray(logits).argmax(1), np.asarray(labels), classes)


def predict_logits(model, x, batch_size: int = 128) -> np.ndarray:
    """Eval-mode logits for a float tensor (N, 3, H, W); distilled models average their two heads."""
    import torch

    model.eval()
    outs = []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            out = model(x[i : i + batch_size])
            if isinstance(out, (tuple, list)):
                out = (out[0] + out[1]) / 2
            outs.append(out.float())
    return torch.cat(outs).numpy()


def evaluate_model(model, data, spec: dict, split: str = "test") -> dict:
    """Metrics of `model` on one split of `data` (a slimvit.data.Data)."""
    from slimvit.data import to_tensor_batch

    images, labels = data.arrays(split)
    x = to_tensor_batch(images, spec["mean"], spec["std"])
    m = metrics_from_logits(predict_logits(model, x), labels, data.classes)
    m["split"] = split
    return m
