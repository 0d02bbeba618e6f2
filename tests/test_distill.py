import math

import pytest
import torch
import torch.nn.functional as F

from slimvit.config import DistillConfig
from slimvit.distill import LOSSES, logit_offset, make_loss, soft_kd
from slimvit.errors import ConfigError

S = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
T = torch.tensor([[1.0, 3.0, 0.0], [0.0, 0.0, 4.0]])
Y = torch.tensor([0, 1])


def _ce(logits, y):
    return float(-torch.log_softmax(logits, -1)[torch.arange(len(y)), y].mean())


def test_registry_has_all_losses():
    assert set(LOSSES) == {"none", "soft", "hard", "token"}


def test_soft_kd_matches_hand_computation():
    t = 2.0
    p = torch.softmax(T / t, -1)
    log_q = torch.log_softmax(S / t, -1)
    expected = float((p * (torch.log(p) - log_q)).sum(-1).mean()) * t * t
    assert math.isclose(float(soft_kd(S, T, t)), expected, rel_tol=1e-5)
    assert float(soft_kd(T, T, t)) == pytest.approx(0.0, abs=1e-6)


def test_soft_loss_mixes_with_alpha():
    cfg = DistillConfig(loss="soft", alpha=0.7, temperature=2.0)
    parts = make_loss(cfg, label_smoothing=0.0)(S, T, Y)
    assert set(parts) == {"loss", "task_loss", "kd_loss"}
    assert float(parts["task_loss"]) == pytest.approx(_ce(S, Y), rel=1e-5)
    assert float(parts["kd_loss"]) == pytest.approx(float(soft_kd(S, T, 2.0)), rel=1e-5)
    assert float(parts["loss"]) == pytest.approx(0.3 * _ce(S, Y) + 0.7 * float(soft_kd(S, T, 2.0)), rel=1e-5)


def test_logit_adjustment_moves_the_label_term_only():
    """Logit adjustment (train.balance=logit): the label cross-entropy sees logits + log(prior), so a rare
    class needs a larger raw margin; the distillation term compares the raw logits with the teacher's."""
    off = logit_offset([0] * 6 + [1] * 3 + [2], 3)
    assert torch.allclose(off, torch.log(torch.tensor([0.6, 0.3, 0.1])))
    assert torch.allclose(logit_offset([0, 1, 1], 3), torch.log(torch.tensor([0.25, 0.5, 0.25])))  # empty: 1
    for name in ("none", "soft", "hard", "token"):
        cfg = None if name == "none" else DistillConfig(loss=name, alpha=0.7)
        out = (S, S.flip(-1)) if name == "token" else S
        plain, adjusted = make_loss(cfg, 0.0)(out, T, Y), make_loss(cfg, 0.0, off)(out, T, Y)
        assert float(adjusted["task_loss"]) == pytest.approx(_ce(S + off, Y), rel=1e-5), name
        assert float(adjusted["task_loss"]) != pytest.approx(float(plain["task_loss"]), rel=1e-3), name
        assert float(adjusted["kd_loss"]) == pytest.approx(float(plain["kd_loss"]), rel=1e-6), name
    # soft targets (mixup/cutmix) are adjusted the same way
    soft = make_loss(None, 0.0, off)(S, None, F.one_hot(Y, 3).float())
    assert float(soft["task_loss"]) == pytest.approx(_ce(S + off, Y), rel=1e-5)
    # on an image of the rarest class the adjusted loss pushes that class's raw logit up harder
    grads = []
    for offset in (off, None):
        z = torch.zeros(1, 3, requires_grad=True)
        make_loss(None, 0.0, offset)(z, None, torch.tensor([2]))["loss"].backward()
        grads.append(z.grad[0, 2])
    assert grads[0] < grads[1] < 0


def test_hard_loss_uses_teacher_argmax():
    parts = make_loss(DistillConfig(loss="hard", alpha=0.5), 0.0)(S, T, Y)
    assert float(parts["kd_loss"]) == pytest.approx(_ce(S, T.argmax(-1)), rel=1e-5)  # targets [1, 2]
    assert float(parts["loss"]) == pytest.approx(
        0.5 * _ce(S, Y) + 0.5 * _ce(S, torch.tensor([1, 2])), rel=1e-5
    )


def test_token_loss_splits_heads():
    cls, dist = S, S.flip(-1)
    parts = make_loss(DistillConfig(loss="token", alpha=0.5), 0.0)((cls, dist), T, Y)
    assert float(parts["task_loss"]) == pytest.approx(_ce(cls, Y), rel=1e-5)
    assert float(parts["kd_loss"]) == pytest.approx(_ce(dist, T.argmax(-1)), rel=1e-5)
    with pytest.raises(ConfigError, match="distillation token"):
        make_loss(DistillConfig(loss="token"), 0.0)(S, T, Y)


def test_none_loss_and_label_smoothing():
    parts = make_loss(None, label_smoothing=0.1)(S, None, Y)
    assert float(parts["loss"]) == pytest.approx(float(F.cross_entropy(S, Y, label_smoothing=0.1)), rel=1e-5)
    assert float(parts["kd_loss"]) == 0.0
