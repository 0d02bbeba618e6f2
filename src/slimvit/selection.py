"""Which epoch a training keeps and when it stops: each epoch's validation metrics, a fine-tune's fidelity
to the model it recovers, what "better" means, and the stop rule.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from slimvit import models
from slimvit.config import TrainConfig
from slimvit.data import EvalDataset
from slimvit.distill import cross_entropy
from slimvit.evaluate import balanced_accuracy
from slimvit.recipe import autocast_context, views

FIDELITY_VIEWS = 4
"""Views of each validation image a fine-tune compares with the student: the image, its 180-degree
rotation and its two mirror images (every other one of the 8 the augmentation draws from). Measured on
NEU-DET (AMD EPYC, bf16): all 8 in fp32 took as long as the training epoch itself (4 s of an 8.5 s epoch)."""


class Fidelity:
    """How close a model's function is to a reference model's (a pruning fine-tune's student) on the
    validation images and their flips/rotations (views the training augmentation draws from, FIDELITY_VIEWS
    of them): mean KL(reference || model) of the softmax outputs, and the share of views where both name
    the same class. Unlike validation accuracy it does not saturate: on 18 validation images every pruned
    model may score 100% while it disagrees with the student on a third of new images. Runs in the
    training's precision (bf16 where the CPU has it), the KL in fp32."""

    def __init__(
        self,
        reference: nn.Module,
        ds: EvalDataset,
        tcfg: TrainConfig,
        device,
        precision: str = "no",
        batch: int = 256,
    ):
        every = views(ds.x, tcfg.flips, tcfg.rot90)
        step = max(1, len(every) // FIDELITY_VIEWS)
        self.x = torch.cat(every[::step][:FIDELITY_VIEWS])  # (V*N, C, H, W)
        self.batch, self.device, self.precision = batch, device, precision
        self.ref_logp = self._log_probs(reference)  # (V*N, classes)

    @torch.no_grad()
    def _log_probs(self, model: nn.Module) -> torch.Tensor:
        import torch.nn.functional as F

        was_training = model.training
        model.eval()
        out = []
        for i in range(0, len(self.x), self.batch):
            with autocast_context(self.precision, self.device):
                logits = models.eval_logits(model(self.x[i : i + self.batch].to(self.device)))
            out.append(F.log_softmax(logits.float(), -1).cpu())
        model.train(was_training)
        return torch.cat(out)

    def __call__(self, model: nn.Module) -> dict:
        logp = self._log_probs(model)
        kl = (self.ref_logp.exp() * (self.ref_logp - logp)).sum(-1).mean()
        agree = (logp.argmax(-1) == self.ref_logp.argmax(-1)).float().mean()
        return {"kl": float(kl), "agree": float(agree), "views": len(self.x)}


@torch.no_grad()
def validate(model: nn.Module, ds: EvalDataset, batch: int, device, fidelity: Fidelity | None = None) -> dict:
    """`acc`, `bal_acc` (mean per-class recall) and `loss` in fp32, as the test evaluation computes them;
    with `fidelity`, also `kl` and `agree` (to the reference model, on the validation views)."""
    model.eval()
    preds, loss_sum = [], 0.0
    for i in range(0, len(ds), batch):
        x, y = ds.x[i : i + batch].to(device), ds.labels[i : i + batch].to(device)
        out = models.eval_logits(model(x))
        loss_sum += float(cross_entropy(out, y)) * len(y)
        preds.append(out.argmax(-1).cpu())
    pred = torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)
    labels = ds.labels.numpy()
    fid = fidelity(model) if fidelity is not None else {}
    return {
        "acc": float((pred == labels).mean()) if len(labels) else 0.0,
        "bal_acc": balanced_accuracy(pred, labels),
        "loss": loss_sum / max(1, len(ds)),
        "kl": fid.get("kl"),
        "agree": fid.get("agree"),
    }


def best_record(v: dict, epoch: int) -> dict:
    """The record of the best epoch so far (kept in the checkpoint and train.json), from `validate`'s `v`."""
    return {
        "val_acc": v["acc"],
        "val_bal_acc": v["bal_acc"],
        "val_loss": v["loss"],
        "val_kl": v.get("kl"),
        "val_agree": v.get("agree"),
        "epoch": epoch,
    }


def improves(v: dict, best: dict, epoch: int = 0, first: int = 0) -> bool:
    """Whether epoch `epoch` (1-based), validating as `v`, becomes the best so far when only epochs from
    `first` on compete (`first_competing_epoch`): the first of them always does, a later one when it beats
    the best record."""
    if epoch < first:
        return False
    return best["epoch"] < first or _key(v) > _best_key(best)


def first_competing_epoch(select_from: float, epochs: int) -> int:
    """The first epoch (1-based) that may be kept under `train.select_from`: those after `select_from` of
    the `epochs` compete, the last always does; 0 where every epoch does (the starting weights too, with
    `select_initial`)."""
    if select_from <= 0:
        return 0
    return min(epochs, int(select_from * epochs + 1e-9) + 1)


def _best_key(best: dict) -> tuple:
    return _key(
        {
            "bal_acc": best["val_bal_acc"],
            "acc": best["val_acc"],
            "loss": best["val_loss"],
            "kl": best.get("val_kl"),
        }
    )


def _key(m: dict) -> tuple:
    """What "better on validation" means: balanced accuracy, then accuracy, then (fine-tunes, which have
    a reference) lower KL to the reference on the validation views, else lower loss."""
    return (m["bal_acc"], m["acc"], -m["kl"] if m.get("kl") is not None else -m["loss"])


def stop_reason(
    best: dict,
    stop_at: float | None,
    patience: int,
    done: int,
    epochs: int,
    world: int,
    min_epochs: int = 0,
    agreement: float | None = None,
) -> str | None:
    """Why training stops after epoch `done` (None: it goes on); with several processes, rank 0's
    reason (BatchNorm statistics, hence validation, differ between ranks).

    "Recovered" needs a trained epoch as the best, at least `min_epochs` epochs run, and, with
    `agreement`, the best epoch agreeing with the reference on that share of the validation views:
    validation accuracy alone saturates on a small split (every pruned model at 100% of 18 images after
    its first epoch of two optimizer steps), so it cannot say that the student's function is back."""
    stopped = None
    agrees = agreement is None or (
        best.get("val_agree") is not None and best["val_agree"] >= agreement - 1e-9
    )
    if (
        stop_at is not None
        and best["epoch"] >= 1
        and done >= min_epochs
        and agrees
        and best["val_bal_acc"] >= stop_at - 1e-9
    ):
        stopped = f"recovered: validation balanced accuracy {best['val_bal_acc']:.4f} >= {stop_at:.4f}" + (
            f", agreement with the student {best['val_agree']:.4f} >= {agreement:.4f} on the validation views"
            if agreement is not None
            else ""
        )
    elif patience and done - best["epoch"] >= patience and done < epochs:
        stopped = f"no better validation epoch in {patience} epochs"
    if world > 1:
        from accelerate.utils import broadcast_object_list

        stopped = broadcast_object_list([stopped])[0]
    return stopped
