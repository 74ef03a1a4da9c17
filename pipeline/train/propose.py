"""A start with no labels: cluster filter-bank features into K phases.

``propose(scan, output, classes=K)``:

1. **Sample**: a few evenly spaced z-slices; for each, the fixed Gaussian filter bank of
   :class:`~pipeline.models.filterbank.FilterBankMLP` (smoothed intensity, gradient magnitude,
   LoG, Hessian eigenvalues at ``sigmas``) is computed on a slab ``1 + 2h`` thick around it (the
   stride-free trick), on z-scored intensities. ``sample`` voxels are drawn at random from them.
2. **Cluster** the standardised features (by default the intensity ones only: raw and smoothed
   at each scale; ``features="all"`` adds gradients, LoG and Hessian eigenvalues, which on the
   fibre phantom make the clusters follow edges rather than phases) with scikit-learn: a
   Gaussian mixture with one shared (``tied``) covariance (default), or k-means. Clusters are
   ordered by their mean intensity, so class 1 is the darkest phase.
3. **Model**: both fits have a linear posterior in the features (tied-covariance GMM exactly;
   k-means as the nearest-centroid rule with unit-variance softmax), so the result is a
   ``filterbank_mlp`` bundle with ``layers = 0`` whose 1x1x1 head holds that linear map. It is a
   normal studios model: ``OUTPUT/model/``.
4. **Segment** the scan blockwise with it (:func:`pipeline.segment.run.segment`, exact as any
   segmentation): ``OUTPUT/segmentation.zarr``.
5. **Pre-annotation**: ``OUTPUT/preannotation.zarr``, a label volume of the scan's shape (OME-Zarr,
   uint8) holding only confident voxels (posterior >= ``confidence``) on a few slices along each
   axis, 0 elsewhere: correct it in a viewer, then ``studios train SCAN OUTPUT/preannotation.zarr``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from pipeline import __version__
from pipeline.core.errors import ConfigError, InputError, OutputExistsError
from pipeline.core.geometry import Box
from pipeline.core.normalize import Normalization, apply_affine
from pipeline.core.progress import NullReporter, Reporter
from pipeline.core.tiling import Block
from pipeline.io.bundle import ModelBundle, from_model, save_bundle
from pipeline.io.store import (
    Image,
    create_array,
    create_group,
    multiscales,
    open_image,
    read_padded,
    set_studios_attrs,
)
from pipeline.models.filterbank import FEATURES_PER_SCALE, FilterBankMLP
from pipeline.segment.predict import numerics
from pipeline.train.suggest import candidate_indices, slice_probabilities

logger = logging.getLogger(__name__)

METHODS = ("gmm", "kmeans")
FEATURE_SETS = ("intensity", "all")
DEFAULT_SIGMAS = (0.7, 1.6, 3.5)
DEFAULT_SAMPLE = 200_000
SAMPLE_SLICES = 8
PRE_SLICES = 3  # pre-annotated slices per axis


@dataclass(frozen=True)
class ProposeResult:
    """What :func:`propose` wrote.

    Attributes:
        model: the bundle folder (``filterbank_mlp``, linear head).
        segmentation: the segmentation ``.zarr``.
        preannotation: the sparse label volume ``.zarr`` (confident voxels on a few slices).
        class_means: mean (raw) intensity of each class, ascending.
        fractions: share of the sampled voxels in each class.
        preannotated: labelled voxels per class in the pre-annotation.
        seconds: wall time.
    """

    model: Path
    segmentation: Path
    preannotation: Path
    class_means: tuple[float, ...]
    fractions: tuple[float, ...]
    preannotated: tuple[int, ...]
    seconds: float


def propose(
    scan: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    classes: int,
    method: str = "gmm",
    features: str = "intensity",
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    sample: int = DEFAULT_SAMPLE,
    confidence: float = 0.95,
    names: Sequence[str] | None = None,
    seed: int = 0,
    overwrite: bool = False,
    reporter: Reporter | None = None,
    **segment_options: Any,
) -> ProposeResult:
    """Cluster ``scan`` into ``classes`` phases; write a model, a segmentation and a pre-annotation.

    Args:
        scan: an ingested scan.
        output: folder to create (``model/``, ``segmentation.zarr``, ``preannotation.zarr``).
        classes: K >= 2.
        method: ``"gmm"`` (tied-covariance Gaussian mixture) or ``"kmeans"``.
        features: ``"intensity"`` (raw and smoothed intensities) or ``"all"`` filter-bank features.
        sigmas: filter-bank scales in voxels.
        sample: voxels drawn for the fit.
        confidence: posterior a voxel needs to enter the pre-annotation, in (0.5, 1].
        names: class names (default ``phase1..phaseK``, darkest first).
        segment_options: passed to :func:`pipeline.segment.run.segment` (``cluster``, ``executor``, ...).
    """
    t0 = time.perf_counter()
    k = _check(classes, method, sample, confidence, names)
    if features not in FEATURE_SETS:
        raise ConfigError(f"features {features!r} are unknown; use one of {', '.join(FEATURE_SETS)}")
    out = Path(output)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out}: already exists and is not empty; pass --overwrite or choose another folder")
    image = open_image(scan, kind="scan")
    if len(image.shape) != 3:
        raise InputError(f"{scan}: has shape {image.shape}; propose needs a (z, y, x) scan")
    reporter = reporter or NullReporter()
    net = FilterBankMLP(classes=k, sigmas=sigmas, layers=0).eval()
    normalization = Normalization(method="zscore")
    offset, scale = normalization.affine(image.stats)
    feats = sample_features(image, net, offset=offset, scale=scale, sample=sample, seed=seed, reporter=reporter)
    cols = feature_columns(net, features)
    w_cols, bias, means, fractions = fit_phases(feats[:, cols], k, method=method, seed=seed,
                                                intensity_scale=scale, intensity_offset=offset)
    weight = np.zeros((k, net.n_features))
    weight[:, cols] = w_cols
    head = cast(torch.nn.Conv3d, net.mlp[0])
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight.astype(np.float32)).reshape(k, -1, 1, 1, 1))
        cast(torch.Tensor, head.bias).copy_(torch.from_numpy(bias.astype(np.float32)))
    class_names = tuple(names) if names else tuple(f"phase{i}" for i in range(1, k + 1))
    bundle = _bundle(net, class_names, normalization, scan, f"{method} on {features} features", sample, seed,
                     means, fractions)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = save_bundle(bundle, out / "model", overwrite=overwrite)
    from pipeline.segment.run import segment

    seg = segment(scan, model_dir, out / "segmentation.zarr", overwrite=overwrite, reporter=reporter,
                  **segment_options)
    pre, counts = write_preannotation(image, net, out / "preannotation.zarr", offset=offset, scale=scale,
                                      confidence=confidence, overwrite=overwrite)
    return ProposeResult(model=model_dir, segmentation=Path(seg.path), preannotation=pre,
                         class_means=tuple(means), fractions=tuple(fractions), preannotated=counts,
                         seconds=time.perf_counter() - t0)


def _check(classes: int, method: str, sample: int, confidence: float, names: Sequence[str] | None) -> int:
    k = int(classes)
    if k < 2 or k > 255:
        raise ConfigError(f"--classes {classes}: give between 2 and 255 phases")
    if method not in METHODS:
        raise ConfigError(f"method {method!r} is unknown; use one of {', '.join(METHODS)}")
    if sample < 10 * k:
        raise ConfigError(f"sample {sample}: draw at least {10 * k} voxels for {k} phases")
    if not 0.5 < confidence <= 1.0:
        raise ConfigError(f"confidence {confidence}: give a posterior in (0.5, 1]")
    if names is not None and (len(names) != k or len(set(names)) != k):
        raise ConfigError(f"class names {list(names)}: give {k} distinct names, one per phase")
    return k


def feature_columns(net: FilterBankMLP, features: str) -> list[int]:
    """Indices of the filter-bank channels used: all, or the raw and smoothed intensities."""
    if features == "all":
        return list(range(net.n_features))
    return [0, *(1 + FEATURES_PER_SCALE * i for i in range(len(net.sigmas)))]


def sample_features(
    image: Image, net: FilterBankMLP, *, offset: float, scale: float, sample: int, seed: int,
    reporter: Reporter | None = None,
) -> np.ndarray[Any, np.dtype[np.float32]]:
    """Filter-bank features of ``sample`` random voxels on a few z-slices.

    Returns:
        (N, F) float32, ``F = net.n_features``; column 0 is the normalised intensity.
    """
    shape = tuple(int(s) for s in image.shape)
    indices = candidate_indices(shape[0], SAMPLE_SLICES)
    rng = np.random.default_rng(seed)
    per_slice = -(-sample // len(indices))
    reporter = reporter or NullReporter()
    parts = []
    reporter.start("features", len(indices))
    with numerics(exact=False):
        for z in indices:
            write = Box((z, 0, 0), (1, shape[1], shape[2]))
            block = Block(index=(0, z, 0), write=write, read=write.grow(net.halo))
            x = torch.from_numpy(apply_affine(read_padded(image.array, block, shape), offset, scale))[None, None]
            f = net.features(x)[0, :, 0].reshape(net.n_features, -1).numpy()  # (F, Y * X)
            pick = rng.choice(f.shape[1], size=min(per_slice, f.shape[1]), replace=False)
            parts.append(f[:, pick].T)
            reporter.advance(1, voxels=shape[1] * shape[2])
    reporter.finish()
    return np.concatenate(parts).astype(np.float32)


def fit_phases(
    feats: np.ndarray[Any, Any], k: int, *, method: str, seed: int, intensity_scale: float = 1.0,
    intensity_offset: float = 0.0,
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], list[float], list[float]]:
    """Cluster ``feats`` (N, F) into ``k`` phases; return a linear head on the raw features.

    Returns:
        ``(weight (K, F), bias (K,), class means in raw intensity (ascending), fractions)``: the
        logits ``weight @ f + bias`` give the fit's posterior (softmax) for features ``f``.
    """
    from sklearn.cluster import KMeans
    from sklearn.mixture import GaussianMixture

    mu = feats.mean(axis=0)
    sd = feats.std(axis=0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    z = ((feats - mu) / sd).astype(np.float64)
    if method == "kmeans":
        km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(z)
        centres = km.cluster_centers_
        w_z = centres  # logits = -|z - c|^2 / 2 + |z|^2 / 2 = c.z - |c|^2 / 2
        b_z = -0.5 * (centres * centres).sum(axis=1)
        assign = km.labels_
    else:
        gm = GaussianMixture(n_components=k, covariance_type="tied", random_state=seed, n_init=2,
                             reg_covar=1e-4).fit(z)
        prec = np.linalg.inv(gm.covariances_)
        w_z = gm.means_ @ prec  # log p(k | z) = mu_k' P z - mu_k' P mu_k / 2 + log pi_k + const
        b_z = -0.5 * np.einsum("kf,kf->k", w_z, gm.means_) + np.log(gm.weights_)
        assign = gm.predict(z)
    # back to raw features: z = (f - mu) / sd
    weight = w_z / sd
    bias = b_z - (w_z * (mu / sd)).sum(axis=1)
    mean_norm = np.array([feats[assign == c, 0].mean() if np.any(assign == c) else np.inf for c in range(k)])
    order = np.argsort(mean_norm)
    fractions = [float(np.mean(assign == c)) for c in order]
    means = [float(mean_norm[c] / intensity_scale + intensity_offset) for c in order]
    return weight[order], bias[order], means, fractions


def _bundle(net: FilterBankMLP, names: tuple[str, ...], normalization: Normalization, scan: Any, method: str,
            sample: int, seed: int, means: list[float], fractions: list[float]) -> ModelBundle:
    provenance = {"kind": "proposed", "method": method, "scan": str(Path(scan).resolve()), "sample": sample,
                  "seed": seed, "class_means": means, "fractions": fractions, "studios_version": __version__}
    return from_model(net, classes=names, normalization=normalization, provenance=provenance)


def write_preannotation(
    image: Image, net: FilterBankMLP, path: Path, *, offset: float, scale: float, confidence: float,
    overwrite: bool = False, slices: int = PRE_SLICES,
) -> tuple[Path, tuple[int, ...]]:
    """Confident voxels (posterior >= ``confidence``) on ``slices`` slices per axis, as a label image.

    Returns:
        (the written OME-Zarr image, labelled voxels per class).
    """
    shape = tuple(int(s) for s in image.shape)
    group = create_group(path, overwrite=overwrite)
    arr = create_array(group, "0", shape=shape, dtype=np.uint8, chunks=(64, 64, 64))
    counts = np.zeros(net.classes + 1, np.int64)
    with numerics(exact=False):
        for axis in range(3):
            for index in candidate_indices(shape[axis], slices + 2)[1:-1]:  # away from the borders
                probs = slice_probabilities(image, net, axis, index, offset=offset, scale=scale)
                labels = np.where(probs.max(axis=0) >= confidence, probs.argmax(axis=0) + 1, 0).astype(np.uint8)
                key: list[Any] = [slice(None)] * 3
                key[axis] = slice(index, index + 1)
                current = np.asarray(arr[tuple(key)])
                plane = np.expand_dims(labels, axis)
                new = np.where(current > 0, 0, plane)  # crossing slices: the first one's label stays
                arr[tuple(key)] = np.where(current > 0, current, plane)
                counts += np.bincount(new.ravel(), minlength=net.classes + 1)
    group.attrs["ome"] = {"version": "0.5", "multiscales": [multiscales(1, voxel_size=image.voxel_size,
                                                                        name="preannotation")]}
    set_studios_attrs(group, kind="annotations", classes=net.classes, confidence=confidence, complete=True)
    return path, tuple(int(c) for c in counts[1:])
