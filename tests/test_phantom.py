"""Tests for :mod:`pipeline.testing.phantom` (synthetic fibre-composite tomograms)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.errors import InputError
from pipeline.testing.phantom import ATTENUATION, CLASSES, Phantom, make_annotations, make_phantom, to_uint16

SHAPE = (24, 48, 48)


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return make_phantom(SHAPE, seed=1)


def _radial_profile(image: np.ndarray) -> np.ndarray:
    """Mean of a (Y, X) image per integer radius from the rotation centre (Y // 2, X // 2)."""
    yy, xx = np.indices(image.shape)
    r = np.rint(np.hypot(yy - image.shape[0] // 2, xx - image.shape[1] // 2)).astype(int)
    sums = np.bincount(r.ravel(), weights=image.ravel())
    return sums / np.bincount(r.ravel())


def test_shapes_dtypes_and_classes(phantom: Phantom) -> None:
    assert phantom.volume.shape == SHAPE and phantom.volume.dtype == np.float32
    assert phantom.labels.shape == SHAPE and phantom.labels.dtype == np.uint8
    assert phantom.classes == CLASSES == ("matrix", "fibre", "pore")
    assert set(np.unique(phantom.labels)) == {1, 2, 3}
    assert np.all(np.isfinite(phantom.volume))


def test_class_fractions_are_sensible(phantom: Phantom) -> None:
    fractions = np.bincount(phantom.labels.ravel(), minlength=4) / phantom.labels.size
    assert fractions[0] == 0
    assert 0.18 < fractions[2] < 0.32  # fibre_fraction=0.25, minus what pores cut out
    assert 0.015 < fractions[3] < 0.06  # pore_fraction=0.02, overshoot of the last pore
    assert fractions[1] > 0.6


def test_deterministic_per_seed(phantom: Phantom) -> None:
    again = make_phantom(SHAPE, seed=1)
    np.testing.assert_array_equal(again.labels, phantom.labels)
    np.testing.assert_array_equal(again.volume, phantom.volume)


def test_different_seeds_differ(phantom: Phantom) -> None:
    other = make_phantom(SHAPE, seed=2)
    assert np.mean(other.labels != phantom.labels) > 0.05
    assert not np.allclose(other.volume, phantom.volume)


def test_contrast_follows_physics(phantom: Phantom) -> None:
    v, lab = phantom.volume, phantom.labels
    matrix, fibre, pore = (float(v[lab == c].mean()) for c in (1, 2, 3))
    assert fibre > matrix + 0.3
    assert pore < matrix - 0.25  # small pores are blurred towards the matrix
    assert abs(matrix - ATTENUATION[1]) < 0.15  # reconstruction is in attenuation units


def test_noise_present_and_thresholding_imperfect(phantom: Phantom) -> None:
    v, lab = phantom.volume, phantom.labels
    assert float(v[lab == 1].std()) > 0.02  # not piecewise constant
    fibre = lab == 2
    best = max(np.count_nonzero((v > t) & fibre) / np.count_nonzero((v > t) | fibre) for t in np.linspace(1.0, 1.5, 51))
    assert 0.5 < best < 0.97


def test_rings_change_the_radial_profile() -> None:
    shape = (16, 48, 48)
    clean = make_phantom(shape, seed=4, ring_strength=0.0)
    ringed = make_phantom(shape, seed=4, ring_strength=0.1)
    np.testing.assert_array_equal(clean.labels, ringed.labels)  # same geometry and photon noise

    def roughness(volume: np.ndarray) -> float:
        profile = _radial_profile(volume.mean(axis=0))[:24]  # inside the inscribed circle
        return float(np.std(np.diff(profile)))

    assert roughness(ringed.volume) > 2.0 * roughness(clean.volume)


def test_non_square_slices() -> None:
    p = make_phantom((8, 20, 36), seed=0, n_angles=24)
    assert p.volume.shape == p.labels.shape == (8, 20, 36)
    assert set(np.unique(p.labels)) <= {1, 2, 3}


def test_no_fibres_no_pores() -> None:
    p = make_phantom((8, 16, 16), fibre_fraction=0.0, pore_fraction=0.0)
    assert np.all(p.labels == 1)


def test_make_annotations_copies_truth_on_n_slices(phantom: Phantom) -> None:
    for axis in (0, 1, 2):
        ann = make_annotations(phantom.labels, 5, axis=axis)
        assert ann.dtype == np.uint8 and ann.shape == phantom.labels.shape
        moved_ann = np.moveaxis(ann, axis, 0)
        moved_truth = np.moveaxis(phantom.labels, axis, 0)
        labelled = np.flatnonzero(moved_ann.reshape(moved_ann.shape[0], -1).any(axis=1))
        assert len(labelled) == 5
        np.testing.assert_array_equal(moved_ann[labelled], moved_truth[labelled])
        others = np.setdiff1d(np.arange(moved_ann.shape[0]), labelled)
        assert not moved_ann[others].any()
        assert labelled.min() > 0 and labelled.max() < moved_ann.shape[0] - 1  # spread, not bunched


def test_make_annotations_fraction(phantom: Phantom) -> None:
    ann = make_annotations(phantom.labels, 4, fraction=0.3, seed=7)
    full = make_annotations(phantom.labels, 4)
    kept = np.count_nonzero(ann) / np.count_nonzero(full)
    assert 0.25 < kept < 0.35
    mask = ann > 0
    np.testing.assert_array_equal(ann[mask], phantom.labels[mask])
    np.testing.assert_array_equal(ann, make_annotations(phantom.labels, 4, fraction=0.3, seed=7))


def test_to_uint16(phantom: Phantom) -> None:
    out = to_uint16(phantom.volume)
    assert out.dtype == np.uint16 and out.shape == phantom.volume.shape
    lo, hi = np.percentile(out, [0.1, 99.9])
    assert abs(lo - 1000) <= 2 and abs(hi - 64000) <= 2
    order = np.argsort(phantom.volume, axis=None)
    assert np.all(np.diff(out.ravel()[order].astype(np.int64)) >= 0)  # monotonic
    assert np.all(to_uint16(np.full((4, 4), 3.0)) == 1000)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"shape": (32, 32)},
        {"shape": (32, 32, 32, 32)},
        {"shape": (7, 32, 32)},
        {"shape": (32, 32, 4.5)},
        {"fibre_fraction": 1.0},
        {"fibre_fraction": -0.1},
        {"pore_fraction": 1.5},
        {"fibre_fraction": 0.6, "pore_fraction": 0.5},
        {"fibre_radius": (0.0, 2.0)},
        {"fibre_radius": (3.0, 2.0)},
        {"families": 0},
        {"spread_deg": -1.0},
        {"n_angles": 0},
        {"photons": 0.0},
        {"blur_sigma": -0.5},
        {"ring_strength": float("nan")},
    ],
)
def test_bad_arguments_raise(kwargs: dict) -> None:
    args = {"shape": (16, 16, 16), **kwargs}
    with pytest.raises(ValueError):
        make_phantom(**args)


def test_bad_annotation_arguments_raise(phantom: Phantom) -> None:
    with pytest.raises(InputError):
        make_annotations(phantom.labels, 0)
    with pytest.raises(ValueError):
        make_annotations(phantom.labels, SHAPE[0] + 1)
    with pytest.raises(ValueError):
        make_annotations(phantom.labels, 2, fraction=0.0)
    with pytest.raises(ValueError):
        make_annotations(phantom.labels, 2, axis=3)
    with pytest.raises(ValueError):
        make_annotations(phantom.volume, 2)
    with pytest.raises(ValueError):
        to_uint16(np.array([1.0, np.nan]))
