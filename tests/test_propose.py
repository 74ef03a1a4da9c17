"""``studios propose``: clustering into K phases, a normal segmentation and a trainable pre-annotation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import make_scan
from scipy import ndimage
from sklearn.mixture import GaussianMixture

from pipeline.cli.main import main
from pipeline.compute.executors import SerialExecutor
from pipeline.core.errors import ConfigError
from pipeline.io.bundle import load_bundle
from pipeline.io.store import open_image
from pipeline.segment.predict import predict_volume, to_labels
from pipeline.train.annotations import load_annotations
from pipeline.train.propose import PRE_SLICES, fit_phases, propose
from pipeline.train.suggest import candidate_indices

SHAPE = (20, 32, 32)


def three_phase(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Dark pores (1), grey matrix (2), bright inclusions (3) with noise; truth labels 1..3."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=SHAPE), 2.0)
    lo, hi = np.quantile(field, [0.2, 0.7])
    truth = np.digitize(field, [lo, hi]).astype(np.uint8) + 1
    means = np.array([0.0, 100.0, 200.0])
    volume = (means[truth - 1] + rng.normal(0, 15, SHAPE)).astype(np.float32)
    return volume, truth


@pytest.fixture(scope="module")
def proposed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray, object]:
    tmp = tmp_path_factory.mktemp("propose")
    volume, truth = three_phase()
    scan = make_scan(tmp, volume)
    r = propose(scan, tmp / "out", classes=3, sample=20_000, executor=SerialExecutor(), qc=False,
                names=["pore", "matrix", "inclusion"])
    return scan, volume, truth, r


def test_phases_ordered_segmentation_matches_truth(proposed):
    scan, volume, truth, r = proposed
    assert list(r.class_means) == sorted(r.class_means) and abs(sum(r.fractions) - 1) < 1e-6
    seg = np.asarray(zarr.open_group(str(r.segmentation), mode="r")["0"])
    assert seg.shape == SHAPE
    assert np.mean(seg == truth) > 0.97  # class 1 is the darkest phase: no relabelling needed
    bundle = load_bundle(r.model)
    assert bundle.arch == "filterbank_mlp" and bundle.params["layers"] == 0
    assert bundle.classes == ("pore", "matrix", "inclusion") and bundle.provenance["kind"] == "proposed"
    image = open_image(scan)
    offset, scale = bundle.normalization.affine(image.stats)
    ref = to_labels(predict_volume(bundle.build(), volume, offset=offset, scale=scale))
    assert np.mean(ref == seg) > 0.999  # a normal blockwise studios segmentation of that model


def test_preannotation_is_sparse_confident_and_trainable(proposed):
    scan, _volume, truth, r = proposed
    pre = np.asarray(zarr.open_group(str(r.preannotation), mode="r")["0"])
    labelled = pre > 0
    assert 0 < labelled.mean() < 0.4  # 3 slices per axis of a small volume
    on_planes = np.zeros(SHAPE, bool)
    for axis in range(3):
        key: list[object] = [slice(None)] * 3
        key[axis] = candidate_indices(SHAPE[axis], PRE_SLICES + 2)[1:-1]
        on_planes[tuple(key)] = True
    assert not labelled[~on_planes].any()  # only on the pre-annotated slices
    assert np.mean(pre[labelled] == truth[labelled]) > 0.98
    assert tuple(int((pre == k).sum()) for k in (1, 2, 3)) == r.preannotated
    ann = load_annotations(r.preannotation, SHAPE)
    assert ann.total == int(labelled.sum()) and ann.n_classes == 3 and ann.missing == ()


def test_linear_head_is_the_mixture_posterior():
    rng = np.random.default_rng(1)
    feats = np.concatenate([rng.normal(m, 1.0, size=(500, 2)) for m in (-4.0, 0.0, 5.0)]).astype(np.float32)
    weight, bias, means, fractions = fit_phases(feats, 3, method="gmm", seed=0)
    logits = torch.from_numpy(feats.astype(np.float64) @ weight.T + bias)
    post = torch.softmax(logits, 1).numpy()
    mu, sd = feats.mean(0), feats.std(0)
    gm = GaussianMixture(n_components=3, covariance_type="tied", random_state=0, n_init=2, reg_covar=1e-4)
    ref = gm.fit((feats - mu) / sd).predict_proba((feats - mu) / sd)
    order = np.argsort([feats[ref.argmax(1) == c, 0].mean() for c in range(3)])
    np.testing.assert_allclose(post, ref[:, order], atol=1e-4)
    assert means == sorted(means) and np.allclose(fractions, [1 / 3] * 3, atol=0.02)
    w, b, _, _ = fit_phases(feats, 3, method="kmeans", seed=0)
    assert np.mean((feats @ w.T + b).argmax(1) == np.repeat([0, 1, 2], 500)) > 0.98


def test_cli_and_bad_input(tmp_path, capsys):
    volume, _truth = three_phase(2)
    scan = make_scan(tmp_path, volume)
    out = tmp_path / "p"
    argv = ["propose", str(scan), str(out), "--classes", "3", "--sample", "5000", "--cluster", "serial"]
    assert main([*argv, "--method", "kmeans"]) == 0
    printed = capsys.readouterr().out
    assert "preannotation.zarr" in printed and "studios train" in printed
    assert main(argv) == 3  # the folder is not empty
    assert "--overwrite" in capsys.readouterr().err
    assert main(["propose", str(scan), str(tmp_path / "q"), "--classes", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("studios: error: ") and "--classes 1" in err and "\n" not in err
    assert not (tmp_path / "q").exists()
    with pytest.raises(ConfigError):
        propose(scan, tmp_path / "r", classes=2, features="texture")
