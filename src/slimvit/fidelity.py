"""Label-free fidelity: how closely each benchmarked variant keeps the student's function (`fidelity`),
on the flips/rotations of the validation images (`val_views`) and on unlabeled production images
(`read_unlabeled`). The module imports without torch (the CLI checks `--unlabeled` through it); the
logits come from the caller (`bench.logits_by_variant`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from slimvit.errors import DataError

log = logging.getLogger(__name__)

TEACHER_KEY = "teacher/onnxruntime/fp32"
"""The teacher's bench row that agreement is read against: the file a teacher deployment runs first."""


def val_views(images: np.ndarray, flips: bool, rot90: bool, limit: int | None = None) -> np.ndarray:
    """The flips/rotations of uint8 (N, H, W, 3) images that the training augmentation draws from (8 with
    both), stacked view by view: (V*N, H, W, 3), the images themselves first; the same views, in the same
    order, as `recipe.views`.
    `limit`: every other one, as the fine-tunes compare them (`selection.FIDELITY_VIEWS`)."""
    rots = [np.rot90(images, k, axes=(1, 2)) for k in range(4 if rot90 else 1)]
    if flips and rot90:
        out = rots + [r[:, :, ::-1] for r in rots]
    elif flips:
        out = [images, images[:, :, ::-1], images[:, ::-1], images[:, ::-1, ::-1]]
    else:
        out = rots
    if limit is not None:
        out = spread(out, limit)
    return np.ascontiguousarray(np.concatenate(out))


def spread(views, limit: int):
    """`limit` of `views` (a sequence, in `val_views`' order), every other one: the views `val_views(limit=)`
    keeps."""
    return views[:: max(1, len(views) // limit)][:limit]


def read_unlabeled(path: str | Path, size: int, limit: int) -> tuple[np.ndarray, dict]:
    """The decodable images of an unlabeled folder (searched recursively) at `size`, at most `limit` of
    them (a seeded sample); DataError for a missing folder or one with no image."""
    from slimvit.preprocess import ImageDecodeError, load_rgb

    root = Path(path)
    files = check_unlabeled(root)
    total = len(files)
    if total > limit:
        pick = np.random.default_rng(0).choice(total, limit, replace=False)
        files = [files[i] for i in sorted(pick)]
    images, bad = [], 0
    for f in files:
        try:
            images.append(load_rgb(f, size))
        except ImageDecodeError:
            bad += 1
    if not images:
        raise DataError(f"--unlabeled '{root}': none of its {total} image files could be decoded")
    return np.stack(images), {"path": str(root), "images": len(images), "files": total, "undecodable": bad}


def check_unlabeled(root: Path) -> list[Path]:
    """The image files of an unlabeled folder; DataError (one line) when it is missing or has none."""
    from slimvit.preprocess import IMAGE_EXTENSIONS

    if not root.is_dir():
        raise DataError(f"--unlabeled '{root}' is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"--unlabeled '{root}' has no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def fidelity(
    variants: Sequence,
    data,
    cfg,
    logits_of: Callable[[np.ndarray], list[np.ndarray]],
    val_logits: list[np.ndarray] | None = None,
) -> tuple[dict, dict]:
    """Every variant against the student (the reference row), label-free: on the validation images and
    their flips/rotations, and on `bench.unlabeled` images where given, the share of images where both
    name the same class (`agreement`), the mean KL(student || variant) of their softmax outputs
    (`agreement_kl`), and the accuracy on the labelled validation views (`view_accuracy`). Agreement and KL
    count the images on which the teacher names the student's class too (`source["consensus"]`; all of them
    where the teacher is not benched, and for the teacher's own row).

    Where validation accuracy saturates (every candidate at 100% of a few images) these still separate
    the candidates: a pruned model that lost the student's function disagrees with it on new views.

    Args:
        variants: bench's variants (`bench.Variant`: its `key`, and `reference` for the student).
        logits_of: uint8 images -> each variant's logits on them, in the order of `variants`.
        val_logits: each variant's logits on the validation images themselves (the first of the views),
            already computed (the bench's accuracies): only the other views go through `logits_of`.

    Returns ({variant key: figures}, what they were measured on)."""
    from slimvit.selection import FIDELITY_VIEWS  # selection imports torch; the folder checks need none

    ref = next((v for v in variants if v.reference), None)
    if ref is None:
        return {}, {}
    images, labels = data.arrays("val")
    x = val_views(images, cfg.train.flips, cfg.train.rot90, limit=FIDELITY_VIEWS)
    n_views = len(x) // max(1, len(images))
    y = np.tile(labels, n_views)
    source = {"val_images": len(images), "val_views": len(x), "unlabeled": None}
    if cfg.bench.unlabeled:
        extra, info = read_unlabeled(cfg.bench.unlabeled, data.img_size, cfg.bench.unlabeled_max)
        source["unlabeled"] = info
        x = np.concatenate([x, extra])
    if val_logits is None:
        logits = logits_of(x)
    else:  # view 0 is the images themselves (val_views): computed once, for the accuracies
        n = len(images)
        rest = logits_of(x[n:]) if len(x) > n else [lg[:0] for lg in val_logits]
        logits = [np.concatenate([a, b]) for a, b in zip(val_logits, rest, strict=True)]
    keys = [v.key for v in variants]
    ref_logp = _log_softmax(logits[keys.index(ref.key)])
    ref_pred = ref_logp.argmax(1)
    # Where the teacher (another family, trained apart) names another class than the student, the student's
    # answer is no standard to hold a compression to: on unlabeled images unlike the validation ones the
    # student and the teacher disagreed on 10% (docs/experiments/small-data.md), and every compression with
    # them, so an absolute floor refused them all. Agreement counts the images where the two agree.
    teacher = TEACHER_KEY if TEACHER_KEY in keys else None
    sure = logits[keys.index(teacher)].argmax(1) == ref_pred if teacher else np.ones(len(x), bool)
    source["consensus"] = {"teacher": teacher, "images": int(sure.sum()), "of": len(x)}
    out, preds, conf = {}, {}, {}
    for v, lg in zip(variants, logits, strict=True):
        logp = _log_softmax(lg)
        pred = preds[v.key] = logp.argmax(1)
        conf[v.key] = np.exp(logp).max(1)
        m = np.ones(len(x), bool) if v.key == teacher or not sure.any() else sure
        out[v.key] = {
            "agreement": float((pred[m] == ref_pred[m]).mean()),
            "agreement_kl": float((np.exp(ref_logp[m]) * (ref_logp[m] - logp[m])).sum(1).mean()),
            "agreement_n": int(m.sum()),
            "view_accuracy": float((pred[: len(y)] == y).mean()),
        }
    if source["unlabeled"]:
        source["unlabeled"]["shift"] = _shift(preds, conf, ref.key, teacher, len(y))
    log.info(
        "bench: agreement with the student measured on %d validation images x %d flips/rotations%s",
        len(images),
        n_views,
        f" and {source['unlabeled']['images']} unlabeled images" if source["unlabeled"] else "",
    )
    return out, source


def _shift(preds: dict, conf: dict, ref: str, teacher: str | None, n_views: int) -> dict:
    """Each variant (`preds`: its classes, `conf`: its top-class probabilities, by key) on the validation views
    (the first `n_views` rows) against the unlabeled images (the rest): the share where it names the student's
    (`ref`) class, the teacher's (a model of another family trained apart; absent when not benched) and its
    mean top-class probability. On images like the validation ones these stay near their validation figures;
    where they fall, the unlabeled images differ, and on each image where two models disagree at least one of
    them is wrong (`report.overview._shift_line`)."""
    parts = {"views": slice(0, n_views), "unlabeled": slice(n_views, None)}
    out = {}
    for k, pred in preds.items():
        fig = {}
        for part, sl in parts.items():
            fig[f"student_{part}"] = float((pred[sl] == preds[ref][sl]).mean())
            if teacher:
                fig[f"teacher_{part}"] = float((pred[sl] == preds[teacher][sl]).mean())
            fig[f"confidence_{part}"] = float(conf[k][sl].mean())
        out[k] = fig
    return {"views": n_views, "images": len(preds[ref]) - n_views, "teacher": teacher, "by_variant": out}


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))
