"""Readers for label volumes made by other tools: napari Labels layers and ilastik projects.

**napari Labels** saved as a zarr (v2 or v3) array, as an OME-Zarr label group
(``image.zarr/labels/NAME/`` with multiscale levels, the first level is used), as an OME-Zarr
image holding such labels (``image.zarr/`` with ``labels/``: the first listed label image), or as
a TIFF. Leading axes of length 1 (napari's or OME's ``t``/``c``) are dropped, so a
``(1, Z, Y, X)`` layer reads as ``(Z, Y, X)``.

**ilastik pixel-classification projects** (``.ilp``, HDF5). The brush strokes are stored per
input lane as blocks::

    PixelClassification/LabelNames                     class names, label value v -> names[v - 1]
    PixelClassification/LabelSets/labels000/block0000  uint8 block, e.g. shape (1, 40, 60, 1)
        attrs["blockSlice"] = "[0:1,10:50,20:80,0:1]"  where the block lies, one span per axis
    Input Data/infos/lane0000/Raw Data/axistags        JSON {"axes": [{"key": "z"}, ...]} (optional)

Block axes follow the raw data's axis tags (``zyxc`` for a 3D volume, ``tzyxc`` in newer
projects); without tags the last axis is taken as the channel and the three before it as
(z, y, x). Lane 0 is used (the first image of the project).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import InputError

logger = logging.getLogger(__name__)

ILASTIK_SUFFIXES = (".ilp",)
_LABEL_SETS = "PixelClassification/LabelSets"
_LABEL_NAMES = "PixelClassification/LabelNames"
_AXISTAGS = "Input Data/infos/lane{:04d}/Raw Data/axistags"
_SPAN = re.compile(r"(-?\d+)\s*:\s*(-?\d+)")


@dataclass(frozen=True)
class IlastikLabels:
    """The labels of one ilastik lane.

    Attributes:
        points: (N, 3) int32 (z, y, x) coordinates of labelled voxels.
        values: (N,) uint8 label values 1..K.
        names: class names from the project (may be empty).
    """

    points: np.ndarray[Any, np.dtype[np.int32]]
    values: np.ndarray[Any, np.dtype[np.uint8]]
    names: tuple[str, ...]


def read_ilastik(path: Path, shape: tuple[int, int, int], *, lane: int = 0) -> IlastikLabels:
    """Labelled voxels of ``lane`` of an ilastik project for a scan of ``shape`` (Z, Y, X).

    Raises:
        InputError: not HDF5, no labels, blocks outside the scan or of another dimensionality.
    """
    import h5py

    if not path.is_file():
        raise InputError(f"{path}: does not exist; check the path of the ilastik project")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"{path}: is not a readable ilastik project (HDF5: {exc}); save it again in ilastik") from None
    with f:
        names = _names(f)
        group = f.get(f"{_LABEL_SETS}/labels{lane:03d}")
        blocks = [] if not isinstance(group, h5py.Group) else [group[k] for k in sorted(group)]
        blocks = [b for b in blocks if isinstance(b, h5py.Dataset)]
        if not blocks:
            raise InputError(f"{path}: holds no labels (no {_LABEL_SETS}/labels{lane:03d}/block*); draw labels in "
                             "ilastik's Training applet and save the project")
        keys = _axis_keys(f, lane, blocks[0], path)
        pts, vals = [], []
        for block in blocks:
            p, v = _block_voxels(block, keys, shape, path)
            pts.append(p)
            vals.append(v)
    points, values = np.concatenate(pts), np.concatenate(vals)
    if values.size == 0:
        raise InputError(f"{path}: its label blocks are all 0; draw labels in ilastik's Training applet and save")
    return IlastikLabels(points=points, values=values, names=names)


def _names(f: Any) -> tuple[str, ...]:
    data = f.get(_LABEL_NAMES)
    if data is None:
        return ()
    return tuple(v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(data[()]).ravel())


def _axis_keys(f: Any, lane: int, block: Any, path: Path) -> str:
    """The block axes as a string of keys, e.g. ``"zyxc"``."""
    ndim = len(block.shape)
    tags = f.get(_AXISTAGS.format(lane))
    if tags is not None:
        raw = tags[()]
        try:
            keys = "".join(a["key"] for a in json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))["axes"])
        except (ValueError, KeyError, TypeError):
            keys = ""
        if len(keys) == ndim and set("zyx") <= set(keys):
            return keys
    if ndim < 4:
        raise InputError(f"{path}: labels are {ndim - 1}D (block shape {tuple(block.shape)}); "
                         "label a 3D volume in ilastik (z, y, x)")
    return "t" * (ndim - 4) + "zyxc"


def _block_voxels(block: Any, keys: str, shape: tuple[int, int, int], path: Path) -> tuple[
        np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    raw = block.attrs.get("blockSlice")
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    spans = [(int(a), int(b)) for a, b in _SPAN.findall(text)] if raw is not None else []
    if len(spans) != len(keys) or len(block.shape) != len(keys):
        raise InputError(f"{path}: block {block.name} has blockSlice {text!r} that does not match its shape "
                         f"{tuple(block.shape)}; save the project again in ilastik")
    data = np.asarray(block[()])
    if data.dtype.kind not in "biu":
        raise InputError(f"{path}: block {block.name} has type {data.dtype}; ilastik labels are integers 1..K")
    # drop non-spatial axes (channel, time): take index 0 of each
    for axis in reversed(range(len(keys))):
        if keys[axis] not in "zyx":
            data = data.take(0, axis=axis)
    order = [k for k in keys if k in "zyx"]
    data = np.transpose(data, [order.index(a) for a in "zyx"])
    start = [spans[keys.index(a)][0] for a in "zyx"]
    stop = [spans[keys.index(a)][1] for a in "zyx"]
    if any(s < 0 for s in start) or any(e > n for e, n in zip(stop, shape, strict=True)):
        span = ", ".join(f"{a}:{b}" for a, b in zip(start, stop, strict=True))
        raise InputError(f"{path}: a label block lies at [{span}], outside the scan {shape}; the project labels "
                         "another image, export labels of this scan")
    nz = np.nonzero(data)
    pts = np.stack([nz[0] + start[0], nz[1] + start[1], nz[2] + start[2]], axis=1).astype(np.int32)
    values = data[nz]
    if values.size and int(values.max()) > 255:
        raise InputError(f"{path}: label value {int(values.max())} is above 255; use at most 255 classes")
    return pts, values.astype(np.uint8)


# --------------------------------------------------------------------------- napari / zarr


class LeadingSqueezed:
    """A read-only view of an array without its leading length-1 axes (lazy for zarr arrays)."""

    def __init__(self, array: Any, drop: int) -> None:
        self._array = array
        self._drop = drop
        self.shape = tuple(int(s) for s in array.shape[drop:])
        self.dtype = array.dtype

    def __getitem__(self, key: Any) -> np.ndarray[Any, Any]:
        key = key if isinstance(key, tuple) else (key,)
        return np.asarray(self._array[(0,) * self._drop + key])


def squeeze_leading(array: Any) -> Any:
    """Drop leading axes of length 1 beyond three (``(1, 1, Z, Y, X)`` -> ``(Z, Y, X)``)."""
    drop = 0
    while len(array.shape) - drop > 3 and int(array.shape[drop]) == 1:
        drop += 1
    return array if drop == 0 else LeadingSqueezed(array, drop)


def open_zarr_labels(path: Path) -> Any:
    """A zarr label array from a zarr array, an OME-Zarr label group or an image with ``labels/``."""
    import zarr

    try:
        node: Any = zarr.open(str(path), mode="r")
        for _ in range(3):  # image -> labels -> label image -> level
            if isinstance(node, zarr.Array):
                return squeeze_leading(node)
            node = node[_child(node, path)]
    except (KeyError, FileNotFoundError, ValueError, TypeError) as exc:
        raise InputError(f"{path}: is not a zarr label array or OME-Zarr labels ({exc}); check the path") from None
    if isinstance(node, zarr.Array):
        return squeeze_leading(node)
    raise InputError(f"{path}: no label array found in this zarr group; give the labels array or label group")


def _child(group: Any, path: Path) -> str:
    """Which member of a zarr group leads to the labels."""
    attrs = dict(group.attrs)
    ome = attrs.get("ome", attrs)
    if isinstance(ome.get("labels"), list) and ome["labels"]:  # the 'labels' group of an image
        return str(ome["labels"][0])
    members = set(group.keys())
    if "labels" in members and "image-label" not in ome:  # an image with labels: prefer the labels
        return "labels"
    try:
        return str(ome["multiscales"][0]["datasets"][0]["path"])
    except (KeyError, IndexError, TypeError):
        pass
    if "0" in members:
        return "0"
    raise KeyError(f"no array among {sorted(members)}")
