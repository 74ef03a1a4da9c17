"""Segmentation scores against scikit-learn's reference implementations."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score, f1_score, jaccard_score

from pipeline.core.errors import InputError
from pipeline.core.metrics import confusion_matrix, scores


def test_scores_match_sklearn() -> None:
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 4, size=(6, 7, 8))  # 0 = not compared
    pred = np.where(rng.random(truth.shape) < 0.7, np.maximum(truth, 1), rng.integers(1, 4, size=truth.shape))
    mask = rng.random(truth.shape) < 0.8
    conf = confusion_matrix(truth, pred, 3, mask=mask)
    keep = (truth > 0) & mask
    assert conf.sum() == keep.sum()
    s = scores(conf, ["a", "b", "c"])
    t, p = truth[keep], pred[keep]
    assert s["kappa"] == pytest.approx(cohen_kappa_score(t, p))
    assert [c["iou"] for c in s["per_class"]] == pytest.approx(list(jaccard_score(t, p, average=None)))
    assert s["mean_f1"] == pytest.approx(f1_score(t, p, average="macro"))
    assert s["accuracy"] == pytest.approx(float(np.mean(t == p)))


def test_absent_class_is_none_and_left_out_of_means() -> None:
    truth = np.array([1, 1, 2, 2])
    s = scores(confusion_matrix(truth, truth, 3), ["a", "b", "c"])
    assert s["per_class"][2]["iou"] is None
    assert s["mean_iou"] == 1.0 and s["kappa"] == 1.0


def test_bad_inputs_are_named() -> None:
    with pytest.raises(InputError, match="shapes differ"):
        confusion_matrix(np.ones(3, int), np.ones(4, int), 2)
    with pytest.raises(InputError, match="outside 1..2"):
        confusion_matrix(np.ones(3, int), np.array([1, 2, 3]), 2)
    with pytest.raises(InputError, match="class names"):
        scores(np.zeros((2, 2)), ["a", "b", "c"])
