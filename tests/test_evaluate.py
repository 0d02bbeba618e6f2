"""Metrics and their statistics, each against a hand count or an independent route (the Wilson interval's
defining equation, the binomial distribution, scipy and scikit-learn where installed)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from slimvit.evaluate import (
    balanced_accuracy,
    balanced_accuracy_diff,
    balanced_accuracy_se,
    compare,
    evaluate_model,
    mcnemar,
    metrics_from_logits,
    metrics_from_predictions,
    predict_logits,
    wilson,
)
from slimvit.spec import ModelSpec

Z95 = 1.959964


def _pairs(a_only: int, b_only: int, both: int = 0, neither: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-image correctness of two classifiers with the given counts of each outcome."""
    a = [True] * a_only + [False] * b_only + [True] * both + [False] * neither
    b = [False] * a_only + [True] * b_only + [True] * both + [False] * neither
    return np.array(a), np.array(b)


# --------------------------------------------------------------------------- Wilson


@pytest.mark.parametrize("k,n", [(0, 1), (1, 1), (3, 10), (8, 10), (0, 25), (25, 25), (356, 360), (1, 1000)])
def test_wilson_bounds_solve_the_score_equation(k, n):
    """The Wilson bounds are the p0 at which the score test just rejects: (k/n - p0)^2 = z^2 p0 (1 - p0) / n."""
    lo, hi = wilson(k, n)
    p = k / n
    assert 0.0 <= lo <= p <= hi <= 1.0
    for p0 in (lo, hi):
        if p0 in (0.0, 1.0) and p0 == p:  # the bound at an observed 0% or 100% is that bound itself
            continue
        assert (p - p0) ** 2 == pytest.approx(Z95**2 * p0 * (1 - p0) / n, rel=1e-6, abs=1e-12)


def test_wilson_hand_values_and_edges():
    # 8 of 10: centre (0.8 + z^2/20) / (1 + z^2/10), half-width as in Wilson (1927)
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.4901625, abs=1e-6) and hi == pytest.approx(0.9433178, abs=1e-6)
    # all or none right: the bound at that end is 100% or 0% (up to rounding)
    assert wilson(10, 10)[1] == pytest.approx(1.0, abs=1e-12) and wilson(0, 10)[0] == pytest.approx(
        0, abs=1e-12
    )
    assert wilson(0, 10)[1] == pytest.approx(Z95**2 / (10 + Z95**2))  # 0 of n: upper bound z^2 / (n + z^2)
    assert wilson(0, 0) == (0.0, 1.0) and wilson(3, -1) == (0.0, 1.0)  # no images: nothing is known
    # symmetric in successes and failures, narrower with more images, wider at a lower confidence z
    lo, hi = wilson(3, 10)
    assert (1 - hi, 1 - lo) == pytest.approx(wilson(7, 10))
    assert np.diff(wilson(30, 100)) < np.diff(wilson(3, 10))
    assert np.diff(wilson(3, 10, z=1.0)) < np.diff(wilson(3, 10))


def test_wilson_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(0, 7), (4, 7), (7, 7), (59, 60), (123, 400)]:
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-6)


# --------------------------------------------------------------------------- McNemar


def test_mcnemar_exact_p_by_hand():
    # 0 vs 5 discordant: two-sided 2 * (1/2)^5
    t = mcnemar(*_pairs(0, 5, both=40, neither=3))
    assert t == {"a_only": 0, "b_only": 5, "p": pytest.approx(2 / 32), "n": 48}
    # 1 vs 9: 2 * (C(10,0) + C(10,1)) / 2^10
    assert mcnemar(*_pairs(9, 1))["p"] == pytest.approx(2 * 11 / 1024)
    # an even split is as likely as it gets: p = 1 (not 2 * P(X <= m/2) > 1)
    assert mcnemar(*_pairs(4, 4))["p"] == 1.0
    # concordant images carry no information about which is better
    assert mcnemar(*_pairs(2, 7))["p"] == mcnemar(*_pairs(2, 7, both=500, neither=50))["p"]


def test_mcnemar_is_symmetric_and_reads_truthy_input():
    a, b = _pairs(3, 11, both=6)
    ab, ba = mcnemar(a, b), mcnemar(b, a)
    assert (ab["a_only"], ab["b_only"]) == (ba["b_only"], ba["a_only"]) and ab["p"] == ba["p"]
    assert mcnemar(a.astype(int), b.astype(int).tolist()) == ab  # 0/1 lists are correctness too


def test_mcnemar_matches_the_binomial_test():
    stats = pytest.importorskip("scipy.stats")
    for a_only, b_only in [(0, 1), (2, 9), (13, 4), (30, 45), (60, 61)]:
        want = stats.binomtest(a_only, a_only + b_only, 0.5).pvalue
        assert mcnemar(*_pairs(a_only, b_only, both=10))["p"] == pytest.approx(want, rel=1e-9)


def test_mcnemar_refuses_unpaired_results():
    with pytest.raises(ValueError, match="same images"):
        mcnemar([True, False, True], [True, False])


def test_compare_uses_alpha_and_the_direction():
    a, b = _pairs(0, 5)  # p = 0.0625
    assert compare(a, b) == "same" and compare(a, b, alpha=0.1) == "worse" and compare(b, a, 0.1) == "better"
    a, b = _pairs(6, 0)  # p = 0.03125
    assert compare(a, b) == "better" and compare(b, a) == "worse" and compare(a, b, alpha=0.01) == "same"
    assert compare(*_pairs(0, 0, both=100)) == "same"  # identical results: never "better"


# --------------------------------------------------------------------------- balanced accuracy


def test_balanced_accuracy_by_hand():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 0, 2, 2, 2, 2, 2, 1])
    # recalls 3/4, 1/2, 5/6
    assert balanced_accuracy(pred, labels) == pytest.approx((3 / 4 + 1 / 2 + 5 / 6) / 3)
    # a class predicted but absent from the labels is no class of its own
    assert balanced_accuracy([3, 3, 0, 0], [0, 0, 0, 0]) == pytest.approx(0.5)
    # balanced: equals plain accuracy
    assert balanced_accuracy([0, 1, 1, 1], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert balanced_accuracy([], []) == 0.0


def test_balanced_accuracy_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    labels = rng.choice(4, 200, p=[0.6, 0.25, 0.1, 0.05])
    pred = np.where(rng.random(200) < 0.7, labels, rng.integers(0, 4, 200))
    assert balanced_accuracy(pred, labels) == pytest.approx(metrics.balanced_accuracy_score(labels, pred))


def test_balanced_accuracy_se_by_hand():
    # one class of 8 images, 6 right: Agresti-Caffo p = 7/10 on n + 2 = 10
    assert balanced_accuracy_se([0] * 6 + [1] * 2, [0] * 8) == pytest.approx(math.sqrt(0.7 * 0.3 / 10))
    # two classes: 4/4 -> 5/6 on 6, 1/3 -> 2/5 on 5; the mean of two recalls has half their joint spread
    want = math.sqrt((5 / 6) * (1 / 6) / 6 + 0.4 * 0.6 / 5) / 2
    assert balanced_accuracy_se([0, 0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 1, 1]) == pytest.approx(want)


def test_balanced_accuracy_se_ignores_order_and_class_names():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 60)
    pred = np.where(rng.random(60) < 0.8, labels, (labels + 1) % 3)
    se = balanced_accuracy_se(pred, labels)
    perm = rng.permutation(60)
    assert balanced_accuracy_se(pred[perm], labels[perm]) == pytest.approx(se)
    rename = np.array([7, 2, 5])
    assert balanced_accuracy_se(rename[pred], rename[labels]) == pytest.approx(se)


def test_balanced_accuracy_diff_is_antisymmetric():
    a_pred, a_lab = np.array([0, 0, 1, 1, 1, 0]), np.array([0, 0, 1, 1, 0, 1])
    b_pred, b_lab = np.array([0] * 10 + [1] * 10), np.array([0] * 10 + [1] * 9 + [0])
    d, lo, hi = balanced_accuracy_diff(a_pred, a_lab, b_pred, b_lab)
    d2, lo2, hi2 = balanced_accuracy_diff(b_pred, b_lab, a_pred, a_lab)
    assert d == pytest.approx(-d2) and lo == pytest.approx(-hi2) and hi == pytest.approx(-lo2)
    assert d == pytest.approx((2 / 3 + 2 / 3) / 2 - (10 / 11 + 9 / 9) / 2)
    # a wider z, a wider interval around the same difference
    d3, lo3, hi3 = balanced_accuracy_diff(a_pred, a_lab, b_pred, b_lab, z=3.0)
    assert d3 == d and lo3 < lo and hi3 > hi


def test_balanced_accuracy_diff_interval_covers_the_true_difference():
    """Simulated: two models of known per-class recall, each tested on images of its own; the 95% interval
    of the difference holds the true difference about 95% of the time."""
    rng = np.random.default_rng(0)
    n_a, n_b = np.array([40, 25, 30]), np.array([35, 45, 20])
    r_a, r_b = np.array([0.9, 0.7, 0.8]), np.array([0.85, 0.8, 0.6])
    true = r_a.mean() - r_b.mean()
    labels_a, labels_b = np.repeat(np.arange(3), n_a), np.repeat(np.arange(3), n_b)

    def predictions(labels, recall):
        right = rng.random(len(labels)) < recall[labels]
        return np.where(right, labels, (labels + 1) % 3)

    trials, hits = 2000, 0
    for _ in range(trials):
        _, lo, hi = balanced_accuracy_diff(
            predictions(labels_a, r_a), labels_a, predictions(labels_b, r_b), labels_b
        )
        hits += lo <= true <= hi
    assert 0.92 <= hits / trials <= 0.975  # 0.9405 here; SE of the estimate 0.005


# --------------------------------------------------------------------------- metrics dict


def test_metrics_from_predictions_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 2, 2])
    m = metrics_from_predictions(pred, labels, ["a", "b", "c", "d"])
    # rows are the true class, columns the predicted one
    assert m["confusion"] == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert m["n"] == 6 and m["accuracy"] == pytest.approx(4 / 6)
    assert m["accuracy_ci"] == pytest.approx(list(wilson(4, 6)))
    assert m["per_class_recall"] == pytest.approx({"a": 2 / 3, "b": 1 / 2, "c": 1.0, "d": 0.0})
    assert m["per_class_support"] == {"a": 3, "b": 2, "c": 1, "d": 0}
    assert m["per_class_recall_ci"]["a"] == pytest.approx(list(wilson(2, 3)))
    # F1: a = 2*1*(2/3)/(5/3) = 0.8, b = 0.5 (precision 1/2, recall 1/2), c = 2*(1/2)*1/(3/2) = 2/3;
    # d has no images and stays out of the mean
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert (
        m["pred"] == pred.tolist() and m["labels"] == labels.tolist() and m["classes"] == ["a", "b", "c", "d"]
    )


def test_metrics_match_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(2)
    labels = rng.choice(5, 300, p=[0.4, 0.3, 0.15, 0.1, 0.05])
    pred = np.where(rng.random(300) < 0.75, labels, rng.integers(0, 5, 300))
    classes = list("vwxyz")
    m = metrics_from_predictions(pred, labels, classes)
    assert m["confusion"] == metrics.confusion_matrix(labels, pred, labels=range(5)).tolist()
    assert m["macro_f1"] == pytest.approx(metrics.f1_score(labels, pred, average="macro"))
    recall = metrics.recall_score(labels, pred, average=None, labels=range(5))
    assert list(m["per_class_recall"].values()) == pytest.approx(recall.tolist())
    assert m["accuracy"] == pytest.approx(metrics.accuracy_score(labels, pred))


def test_metrics_of_a_class_never_predicted_has_f1_zero_not_nan():
    m = metrics_from_predictions(np.array([0, 0, 0, 0]), np.array([0, 0, 1, 1]), ["a", "b"])
    # a: precision 1/2, recall 1 -> F1 2/3; b: never predicted -> 0
    assert m["macro_f1"] == pytest.approx(1 / 3) and not math.isnan(m["macro_f1"])
    assert m["per_class_recall"] == {"a": 1.0, "b": 0.0}


def test_metrics_from_logits_take_the_argmax():
    logits = np.array([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0], [-5.0, -4.0, -3.0], [1.0, 1.0, 0.0]])
    m = metrics_from_logits(logits, [1, 0, 1, 0], ["a", "b", "c"])
    assert m["pred"] == [1, 0, 2, 0]  # ties go to the first class, as argmax does
    assert m["accuracy"] == pytest.approx(0.75)
    assert m == metrics_from_predictions(np.array([1, 0, 2, 0]), np.array([1, 0, 1, 0]), ["a", "b", "c"])


# --------------------------------------------------------------------------- PyTorch path


class _TwoHeads(nn.Module):
    """A distilled-style model: (class head, distillation head) of the mean pixel of each channel."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(3, 2)
        self.drop = nn.Dropout(0.9)  # would scramble the logits if left in training mode

    def forward(self, x):
        z = self.drop(x.mean((2, 3)))
        return self.a(z), self.b(z)


def test_predict_logits_averages_heads_batches_and_runs_in_eval_mode():
    torch.manual_seed(0)
    model = _TwoHeads().train()
    x = torch.randn(7, 3, 4, 4)
    got = predict_logits(model, x, batch_size=3)  # 3 + 3 + 1
    assert not model.training and got.shape == (7, 2) and got.dtype == np.float32
    with torch.no_grad():
        z = x.mean((2, 3))
        want = ((model.a(z) + model.b(z)) / 2).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(predict_logits(model, x, batch_size=100), got)


class _RedData:
    """Two classes: the label is whether the red channel is bright."""

    classes = ["dark", "red"]

    def __init__(self):
        self.labels = np.array([0, 1, 0, 1, 1])
        self.images = np.zeros((5, 4, 4, 3), np.uint8)
        self.images[..., 0] = (self.labels * 250)[:, None, None]

    def arrays(self, split):
        assert split in ("val", "test")
        return self.images, self.labels


class _Red(nn.Module):
    def forward(self, x):
        m = x[:, 0].mean((1, 2))
        return torch.stack([-m, m], 1)


def test_evaluate_model_normalises_with_the_spec_and_names_the_split():
    spec = ModelSpec("toy", 2, ("dark", "red"), (3, 4, 4), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    m = evaluate_model(_Red(), _RedData(), spec, split="val")
    assert m["split"] == "val" and m["accuracy"] == 1.0 and m["pred"] == [0, 1, 0, 1, 1]
    # a mean that puts every red channel above zero: the normalisation is the spec's, not a fixed one
    shifted = ModelSpec("toy", 2, ("dark", "red"), (3, 4, 4), (-1.0, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert evaluate_model(_Red(), _RedData(), shifted)["pred"] == [1] * 5
