"""Synthetic scribbles: a few short strokes per class on a few slices, drawn from a dense truth.

People do not annotate whole slices; they draw a few strokes per class on a few slices (ilastik,
InSegt, napari-convpaint all work that way). :func:`make_scribbles` imitates that: on each chosen
slice and for each class, ``strokes`` random walks of ``length`` steps with a slowly turning
direction, ``width`` pixels wide, drawn only where the class's mask eroded by ``margin`` pixels
holds (inside the class, off its boundaries, as a careful annotator draws). A walk that would
leave the eroded mask turns; one that cannot continue stops early.

With the defaults (10 strokes of 5 steps, width 1, margin 1) on 3 z-slices of a 128^3 phantom
(:func:`pipeline.testing.phantom.make_phantom`) a class gets 40-60 labelled voxels per slice:
~300-500 labelled voxels in all (thin classes such as small pores get fewer when their eroded
mask is small).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from pipeline.core.errors import InputError


def slice_indices(n: int, n_slices: int) -> np.ndarray:
    """Evenly spread distinct slice indices ``floor((i + 0.5) * n / n_slices)`` (as make_annotations)."""
    return ((np.arange(int(n_slices)) + 0.5) * n / n_slices).astype(np.intp)


def make_scribbles(
    labels: np.ndarray,
    n_slices: int = 3,
    *,
    axis: int = 0,
    strokes: int = 10,
    length: int = 5,
    width: int = 1,
    margin: int = 1,
    seed: int = 0,
    indices: Sequence[int] | None = None,
) -> np.ndarray:
    """Scribble annotations of ``labels`` on ``n_slices`` evenly spread slices (or ``indices``).

    Parameters
    ----------
    labels : numpy.ndarray
        ``(Z, Y, X)`` dense integer truth, values ``1..K`` (0, if present, is never scribbled).
    n_slices : int
        Number of annotated slices across ``axis`` (ignored when ``indices`` is given).
    axis : int
        Axis the slices are taken across.
    strokes : int
        Strokes per class and slice (``>= 1``).
    length : int
        Steps of each random walk (``>= 1``); a stroke covers about ``length * width`` pixels.
    width : int
        Stroke width in pixels (``>= 1``): the walk is dilated by a ``width`` square.
    margin : int
        Erosion (pixels, ``>= 0``) of each class mask before drawing: strokes stay this far
        inside their class. A class whose eroded mask is empty on a slice falls back to its
        unreduced mask there.
    seed : int
        Seed of the strokes.

    Returns
    -------
    numpy.ndarray
        uint8, same shape as ``labels``: the class on scribbled voxels, 0 elsewhere.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"make_scribbles: labels must be a 3D integer array, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise InputError("make_scribbles: label values must lie in 0..255 to fit uint8")
    if not -3 <= axis < 3:
        raise InputError(f"make_scribbles: axis {axis} out of range for a 3D volume")
    for name, value, low in (("strokes", strokes, 1), ("length", length, 1), ("width", width, 1),
                             ("margin", margin, 0)):
        if isinstance(value, bool) or int(value) != value or value < low:
            raise InputError(f"make_scribbles: {name} must be an integer >= {low}, got {value!r}")
    moved = np.moveaxis(labels, axis, 0)
    n = moved.shape[0]
    if indices is None:
        if isinstance(n_slices, bool) or int(n_slices) != n_slices or not 1 <= n_slices <= n:
            raise InputError(f"make_scribbles: n_slices must be an integer in [1, {n}], got {n_slices!r}")
        chosen = slice_indices(n, n_slices)
    else:
        chosen = np.asarray([int(i) for i in indices], dtype=np.intp)
        if chosen.size == 0 or chosen.min() < 0 or chosen.max() >= n:
            raise InputError(f"make_scribbles: indices {list(chosen)} must lie in [0, {n - 1}]")
    rng = np.random.default_rng(seed)
    out = np.zeros(moved.shape, dtype=np.uint8)
    pen = np.ones((int(width), int(width)), dtype=bool)
    for i in chosen:
        plane = moved[i]
        for c in (int(v) for v in np.unique(plane) if v > 0):
            mask = plane == c
            inner = ndimage.binary_erosion(mask, iterations=int(margin)) if margin else mask
            allowed = inner if inner.any() else mask
            path = np.zeros(plane.shape, dtype=bool)
            for _ in range(int(strokes)):
                path |= _walk(allowed, int(length), rng)
            drawn = ndimage.binary_dilation(path, structure=pen) & allowed if width > 1 else path
            out[i][drawn & (out[i] == 0)] = c
    return np.moveaxis(out, 0, axis)


def _walk(allowed: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """One random walk inside ``allowed`` (2D bool): ``length`` unit steps, heading turning slowly."""
    pts = np.argwhere(allowed)
    path = np.zeros(allowed.shape, dtype=bool)
    y, x = (float(v) for v in pts[int(rng.integers(len(pts)))])
    path[int(y), int(x)] = True
    heading = rng.uniform(0.0, 2.0 * math.pi)
    for _ in range(length - 1):
        for _attempt in range(8):
            ny, nx = y + math.sin(heading), x + math.cos(heading)
            iy, ix = int(round(ny)), int(round(nx))
            if 0 <= iy < allowed.shape[0] and 0 <= ix < allowed.shape[1] and allowed[iy, ix]:
                y, x = ny, nx
                path[iy, ix] = True
                heading += rng.normal(0.0, 0.3)
                break
            heading += rng.uniform(math.pi / 4, 3 * math.pi / 4) * (1 if rng.random() < 0.5 else -1)
        else:
            break
    return path
