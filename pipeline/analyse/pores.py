"""Phases and pores: volume fractions with profiles, pore sizes, local thickness.

Fractions and profiles are sums of per-block counts (local, exact). The pore size distribution
comes from the object table (equivalent diameters of the pore objects: objects are merged
across blocks first, so a pore cut by a block face counts once, whole).

Local thickness is not local: the thickness at ``p`` is ``2 max r`` over the balls of integer
radius ``r`` that contain ``p`` and fit in the pore (centre ``c`` with ``EDT(c) >= r``, EDT the
Euclidean distance to the nearest non-pore voxel, the volume border counting as a wall). A
ball of radius ``r`` only needs the EDT up to ``r`` at centres within ``r`` of ``p``, so with
radii capped at ``R`` a block read with a halo of ``2 R`` gives exactly the whole-volume result:
``min(EDT, R)`` is exact there and so is every ball test. ``R`` is the largest radius a pore
can hold, bounded by its bounding box (``(min extent + 1) / 2``, from the object table) and by
``max_radius`` (values are then "at least ``2 R``"; reported). Cost: ``R`` distance transforms
per block.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage


def thickness_radius(bbox_extent_min: np.ndarray, max_radius: int) -> int:
    """The radius cap ``R`` (voxels) from the pores' smallest bounding-box extents."""
    if not len(bbox_extent_min):
        return 0
    return int(min(max_radius, math.ceil((float(np.max(bbox_extent_min)) + 1) / 2)))


def local_thickness(mask: np.ndarray, radius: int) -> np.ndarray:
    """Local thickness (voxels, float32) of a (Z, Y, X) bool mask padded by ``2 radius``.

    ``0`` outside the mask; values in ``{2, 4, ..., 2 radius}`` inside (a pore voxel with no
    ball of radius 1 around any centre, which cannot happen for EDT >= 1, stays 0).
    """
    thick = np.zeros(mask.shape, dtype=np.float32)
    if radius < 1 or not mask.any():
        return thick
    dist = ndimage.distance_transform_edt(mask)
    for r in range(1, radius + 1):
        centres = dist >= r
        if not centres.any():
            break
        reach = ndimage.distance_transform_edt(~centres) <= r
        thick[reach & mask] = 2 * r
    return thick


def thickness_block(seg: Any, write: Any, shape: tuple[int, ...], label: int, radius: int) -> np.ndarray:
    """Local thickness of the class ``label`` in write box ``write`` (beyond the volume: wall)."""
    h = 2 * radius
    read = write.grow(h)
    lo = [max(0, o) for o in read.offset]
    hi = [min(s, e) for s, e in zip(shape, read.end, strict=True)]
    mask = np.zeros(read.shape, dtype=bool)
    inner = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, read.offset, strict=True))
    mask[inner] = np.asarray(seg[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]) == label
    t = local_thickness(mask, radius)
    return t[tuple(slice(h, h + s) for s in write.shape)]


class PhaseCounts:
    """Per-class voxel counts and per-slice profiles along z, y and x."""

    def __init__(self, shape: Sequence[int], n_classes: int) -> None:
        self.shape = tuple(shape)
        self.k = n_classes
        self.profiles = [np.zeros((s, n_classes + 1), dtype=np.int64) for s in self.shape]

    def add(self, offset: Sequence[int], seg: np.ndarray) -> None:
        onehot = seg[..., None] == np.arange(self.k + 1, dtype=seg.dtype)
        for axis in range(3):
            others = tuple(a for a in range(3) if a != axis)
            counts = onehot.sum(axis=others)
            self.profiles[axis][offset[axis]:offset[axis] + seg.shape[axis]] += counts

    def to_json(self, classes: Sequence[str], voxel_size: Sequence[float]) -> dict[str, Any]:
        totals = self.profiles[0].sum(axis=0)
        computed = int(totals[1:].sum())
        out: dict[str, Any] = {"voxels": int(totals.sum()), "computed_voxels": computed, "classes": {}}
        for k, name in enumerate(classes, start=1):
            out["classes"][name] = {
                "label": k, "voxels": int(totals[k]),
                "fraction": float(totals[k] / computed) if computed else None,
                "volume": float(totals[k] * math.prod(voxel_size)),
                "profile": {ax: [float(v) for v in np.divide(p[:, k], np.maximum(p[:, 1:].sum(axis=1), 1))]
                            for ax, p in zip("zyx", self.profiles, strict=True)},
            }
        return out


def size_distribution(diameters: np.ndarray, volumes: np.ndarray) -> dict[str, Any]:
    """Number- and volume-weighted histograms of pore equivalent diameters (log2 bins)."""
    if not len(diameters):
        return {"count": 0, "edges": [], "number": [], "volume": [], "quantiles": {}}
    lo = math.floor(math.log2(max(float(diameters.min()), 1e-12)))
    hi = math.ceil(math.log2(float(diameters.max()))) + 1
    edges = 2.0 ** np.arange(lo, hi + 1)
    number = np.histogram(diameters, bins=edges)[0]
    vol = np.histogram(diameters, bins=edges, weights=volumes)[0]
    q = np.percentile(diameters, [10, 50, 90])
    return {"count": int(len(diameters)), "edges": edges.tolist(), "number": number.astype(int).tolist(),
            "volume": vol.tolist(), "quantiles": {"d10": float(q[0]), "d50": float(q[1]), "d90": float(q[2])},
            "mean": float(diameters.mean())}


__all__ = ["PhaseCounts", "local_thickness", "size_distribution", "thickness_block", "thickness_radius"]
