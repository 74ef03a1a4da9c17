"""Validation that never starves training: hold out whole strokes, a capped share per class.

Annotations are strokes: clustered voxels, several per class. Holding out whole tiles of the
plane (the former rule) could take most of a class's labels when a few tiles hold most strokes
(33 % of the pixels of a real scribbled slice, 74 % of a class). Here the unit held out is a
*stroke*, a connected component (8-connected in its plane) of one class's labels:

* per class, strokes are drawn in random order and held out while the held-out voxels stay
  within ``fraction`` (at most :data:`MAX_FRACTION`) of that class's labelled voxels;
* a class with fewer than :data:`MIN_STROKES` strokes gives none (it keeps all its labels);
* every class keeps most of its labels for training.

Full annotated slices are one big component per class region, which the cap rules out when a
class is one region; they are cut into ``tile``-voxel squares first, so a dense slice is split
like before (by tiles) but within the same per-class cap.

Held-out voxels are separated from training voxels by whole strokes, so the validation score is
not inflated by neighbours of training voxels inside the same stroke.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from pipeline.core.metrics import scores
from pipeline.train.sampling import Plane

MAX_FRACTION = 0.2
MIN_STROKES = 3
TILE = 32  # strokes are cut into tiles of this edge, so a full slice splits into pieces


def strokes(labels: np.ndarray[Any, Any], c: int, tile: int = TILE) -> tuple[np.ndarray[Any, Any], int]:
    """Connected components of class ``c`` in a (A, B) class-index map, cut by ``tile`` squares.

    Returns ``(ids, n)``: int32 (A, B) stroke ids 1..n (0 elsewhere) and their number.
    """
    mask = labels == c
    comp, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return comp.astype(np.int32), 0
    a, b = labels.shape
    cell = (np.arange(a)[:, None] // tile) * ((b + tile - 1) // tile) + np.arange(b)[None, :] // tile
    key = np.where(mask, comp.astype(np.int64) * (cell.max() + 1) + cell, -1)
    uniq, inverse = np.unique(key[mask], return_inverse=True)
    ids = np.zeros(labels.shape, dtype=np.int32)
    ids[mask] = inverse.astype(np.int32) + 1
    return ids, len(uniq)


def split_strokes(planes: list[Plane], fraction: float, rng: np.random.Generator, k: int, size: int) -> dict[
        str, Any]:
    """Move whole strokes of each class to validation, up to ``fraction`` of that class's voxels.

    Mutates ``planes`` (``train``/``val``/``val_windows``). Returns a summary: ``held`` and
    ``labelled`` voxels per class index, ``strokes`` and ``held_strokes`` per class.
    """
    cap = min(float(fraction), MAX_FRACTION)
    summary: dict[str, Any] = {"held": [0] * k, "labelled": [0] * k, "strokes": [0] * k, "held_strokes": [0] * k}
    if cap <= 0:
        summary["labelled"] = [int(sum(int((pl.train == c).sum()) for pl in planes)) for c in range(k)]
        return summary
    for c in range(k):
        units: list[tuple[int, np.ndarray[Any, Any]]] = []
        for i, pl in enumerate(planes):
            ids, n = strokes(pl.train, c)
            if n:
                flat = ids.ravel()
                order = np.argsort(flat, kind="stable")
                bounds = np.searchsorted(flat[order], np.arange(1, n + 2))
                units += [(i, order[bounds[j] : bounds[j + 1]]) for j in range(n)]
        total = int(sum(len(u[1]) for u in units))
        summary["labelled"][c], summary["strokes"][c] = total, len(units)
        if len(units) < MIN_STROKES:
            continue
        held = 0
        for j in rng.permutation(len(units)):
            i, where = units[int(j)]
            if held + len(where) > cap * total:
                continue
            pl = planes[i]
            flat_train, flat_val = pl.train.reshape(-1), pl.val.reshape(-1)
            flat_val[where] = c
            flat_train[where] = -1
            held += len(where)
            summary["held_strokes"][c] += 1
        summary["held"][c] = held
    for pl in planes:
        pl.val_windows = windows(pl.val, size)
    return summary


def windows(val: np.ndarray[Any, Any], size: int) -> list[tuple[int, int, int, int]]:
    """(u0, v0, su, sv) output windows of edge <= ``size`` tiling ``val`` where it holds labels."""
    out = []
    a, b = val.shape
    for u in range(0, a, size):
        for v in range(0, b, size):
            if (val[u : u + size, v : v + size] >= 0).any():
                out.append((u, v, min(size, a - u), min(size, b - v)))
    return out


def val_scores(confusion: np.ndarray[Any, Any], names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class IoU (None where the class is absent from validation) and their mean."""
    summary = scores(confusion, names)
    iou = {c["name"]: (c["iou"] if c["support"] else None) for c in summary["per_class"]}
    present = [v for v in iou.values() if v is not None]
    return {
        "val_accuracy": summary["accuracy"] or 0.0,
        "val_mean_iou": float(np.mean(present)) if present else 0.0,
        "val_iou": iou,
        "val_voxels": summary["voxels"],
    }
