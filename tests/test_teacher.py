"""The forest teacher for sparse annotations: when it runs, what it labels, how training records it.

Tiny volumes and a few steps; the accuracy it buys on scribbles is measured in bench/scribbles.py.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from conftest import ROOT, make_scan
from test_train import FAST, sparse, two_phase

from pipeline.core.errors import ConfigError
from pipeline.core.normalize import Normalization
from pipeline.io.store import open_image
from pipeline.testing.scribbles import make_scribbles
from pipeline.train.annotations import from_array
from pipeline.train.loop import train
from pipeline.train.sampling import read_plane
from pipeline.train.teacher import labelled_fraction, pseudo_labels, use_teacher


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("teacher")
    volume, labels = two_phase()
    return {"tmp": tmp, "labels": labels, "scan": make_scan(tmp, volume),
            "scribbles": from_array(make_scribbles(labels, 2, strokes=4, length=4, seed=1), source="scribbles"),
            "slices": from_array(sparse(labels), source="slices")}


def test_scribbles_are_sparse_and_full_slices_are_not(data):
    assert labelled_fraction(data["slices"]) == pytest.approx(1.0)
    assert labelled_fraction(data["scribbles"]) < 0.2
    assert use_teacher("auto", data["scribbles"]) and not use_teacher("auto", data["slices"])
    assert use_teacher("forest", data["slices"]) and not use_teacher("off", data["scribbles"])
    with pytest.raises(ConfigError, match="teacher"):
        use_teacher("magic", data["scribbles"])


def test_pseudo_labels_follow_the_truth_and_spare_labelled_voxels(data):
    ann, labels = data["scribbles"], data["labels"]
    image = open_image(data["scan"])
    shape = tuple(image.shape)
    planes = [read_plane(image.array, shape, pl.axis, pl.index, pl.labels, 3, 16) for pl in ann.planes]
    offset, scale = Normalization(method="zscore").affine(image.stats)
    info = pseudo_labels(image.array, shape, planes, 2, offset=offset, scale=scale, seed=0, threads=1, keep=0.5)
    assert info["teacher"] == "forest" and min(info["pseudo_voxels"]) > 0
    agree = total = 0
    for pl in planes:
        assert pl.pseudo is not None and pl.pseudo.shape == pl.train.shape
        assert (pl.pseudo[pl.train >= 0] == -1).all()  # strokes keep their own labels
        a, b = pl.train.shape
        truth = np.take(labels, pl.index, axis=pl.axis)[pl.origin[0]: pl.origin[0] + a, pl.origin[1]: pl.origin[1] + b]
        kept = pl.pseudo >= 0
        agree += int((pl.pseudo[kept] == truth[kept].astype(np.int64) - 1).sum())
        total += int(kept.sum())
    unlabelled = sum(int(((pl.train < 0) & (pl.val < 0)).sum()) for pl in planes)
    assert 0.4 * unlabelled <= total <= 0.6 * unlabelled  # keep=0.5 of each class
    assert agree / total > 0.95


def test_training_uses_the_teacher_only_for_sparse_labels(data):
    fast = {**FAST, "steps_per_epoch": 4}
    sc = train(data["scan"], data["scribbles"], data["tmp"] / "sc", epochs=2, **fast)
    sl = train(data["scan"], data["slices"], data["tmp"] / "sl", epochs=1, **fast)
    off = train(data["scan"], data["scribbles"], data["tmp"] / "off", epochs=2, teacher="off", **fast)
    assert sc.metrics["teacher"] == "forest" and sum(sc.metrics["pseudo_voxels"]) > 0
    assert sc.provenance["recipe"]["teacher"] == "auto"
    assert sl.metrics["teacher"] == "off" and "pseudo_voxels" not in sl.metrics
    assert off.metrics["teacher"] == "off"
    # the effective training prior counts the pseudo-labels: far from the strokes' balanced mix
    assert sc.metrics["prior_train"] != off.metrics["prior_train"]


def test_teacher_option_errors(data):
    for bad in ({"teacher": "magic"}, {"teacher_keep": 0.0}, {"teacher_keep": 1.5}, {"teacher_weight": -1.0},
                {"teacher_weight": float("nan")}):
        with pytest.raises(ConfigError, match="teacher"):
            train(data["scan"], data["scribbles"], data["tmp"] / "x", epochs=1, **bad)


def test_cli_documents_the_teacher_options():
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", "--help"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert "--teacher {auto,forest,off}" in out and "--teacher-weight" in out and "--teacher-keep" in out
