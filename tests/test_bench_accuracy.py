"""The accuracy benchmark's own logic: held-out scribble folds and the multi-Otsu baseline."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import ROOT, SHARED_DATA

sys.path.insert(0, str(ROOT / "bench"))
from accuracy import _multi_otsu, scribble_folds  # noqa: E402

from pipeline.testing.phantom import make_annotations, make_phantom  # noqa: E402


@pytest.mark.parametrize("name", ["glass_labels.png", "slice1_labeling.png"])
def test_insegt_scribbles_split_into_two_folds_with_every_class(name):
    from PIL import Image

    labels = np.asarray(Image.open(SHARED_DATA / "insegt" / name))
    folds = scribble_folds(labels)
    assert np.array_equal(folds > 0, labels > 0)  # every scribble pixel in exactly one fold
    for c in (1, 2):
        sizes = [int(np.count_nonzero((labels == c) & (folds == f))) for f in (1, 2)]
        assert min(sizes) > 0.25 * sum(sizes), (c, sizes)  # both folds hold a fair share


def test_one_stroke_is_cut_along_its_length():
    labels = np.zeros((20, 40), np.uint8)
    labels[9:11, 2:38] = 1
    folds = scribble_folds(labels)
    assert set(np.unique(folds[labels == 1])) == {1, 2}
    left, right = folds[9, 2:20], folds[9, 20:38]
    assert len(set(left)) == 1 and len(set(right)) == 1 and left[0] != right[0]


def test_multi_otsu_names_bins_by_the_annotations():
    ph = make_phantom((32, 32, 32), seed=3)
    ann = make_annotations(ph.labels, 3)
    pred, info = _multi_otsu(ph.volume, ann, 3)
    assert pred.dtype == np.uint8 and set(np.unique(pred)) <= {1, 2, 3}
    agree = np.mean(pred[ann == 0] == ph.labels[ann == 0])
    assert agree > 0.8 and info["params"] == 2


def test_quick_mode_runs_scribble_and_cross_image_rows(tmp_path):
    """``--quick``: a real (tiny) run of the scribble phantom rows and the InSegt glass -> slices case."""
    import json
    import subprocess

    out = tmp_path / "rows.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "accuracy.py"), "--quick", "--work", str(tmp_path),
                          "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())
    scribble = [r for r in rows if r.get("annotation") == "scribbles"]
    assert {r["method"] for r in scribble} == {"dilated_resnet", "multi_otsu", "random_forest"}
    assert all(0 < r["annotated"] < 32 * 32 and r["scored_voxels"] == 32**3 - r["annotated"] for r in scribble)
    cross = [r for r in rows if r["case"] == "insegt-glass->slices"]
    assert len(cross) == 3 and all(0.0 <= r["mean_iou"] <= 1.0 for r in cross)
    assert "scribbles on 1" in run.stdout and "insegt-glass->slices" in run.stdout
