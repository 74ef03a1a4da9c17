"""Labelled planes, class-balanced patch sampling and tomogram-valid augmentation.

A labelled plane (a slice along z, y or x) is held in canonical layout, plane normal first: the
raw scan slab ``(1 + 2h, A + 2h, B + 2h)`` around the ``A x B`` region that holds its labels, and
``(A, B)`` int64 label maps (class index = label - 1, -1 where unused). Training windows are one
voxel thick on the plane; their input is ``(1 + 2h) x (P + 2h) x (P + 2h)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.core.errors import InputError
from pipeline.core.geometry import Box
from pipeline.core.normalize import apply_affine
from pipeline.core.tiling import Block
from pipeline.io.store import read_padded
from pipeline.train.annotations import Annotations

AUG_SCALE, AUG_OFFSET, AUG_NOISE = 0.1, 0.05, 0.03  # in normalised units


@dataclass
class Plane:
    """One labelled plane, canonical layout (plane normal first), cropped to its labels.

    ``slab``: (1 + 2h, A + 2h, B + 2h) raw scan values around the region ``A x B`` that starts
    at ``origin`` in plane coordinates. ``train``/``val``: (A, B) int64 class index (label - 1),
    -1 where not used. ``val_windows``: (u0, v0, su, sv) output windows covering ``val``.
    ``pseudo``: None, or (A, B) pseudo-labels of a teacher on unlabelled voxels (-1 elsewhere).
    """

    axis: int
    index: int
    origin: tuple[int, int]
    slab: np.ndarray[Any, Any]
    train: np.ndarray[Any, Any]
    val: np.ndarray[Any, Any]
    val_windows: list[tuple[int, int, int, int]]
    pseudo: np.ndarray[Any, Any] | None = None  # (A, B) teacher class index, -1 unused (pipeline.train.teacher)

    def merge_validation(self) -> None:
        """Give the held-out voxels back to training (after the validated phase)."""
        self.train = np.where(self.val >= 0, self.val, self.train)
        self.val = np.full_like(self.train, -1)
        self.val_windows = []


def patch_size(patch: int, shape: tuple[int, ...], ann: Annotations) -> int:
    """Output patch edge: ``patch``, at most every labelled plane's in-plane extent."""
    dims = [s for pl in ann.planes for a, s in enumerate(shape) if a != pl.axis]
    return max(1, min(int(patch), *dims))


def read_plane(array: Any, shape: tuple[int, ...], axis: int, index: int, labels: np.ndarray[Any, Any],
               h: int, size: int) -> Plane:
    """Read the scan around one labelled plane (edge-padded like inference), cropped to its labels.

    ``labels``: (A, B) uint labels of the plane (0 = unlabelled) in plane coordinates.
    """
    dims = [shape[a] for a in range(3) if a != axis]
    rows, cols = np.nonzero(labels)
    lo, hi = [], []
    for coords, n in ((rows, dims[0]), (cols, dims[1])):
        a0, a1 = max(0, int(coords.min()) - size + 1), min(n, int(coords.max()) + size)
        if a1 - a0 < size:  # grow to at least one patch, inside the plane
            a0 = max(0, min(a0, a1 - size))
            a1 = min(n, a0 + size)
        lo.append(a0)
        hi.append(a1)
    return read_region(array, shape, axis, index, (lo[0], lo[1]), (hi[0] - lo[0], hi[1] - lo[1]), h,
                       labels[lo[0] : hi[0], lo[1] : hi[1]])


def read_region(array: Any, shape: tuple[int, ...], axis: int, index: int, origin: tuple[int, int],
                extent: tuple[int, int], h: int, labels: np.ndarray[Any, Any] | None = None) -> Plane:
    """A :class:`Plane` for the in-plane box ``origin``/``extent`` of slice ``index`` across ``axis``."""
    offset, size = [0, 0, 0], [0, 0, 0]
    other = [a for a in range(3) if a != axis]
    offset[axis], size[axis] = index, 1
    for k, a in enumerate(other):
        offset[a], size[a] = origin[k], extent[k]
    write = Box(tuple(offset), tuple(size))
    data = read_padded(array, Block(index=(0, 0, 0), write=write, read=write.grow(h)), shape)
    crop = (np.full(extent, -1, np.int64) if labels is None else labels.astype(np.int64) - 1)
    return Plane(axis=axis, index=index, origin=origin, slab=np.ascontiguousarray(np.moveaxis(data, axis, 0)),
                 train=crop, val=np.full_like(crop, -1), val_windows=[])


class Sampler:
    """Class-balanced training windows: class -> labelled voxel -> jittered window around it."""

    def __init__(self, planes: list[Plane], k: int, size: int, rng: np.random.Generator) -> None:
        self.planes, self.size, self.rng = planes, size, rng
        self.by_class: list[np.ndarray[Any, Any]] = []
        for c in range(k):
            parts = [np.column_stack([np.full(len(rc), i), rc]).astype(np.int32) for i, pl in enumerate(planes)
                     if len(rc := np.argwhere(pl.train == c))]
            self.by_class.append(np.concatenate(parts) if parts else np.zeros((0, 3), np.int32))
        self.present = [c for c in range(k) if len(self.by_class[c])]
        self.n_train = int(sum(len(x) for x in self.by_class))
        if not self.present:
            raise InputError("no labelled voxel is left for training; label more voxels")

    def window(self) -> tuple[int, int, int]:
        """(plane, u0, v0) of a ``size x size`` output window."""
        cls = self.present[int(self.rng.integers(len(self.present)))]
        pool = self.by_class[cls]
        i, u, v = pool[int(self.rng.integers(len(pool)))]
        pl = self.planes[int(i)]
        s, j = self.size, max(1, self.size // 4)
        u0 = int(np.clip(u - s // 2 + self.rng.integers(-j, j + 1), 0, pl.train.shape[0] - s))
        v0 = int(np.clip(v - s // 2 + self.rng.integers(-j, j + 1), 0, pl.train.shape[1] - s))
        return int(i), u0, v0


def patch(pl: Plane, u0: int, v0: int, su: int, sv: int, h: int, labels: np.ndarray[Any, Any]) -> tuple[
        np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Input (original axis order) and target (1 thick on the plane axis) for an output window.

    Returns ``x`` raw scan values and ``y`` int64 class indices (-1 unlabelled).
    """
    x = pl.slab[:, u0 : u0 + su + 2 * h, v0 : v0 + sv + 2 * h]
    y = labels[None, u0 : u0 + su, v0 : v0 + sv]
    return np.moveaxis(x, 0, pl.axis), np.moveaxis(y, 0, pl.axis)


def symmetry(rng: np.random.Generator) -> tuple[tuple[bool, bool, bool], int]:
    """A random flip on every axis and a 90-degree rotation count about z (the tomographic axis)."""
    flips = (bool(rng.random() < 0.5), bool(rng.random() < 0.5), bool(rng.random() < 0.5))
    return flips, int(rng.integers(4))


def apply_symmetry(a: np.ndarray[Any, Any], g: tuple[tuple[bool, bool, bool], int], *, lead: int = 0) -> np.ndarray[
        Any, Any]:
    """Apply ``g`` to the last three axes of ``a`` (``lead`` leading axes are left alone)."""
    flips, k = g
    for axis, f in enumerate(flips):
        if f:
            a = np.flip(a, lead + axis)
    if k:
        a = np.rot90(a, k, axes=(lead + 1, lead + 2))
    return a


def intensity(x: np.ndarray[Any, Any], offset: float, scale: float, rng: np.random.Generator) -> np.ndarray[Any, Any]:
    """Normalise raw ``x`` (bundle affine) and jitter it: scale, offset and Gaussian noise. float32."""
    x = apply_affine(np.ascontiguousarray(x), offset, scale)
    x *= np.float32(1.0 + rng.uniform(-AUG_SCALE, AUG_SCALE))
    x += np.float32(rng.uniform(-AUG_OFFSET, AUG_OFFSET))
    sigma = rng.uniform(0.0, AUG_NOISE)
    x += rng.normal(0.0, sigma, size=x.shape).astype(np.float32)
    return x


def augment(x: np.ndarray[Any, Any], y: np.ndarray[Any, Any], offset: float, scale: float,
            rng: np.random.Generator) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """The same random symmetry for input and labels, then intensity jitter of the input."""
    g = symmetry(rng)
    return intensity(apply_symmetry(x, g), offset, scale, rng), np.ascontiguousarray(apply_symmetry(y, g))
