"""Segmentation scores from a confusion matrix: IoU, F1 (Dice), precision, recall, Cohen's kappa.

One implementation for training validation, QC truth metrics and the accuracy benchmark. All
scores are computed from a ``(K, K)`` confusion matrix ``m[t, p]`` = voxels of true class ``t``
predicted as ``p`` (class indices ``0..K-1``, i.e. label ``1..K``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.core.errors import InputError


def confusion_matrix(
    truth: np.ndarray[Any, Any], pred: np.ndarray[Any, Any], classes: int, *, mask: np.ndarray[Any, Any] | None = None
) -> np.ndarray[Any, np.dtype[np.int64]]:
    """``(K, K)`` int64 counts of (truth, prediction) label pairs over voxels with truth in ``1..K``.

    Args:
        truth, pred: integer label arrays of one shape (labels ``1..K``; truth 0 = not compared).
        classes: K.
        mask: optional bool array of the same shape; only voxels where it is True are compared.

    Predictions outside ``1..K`` are an error (a label map of another class count).
    """
    truth, pred = np.asarray(truth), np.asarray(pred)
    if truth.shape != pred.shape or (mask is not None and np.shape(mask) != truth.shape):
        raise InputError(f"confusion_matrix: shapes differ: truth {truth.shape}, prediction {pred.shape}"
                         + ("" if mask is None else f", mask {np.shape(mask)}"))
    keep = (truth >= 1) & (truth <= classes)
    if mask is not None:
        keep &= np.asarray(mask, dtype=bool)
    t = truth[keep].astype(np.int64) - 1
    p = pred[keep].astype(np.int64) - 1
    if p.size and (p.min() < 0 or p.max() >= classes):
        raise InputError(f"confusion_matrix: predictions hold labels outside 1..{classes}")
    return np.bincount(t * classes + p, minlength=classes * classes).reshape(classes, classes).astype(np.int64)


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den else None


def scores(confusion: np.ndarray[Any, Any], names: Sequence[str]) -> dict[str, Any]:
    """Per-class and summary scores of a ``(K, K)`` confusion matrix (truth rows, prediction columns).

    Returns a dict with ``per_class`` (a list of ``{label, name, iou, dice, f1, precision, recall,
    support}``; a score is None where its denominator is 0), ``mean_iou`` and ``mean_f1`` (over
    classes present in truth or prediction), ``accuracy``, ``kappa`` (Cohen's, None when chance
    agreement is 1) and ``voxels``.
    """
    m = np.asarray(confusion, dtype=np.float64)
    k = len(names)
    if m.shape != (k, k):
        raise InputError(f"scores: confusion matrix has shape {m.shape}; {k} class names need ({k}, {k})")
    n = float(m.sum())
    per_class: list[dict[str, Any]] = []
    ious: list[float] = []
    f1s: list[float] = []
    for c in range(k):
        tp = m[c, c]
        fp = m[:, c].sum() - tp
        fn = m[c, :].sum() - tp
        dice = _ratio(2 * tp, 2 * tp + fp + fn)
        iou = _ratio(tp, tp + fp + fn)
        per_class.append({"label": c + 1, "name": names[c], "iou": iou, "dice": dice, "f1": dice,
                          "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn),
                          "support": int(m[c, :].sum())})
        if iou is not None and dice is not None:
            ious.append(iou)
            f1s.append(dice)
    po = _ratio(float(np.trace(m)), n)
    pe = float((m.sum(axis=0) * m.sum(axis=1)).sum() / (n * n)) if n else None
    kappa = None if po is None or pe is None or pe >= 1.0 else (po - pe) / (1.0 - pe)
    return {
        "per_class": per_class,
        "mean_iou": float(np.mean(ious)) if ious else None,
        "mean_f1": float(np.mean(f1s)) if f1s else None,
        "accuracy": po,
        "kappa": kappa,
        "voxels": int(n),
    }


__all__ = ["confusion_matrix", "scores"]
