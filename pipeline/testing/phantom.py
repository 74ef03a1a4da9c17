"""Synthetic glass-fibre composite tomograms with dense ground truth.

The phantom imitates the material of the tomo2seg study (epoxy/polymer matrix, glass fibres in a
few orientation families, air pores) and the way a synchrotron images it, slice by slice:

1. attenuation map per z-slice: matrix ``1.0``, fibre ``1.6``, pore ``0.05`` (:data:`ATTENUATION`);
   the material fills the whole ``(Y, X)`` slice, there is no air around the sample (a slice that
   is not square is padded with matrix to ``max(Y, X)`` squared for the scan and cropped back);
2. parallel-beam projections with :func:`skimage.transform.radon` (``circle=False``, so the
   detector is as long as the slice diagonal and sees the whole square), scaled so that a ray
   straight through the matrix is attenuated by ``exp(-2)``;
3. photon noise: ``Poisson(photons * exp(-line_integral))`` counts per detector pixel;
4. detector (scintillator) blur: Gaussian of ``blur_sigma`` pixels along the detector axis;
5. ring artefacts: one log-normal gain error per detector pixel, identical for every slice and
   angle, that the flat-field correction does not remove;
6. filtered back-projection with :func:`skimage.transform.iradon` (``filter_name="shepp-logan"``,
   ``circle=False``): the reconstruction has values everywhere in the square, in attenuation
   units (matrix about ``1.0``); the corners, which only some rays cross, are noisier.

Ground truth is dense: every voxel is 1 (matrix), 2 (fibre) or 3 (pore); pores override fibres
override matrix. Geometry, photon noise and gain errors come from independent streams of one
:class:`numpy.random.SeedSequence`, so e.g. two phantoms that differ only in ``ring_strength``
have the same fibres and the same photon noise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter, gaussian_filter1d
from skimage.transform import iradon, radon

from pipeline.core.errors import InputError

logger = logging.getLogger(__name__)

CLASSES: tuple[str, ...] = ("matrix", "fibre", "pore")
"""Class names; label value ``i + 1`` is ``CLASSES[i]``. Label 0 never occurs in dense truth."""

MATRIX, FIBRE, PORE = 1, 2, 3
ATTENUATION: dict[int, float] = {MATRIX: 1.0, FIBRE: 1.6, PORE: 0.05}
"""Linear attenuation per class, in units of the matrix attenuation."""

_MATRIX_PATH_ATTENUATION = 2.0  # line integral of a ray crossing the full slice width of matrix
_FBP_FILTER = "shepp-logan"
_MIN_SIZE = 8
_PIECE = 16.0  # a fibre is rasterised in pieces of this length, each inside its own small box
_MAX_FIBRE_TRIES = 100_000
_MAX_PORE_TRIES = 100_000


@dataclass(frozen=True)
class Phantom:
    """A synthetic reconstruction and its dense ground truth.

    Attributes
    ----------
    volume : numpy.ndarray
        ``(Z, Y, X)`` float32 filtered back-projection, in attenuation units (matrix ~1.0).
    labels : numpy.ndarray
        ``(Z, Y, X)`` uint8 dense truth: 1 = matrix, 2 = fibre, 3 = pore (never 0).
    classes : tuple of str
        Class names, ``classes[v - 1]`` names label value ``v``; equals :data:`CLASSES`.
    """

    volume: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...] = CLASSES

    def __post_init__(self) -> None:
        if self.volume.shape != self.labels.shape:
            raise InputError(
                f"Phantom: volume shape {self.volume.shape} != labels shape {self.labels.shape}; "
                "build both from the same geometry"
            )


def _fail(message: str) -> InputError:
    return InputError(f"make_phantom: {message}")


def _check_fraction(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise _fail(f"{name} must lie in [0, 1), got {value!r}")
    return value


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        sizes = tuple(int(s) for s in shape)
    except (TypeError, ValueError) as exc:
        raise _fail(f"shape must be three integers (Z, Y, X), got {shape!r}") from exc
    if len(sizes) != 3 or any(s != raw for s, raw in zip(sizes, shape, strict=True)):
        raise _fail(f"shape must be three integers (Z, Y, X), got {shape!r}; e.g. (64, 64, 64)")
    if min(sizes) < _MIN_SIZE:
        raise _fail(f"every size must be >= {_MIN_SIZE}, got shape {sizes}")
    return sizes  # type: ignore[return-value]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _family_axes(rng: np.random.Generator, families: int) -> np.ndarray:
    """Unit axes ``(families, 3)`` in (z, y, x): spread evenly in the y-x plane, tilted up to 20 deg."""
    phase = rng.uniform(0.0, np.pi)
    azimuth = phase + np.pi * np.arange(families) / families
    tilt = np.deg2rad(rng.uniform(-20.0, 20.0, size=families))
    return np.stack([np.sin(tilt), np.cos(tilt) * np.sin(azimuth), np.cos(tilt) * np.cos(azimuth)], axis=1)


def _perturb(rng: np.random.Generator, axis: np.ndarray, spread_rad: float) -> np.ndarray:
    """Unit vector around ``axis`` with a Gaussian angular spread of ``spread_rad`` per direction."""
    helper = np.array([1.0, 0.0, 0.0]) if abs(axis[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = _unit(np.cross(axis, helper))
    e2 = np.cross(axis, e1)
    a, b = rng.normal(0.0, spread_rad, size=2)
    return _unit(axis + np.tan(a) * e1 + np.tan(b) * e2)


def _add_cylinder(mask: np.ndarray, centre: np.ndarray, direction: np.ndarray, radius: float) -> int:
    """Set ``mask`` (bool, (Z, Y, X)) to True within ``radius`` of the line; return the new voxels.

    The line is clipped to the box grown by ``radius`` and cut into pieces of length ``_PIECE``;
    the squared distance to the line is evaluated only inside each piece's bounding box.
    """
    shape = np.asarray(mask.shape, dtype=float)
    lo, hi = -radius - 1.0, shape + radius
    t0, t1 = -np.inf, np.inf
    for a in range(3):
        if abs(direction[a]) > 1e-12:
            ta = (lo - centre[a]) / direction[a]
            tb = (hi[a] - centre[a]) / direction[a]
            t0, t1 = max(t0, min(ta, tb)), min(t1, max(ta, tb))
    n_pieces = max(1, math.ceil((t1 - t0) / _PIECE))
    ts = np.linspace(t0, t1, n_pieces + 1)
    r2 = radius * radius
    added = 0
    for ta, tb in zip(ts[:-1], ts[1:], strict=True):
        p0, p1 = centre + ta * direction, centre + tb * direction
        bmin = np.maximum(np.floor(np.minimum(p0, p1) - radius), 0).astype(int)
        bmax = np.minimum(np.ceil(np.maximum(p0, p1) + radius) + 1, shape).astype(int)
        if np.any(bmax <= bmin):
            continue
        z = (np.arange(bmin[0], bmax[0]) - centre[0])[:, None, None]
        y = (np.arange(bmin[1], bmax[1]) - centre[1])[None, :, None]
        x = (np.arange(bmin[2], bmax[2]) - centre[2])[None, None, :]
        along = direction[0] * z + direction[1] * y + direction[2] * x
        inside = (z * z + y * y + x * x - along * along) <= r2
        view = mask[bmin[0] : bmax[0], bmin[1] : bmax[1], bmin[2] : bmax[2]]
        added += int(np.count_nonzero(inside & ~view))
        view |= inside
    return added


def _add_ellipsoid(mask: np.ndarray, centre: np.ndarray, rotation: np.ndarray, semi_axes: np.ndarray) -> int:
    """Set ``mask`` (bool, (Z, Y, X)) inside a rotated ellipsoid; return the new voxels."""
    shape = np.asarray(mask.shape)
    reach = float(semi_axes.max())
    bmin = np.maximum(np.floor(centre - reach), 0).astype(int)
    bmax = np.minimum(np.ceil(centre + reach) + 1, shape).astype(int)
    if np.any(bmax <= bmin):
        return 0
    grids = np.meshgrid(*(np.arange(b0, b1) - c for b0, b1, c in zip(bmin, bmax, centre, strict=True)), indexing="ij")
    offsets = np.stack(grids, axis=-1)  # (dz, dy, dx, 3)
    local = offsets @ rotation  # coordinates along the ellipsoid's axes
    inside = np.sum((local / semi_axes) ** 2, axis=-1) <= 1.0
    view = mask[bmin[0] : bmax[0], bmin[1] : bmax[1], bmin[2] : bmax[2]]
    added = int(np.count_nonzero(inside & ~view))
    view |= inside
    return added


def _geometry(
    shape: tuple[int, int, int],
    rng: np.random.Generator,
    fibre_radius: tuple[float, float],
    fibre_fraction: float,
    pore_fraction: float,
    families: int,
    spread_deg: float,
) -> np.ndarray:
    """Dense labels ``(Z, Y, X)`` uint8 with fibres and pores added until the fractions are reached."""
    n_voxels = math.prod(shape)
    size = np.asarray(shape, dtype=float)
    fibres = np.zeros(shape, dtype=bool)
    axes = _family_axes(rng, families)
    spread = np.deg2rad(spread_deg)
    count, tries = 0, 0
    while count < fibre_fraction * n_voxels and tries < _MAX_FIBRE_TRIES:
        tries += 1
        family = int(rng.integers(families))
        direction = _perturb(rng, axes[family], spread)
        centre = rng.uniform(0.0, 1.0, size=3) * (size - 1)
        radius = float(rng.uniform(*fibre_radius))
        count += _add_cylinder(fibres, centre, direction, radius)
    if count < fibre_fraction * n_voxels:
        logger.warning(
            "fibre fraction %.3f not reached (%.3f) after %d fibres", fibre_fraction, count / n_voxels, tries
        )

    pores = np.zeros(shape, dtype=bool)
    r_min = max(1.5, 0.02 * min(shape))
    r_max = max(r_min + 1.0, 0.06 * min(shape))
    count, tries = 0, 0
    while count < pore_fraction * n_voxels and tries < _MAX_PORE_TRIES:
        tries += 1
        centre = rng.uniform(0.0, 1.0, size=3) * (size - 1)
        q, r = np.linalg.qr(rng.normal(size=(3, 3)))
        rotation = q * np.sign(np.diag(r))
        semi_axes = float(rng.uniform(r_min, r_max)) * np.array([1.0, *rng.uniform(0.6, 1.0, size=2)])
        count += _add_ellipsoid(pores, centre, rotation, semi_axes)

    labels = np.full(shape, MATRIX, dtype=np.uint8)
    labels[fibres] = FIBRE
    labels[pores] = PORE
    return labels


def _scan(
    labels: np.ndarray,
    noise_rng: np.random.Generator,
    gain_rng: np.random.Generator,
    n_angles: int,
    photons: float,
    blur_sigma: float,
    ring_strength: float,
) -> np.ndarray:
    """Simulate acquisition and FBP of every z-slice; return ``(Z, Y, X)`` float32 attenuation."""
    n_z, n_y, n_x = labels.shape
    width = max(n_y, n_x)
    scale = _MATRIX_PATH_ATTENUATION / width  # attenuation per pixel of the matrix
    lut = np.zeros(max(ATTENUATION) + 1)
    for value, mu in ATTENUATION.items():
        lut[value] = mu * scale
    theta = np.linspace(0.0, 180.0, n_angles, endpoint=False)

    # Pad every slice to the square the reconstruction uses; the padding is matrix too.
    pad_y, pad_x = width - n_y, width - n_x
    before = (width // 2 - n_y // 2, width // 2 - n_x // 2)
    pad = ((before[0], pad_y - before[0]), (before[1], pad_x - before[1]))
    sinograms = [
        radon(
            np.pad(lut[labels[z]], pad, mode="constant", constant_values=lut[MATRIX]),
            theta=theta,
            circle=False,
            preserve_range=True,
        )
        for z in range(n_z)
    ]
    sino = np.stack(sinograms)  # (Z, detector, angle)
    del sinograms

    counts = noise_rng.poisson(photons * np.exp(-sino)).astype(np.float64)
    if blur_sigma > 0:
        counts = gaussian_filter1d(counts, blur_sigma, axis=1, mode="nearest")
    gain = np.exp(ring_strength * gain_rng.normal(size=sino.shape[1]))
    counts *= gain[None, :, None]
    measured = -np.log(np.maximum(counts, 0.5) / photons)

    volume = np.empty(labels.shape, dtype=np.float32)
    for z in range(n_z):
        rec = iradon(
            measured[z], theta=theta, output_size=width, circle=False, filter_name=_FBP_FILTER, preserve_range=True
        )
        volume[z] = rec[before[0] : before[0] + n_y, before[1] : before[1] + n_x] / scale
    return volume


def make_phantom(
    shape: Sequence[int] = (128, 128, 128),
    *,
    seed: int = 0,
    fibre_radius: tuple[float, float] = (2.0, 3.5),
    fibre_fraction: float = 0.25,
    pore_fraction: float = 0.02,
    families: int = 2,
    spread_deg: float = 8.0,
    n_angles: int | None = None,
    photons: float = 2e4,
    blur_sigma: float = 0.7,
    ring_strength: float = 0.02,
) -> Phantom:
    """Generate a fibre-composite tomogram and its dense ground truth.

    Parameters
    ----------
    shape : sequence of 3 int
        ``(Z, Y, X)``, every size ``>= 8``. Slices are reconstructed along Z.
    seed : int
        Seed of the :class:`numpy.random.SeedSequence`; the result is a pure function of all args.
    fibre_radius : (float, float)
        Range ``(low, high)`` of fibre radii in voxels, ``0 < low <= high``, drawn uniformly.
    fibre_fraction : float
        Target volume fraction of fibre before pores are cut out, in ``[0, 1)``.
    pore_fraction : float
        Target volume fraction of pores, in ``[0, 1)``; ``fibre_fraction + pore_fraction < 1``.
    families : int
        Number of fibre orientation families (``>= 1``), evenly spread in azimuth in the y-x plane,
        each tilted by up to 20 degrees towards z.
    spread_deg : float
        Gaussian angular spread (degrees, ``>= 0``) of fibre directions around their family axis.
    n_angles : int or None
        Projections over 180 degrees; default ``max(Y, X)``.
    photons : float
        Incident photons per detector pixel and projection (``> 0``); fewer means more noise.
    blur_sigma : float
        Detector blur, Gaussian sigma in detector pixels (``>= 0``).
    ring_strength : float
        Standard deviation of the log gain error per detector pixel (``>= 0``); causes rings.

    Returns
    -------
    Phantom
        ``volume`` ``(Z, Y, X)`` float32 and ``labels`` ``(Z, Y, X)`` uint8 in ``{1, 2, 3}``.

    Raises
    ------
    pipeline.core.errors.InputError
        (a :class:`ValueError`) when an argument is out of range.
    """
    sizes = _check_shape(shape)
    fibre_fraction = _check_fraction("fibre_fraction", fibre_fraction)
    pore_fraction = _check_fraction("pore_fraction", pore_fraction)
    if fibre_fraction + pore_fraction >= 1.0:
        raise _fail(f"fibre_fraction + pore_fraction must be < 1, got {fibre_fraction + pore_fraction}")
    try:
        r_low, r_high = (float(r) for r in fibre_radius)
    except (TypeError, ValueError) as exc:
        raise _fail(f"fibre_radius must be (low, high), got {fibre_radius!r}") from exc
    if not (math.isfinite(r_high) and 0.0 < r_low <= r_high):
        raise _fail(f"fibre_radius must satisfy 0 < low <= high, got {fibre_radius!r}")
    if isinstance(families, bool) or int(families) != families or families < 1:
        raise _fail(f"families must be an integer >= 1, got {families!r}")
    if not (math.isfinite(spread_deg) and spread_deg >= 0):
        raise _fail(f"spread_deg must be >= 0, got {spread_deg!r}")
    if n_angles is None:
        n_angles = max(sizes[1:])
    if isinstance(n_angles, bool) or int(n_angles) != n_angles or n_angles < 1:
        raise _fail(f"n_angles must be an integer >= 1 or None, got {n_angles!r}")
    if not (math.isfinite(photons) and photons > 0):
        raise _fail(f"photons must be > 0, got {photons!r}")
    if not (math.isfinite(blur_sigma) and blur_sigma >= 0):
        raise _fail(f"blur_sigma must be >= 0, got {blur_sigma!r}")
    if not (math.isfinite(ring_strength) and ring_strength >= 0):
        raise _fail(f"ring_strength must be >= 0, got {ring_strength!r}")

    geometry_rng, noise_rng, gain_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    labels = _geometry(sizes, geometry_rng, (r_low, r_high), fibre_fraction, pore_fraction, int(families), spread_deg)
    volume = _scan(labels, noise_rng, gain_rng, int(n_angles), float(photons), float(blur_sigma), float(ring_strength))
    return Phantom(volume=volume, labels=labels, classes=CLASSES)


def make_annotations(
    labels: np.ndarray, n_slices: int, *, axis: int = 0, seed: int = 0, fraction: float = 1.0
) -> np.ndarray:
    """Sparse annotations: the truth on a few evenly spread slices, 0 (unlabelled) elsewhere.

    Parameters
    ----------
    labels : numpy.ndarray
        Dense integer labels, any shape with ``ndim >= 2`` (``(Z, Y, X)`` for a phantom), values
        in ``0..255``.
    n_slices : int
        Number of annotated slices, ``1 <= n_slices <= labels.shape[axis]``; slice ``i`` is at
        index ``floor((i + 0.5) * n / n_slices)`` so the slices are evenly spread and distinct.
    axis : int
        Axis the slices are taken across.
    seed : int
        Seed for the choice of voxels when ``fraction < 1``.
    fraction : float
        In ``(0, 1]``. Below 1, only about this fraction of the voxels of each annotated slice is
        kept, as blobs (a thresholded smooth random field), like brush scribbles.

    Returns
    -------
    numpy.ndarray
        uint8, same shape as ``labels``: ``labels`` on the kept voxels, 0 elsewhere.
    """
    labels = np.asarray(labels)
    if labels.ndim < 2 or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(
            f"make_annotations: labels must be an integer array with ndim >= 2, got {labels.dtype} {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise InputError("make_annotations: label values must lie in 0..255 to fit uint8")
    if not -labels.ndim <= axis < labels.ndim:
        raise InputError(f"make_annotations: axis {axis} out of range for ndim {labels.ndim}")
    axis %= labels.ndim
    n = labels.shape[axis]
    if isinstance(n_slices, bool) or int(n_slices) != n_slices or not 1 <= n_slices <= n:
        raise InputError(f"make_annotations: n_slices must be an integer in [1, {n}], got {n_slices!r}")
    fraction = float(fraction)
    if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
        raise InputError(f"make_annotations: fraction must lie in (0, 1], got {fraction!r}")

    index = ((np.arange(int(n_slices)) + 0.5) * n / n_slices).astype(np.intp)
    moved = np.moveaxis(labels, axis, 0)
    out = np.zeros(moved.shape, dtype=np.uint8)
    out[index] = moved[index]
    if fraction < 1.0:
        rng = np.random.default_rng(seed)
        field = gaussian_filter(rng.normal(size=(len(index), *moved.shape[1:])), sigma=[0] + [2.0] * (moved.ndim - 1))
        for k, i in enumerate(index):
            keep = field[k] >= np.quantile(field[k], 1.0 - fraction)
            out[i][~keep] = 0
    return np.moveaxis(out, 0, axis)


def to_uint16(volume: np.ndarray) -> np.ndarray:
    """Scale a float reconstruction to uint16 the way a beamline saves it.

    The 0.1th percentile maps to 1000 and the 99.9th to 64000 (linear), leaving head-room for the
    tails; values are rounded and clipped to ``0..65535``. A constant volume maps to 1000.

    Parameters
    ----------
    volume : numpy.ndarray
        Float (or integer) array of any shape, finite.

    Returns
    -------
    numpy.ndarray
        uint16, same shape.
    """
    volume = np.asarray(volume)
    if volume.size == 0:
        return np.zeros(volume.shape, dtype=np.uint16)
    if not np.all(np.isfinite(volume)):
        raise InputError("to_uint16: volume holds NaN or inf; clean it before scaling")
    lo, hi = np.percentile(volume, [0.1, 99.9])
    if hi <= lo:
        return np.full(volume.shape, 1000, dtype=np.uint16)
    scaled = 1000.0 + (volume.astype(np.float64) - lo) * (63000.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 65535).astype(np.uint16)
