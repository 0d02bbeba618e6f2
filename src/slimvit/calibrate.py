"""How far a model's confidence can be believed, and what a review threshold buys. numpy only (no torch):
the deploy step, `slimvit predict` and `slimvit verify` use it on the edge.

- Temperature scaling (Guo et al. 2017): one scalar T per model, fitted on **validation** logits by
  minimising the negative log-likelihood; the calibrated probabilities are softmax(logits / T). It never
  changes which class a model names, only how sure it says it is.
- ECE (15 equal-width confidence bins), NLL and the Brier score measure calibration on test.
- A review threshold: images whose calibrated confidence is below it go to a person. It is chosen on
  validation, for a share sent to review (`review_rate`) or an accuracy wanted on the rest
  (`target_accuracy`); the risk-coverage curve shows every operating point.
"""

from __future__ import annotations

import math

import numpy as np

BINS = 15
T_RANGE = (0.25, 10.0)
"""Temperatures searched. Below 0.25 a model's confidence would be sharpened past anything a small
validation split can support (with every validation image right, the NLL falls as T -> 0)."""


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true classes."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises the NLL of `labels` (golden-section search on log T; the NLL of a
    temperature-scaled softmax is unimodal in log T). 1.0 for an empty split."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return 1.0
    lo, hi = math.log(T_RANGE[0]), math.log(T_RANGE[1])
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(logits, labels, math.exp(a)), nll(logits, labels, math.exp(b))
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(logits, labels, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(logits, labels, math.exp(b))
    return float(math.exp((lo + hi) / 2))


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error: the |accuracy - confidence| gap of each equal-width confidence bin,
    weighted by the share of images in it."""
    conf, right = probs.max(1), probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.mean() * abs(right[m].mean() - conf[m].mean())
    return float(total)


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean squared distance between the probabilities and the one-hot labels (summed over classes)."""
    onehot = np.eye(probs.shape[1])[labels]
    return float(((probs - onehot) ** 2).sum(1).mean())


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> list[dict]:
    """Per confidence bin: its range, images, mean confidence and accuracy (the reliability diagram)."""
    conf, right = probs.max(1), probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    out = []
    for b in range(bins):
        m = idx == b
        out.append(
            {
                "lo": float(edges[b]),
                "hi": float(edges[b + 1]),
                "n": int(m.sum()),
                "confidence": float(conf[m].mean()) if m.any() else None,
                "accuracy": float(right[m].mean()) if m.any() else None,
            }
        )
    return out


def fitted_temperature(logits_val, labels_val) -> tuple[float, str | None]:
    """(temperature, why it was not fitted or None). With no validation error the likelihood only falls as
    the temperature does (sharper is always "better"): nothing to calibrate on, so the model is left as it
    is (1.0)."""
    labels_val = np.asarray(labels_val, dtype=np.int64)
    if len(labels_val) == 0:
        return 1.0, "no validation images"
    errors = int((np.asarray(logits_val).argmax(1) != labels_val).sum())
    if errors == 0:
        return 1.0, f"all {len(labels_val)} validation images right: no error to calibrate on, left at 1.0"
    return fit_temperature(logits_val, labels_val), None


def calibration(logits_val, labels_val, logits_test, labels_test) -> dict:
    """A model's temperature (fitted on validation) and its test ECE, NLL and Brier score before and after."""
    t, not_fitted = fitted_temperature(logits_val, labels_val)
    p1, pt = softmax(logits_test), softmax(logits_test, t)
    return {
        "temperature": t,
        "not_fitted": not_fitted,
        "ece": ece(p1, labels_test),
        "ece_t": ece(pt, labels_test),
        "nll": nll(logits_test, labels_test),
        "nll_t": nll(logits_test, labels_test, t),
        "brier": brier(p1, labels_test),
        "brier_t": brier(pt, labels_test),
        "n_test": int(len(labels_test)),
        "n_val": int(len(labels_val)),
    }


# --------------------------------------------------------------------------- review


def risk_coverage(conf: np.ndarray, right: np.ndarray) -> list[dict]:
    """Accepting the most confident images first: for each number accepted, the share accepted, the
    threshold (the lowest confidence accepted) and the accuracy on the accepted ones."""
    order = np.argsort(-conf, kind="stable")
    c, r = conf[order], right[order].astype(float)
    hits = np.cumsum(r)
    n = len(c)
    return [
        {"coverage": (k + 1) / n, "threshold": float(c[k]), "accuracy": float(hits[k] / (k + 1))}
        for k in range(n)
    ]


def threshold_for_rate(conf: np.ndarray, rate: float) -> float:
    """The confidence threshold that sends at most `rate` of these images to review (images strictly
    below it go); 0.0 sends none."""
    n = len(conf)
    k = int(math.floor(rate * n + 1e-9))  # images that may go to review
    if k <= 0 or n == 0:
        return 0.0
    s = np.sort(conf)
    # accept from s[k] up; ties at s[k] are accepted, so at most k go below
    return float(s[k]) if k < n else float(s[-1]) + 1e-12


def threshold_for_accuracy(conf: np.ndarray, right: np.ndarray, target: float) -> float | None:
    """The lowest threshold whose accepted images reach `target` accuracy (the most images accepted);
    None when no non-empty set of the most confident images reaches it."""
    best = None
    curve = risk_coverage(conf, right)
    for k, p in enumerate(curve):
        # only where a group of tied confidences ends: `conf >= threshold` accepts every tied image
        end_of_ties = k == len(curve) - 1 or curve[k + 1]["threshold"] < p["threshold"]
        if end_of_ties and p["accuracy"] >= target - 1e-12:
            best = p["threshold"]
    return best


def operating_point(conf: np.ndarray, right: np.ndarray, threshold: float) -> dict:
    """What a threshold does on a set of images: the share sent to review and the accuracy on the rest."""
    accept = conf >= threshold
    n, k = len(conf), int(accept.sum())
    hits = int(right[accept].sum())
    return {
        "n": n,
        "accepted": k,
        "review": n - k,
        "review_rate": (n - k) / n if n else 0.0,
        "accuracy_accepted": hits / k if k else None,
        "correct_accepted": hits,
    }


def threshold_spread(conf: np.ndarray, right: np.ndarray, choose, draws: int = 200, seed: int = 0) -> dict:
    """How uncertain a threshold chosen on these images is: the 2.5-97.5% range of `choose(conf, right)`
    over bootstrap resamples of them (seeded)."""
    rng = np.random.default_rng(seed)
    n = len(conf)
    got = []
    for _ in range(draws):
        i = rng.integers(0, n, n)
        t = choose(conf[i], right[i])
        if t is not None:
            got.append(t)
    if not got:
        return {"lo": None, "hi": None, "draws": draws}
    return {"lo": float(np.percentile(got, 2.5)), "hi": float(np.percentile(got, 97.5)), "draws": draws}
