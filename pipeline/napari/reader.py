"""npe2 reader: studios scans as multiscale Image layers, segmentations and annotations as Labels.

Nothing is loaded up front: every pyramid level becomes a ``dask.array`` over its zarr array,
so napari reads only the chunks of the slice (and resolution) on screen; a 2048^3 scan opens in
milliseconds. Layer data tuples (``(data, kwargs, layer_type)``) are plain values, so this
module needs no Qt.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import zarr

from pipeline.core.errors import InputError
from pipeline.io.store import open_image
from pipeline.napari.store import default_colors, studios_attrs

LayerData = tuple[Any, dict[str, Any], str]
KINDS = ("scan", "segmentation", "annotations")


def image_kind(path: str | os.PathLike[str]) -> str | None:
    """``attributes["studios"]["kind"]`` of a studios image folder, or None if it is not one."""
    p = Path(path)
    if not (p / "zarr.json").is_file():
        return None
    try:
        kind = studios_attrs(zarr.open_group(str(p), mode="r")).get("kind")
    except (ValueError, FileNotFoundError, KeyError, TypeError):
        return None
    return kind if kind in KINDS else None


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """npe2 ``readers`` command: a reader for studios images, None for anything else."""
    paths = [path] if isinstance(path, str) else list(path)
    if not paths or any(image_kind(p) is None for p in paths):
        return None
    return read_paths


def read_paths(path: str | list[str]) -> list[LayerData]:
    """Layer data of each studios image in ``path``."""
    paths = [path] if isinstance(path, str) else list(path)
    return [read_image(p) for p in paths]


def read_image(path: str | os.PathLike[str]) -> LayerData:
    """One studios image as a layer data tuple (Image for scans, Labels otherwise)."""
    kind = image_kind(path)
    if kind == "scan":
        return scan_layer(path)
    if kind in ("segmentation", "annotations"):
        return labels_layer(path)
    raise InputError(f"{path}: is not a studios scan, segmentation or annotations image; "
                     "open a folder written by 'studios ingest', 'studios segment' or 'studios annotate'")


def pyramid(path: str | os.PathLike[str]) -> list[da.Array]:
    """Levels ``0``, ``1``, ... of an image as lazy dask arrays (largest first)."""
    group = zarr.open_group(str(path), mode="r")
    levels: list[da.Array] = []
    while str(len(levels)) in group:
        node = group[str(len(levels))]
        if not isinstance(node, zarr.Array):
            break
        levels.append(da.from_zarr(node))
    return levels


def scan_layer(path: str | os.PathLike[str]) -> LayerData:
    """A scan as a multiscale Image layer (contrast from the stored 0.5/99.5 percentiles).

    Returns:
        ``(levels, kwargs, "image")``; ``levels[0]`` has the scan's (Z, Y, X) shape and dtype.
    """
    image = open_image(path, kind="scan")
    levels = pyramid(path)
    stats = image.stats
    lo, hi = _contrast(stats)
    kwargs = {
        "name": Path(path).name,
        "multiscale": len(levels) > 1,
        "scale": image.voxel_size,
        "contrast_limits": (lo, hi),
        "metadata": {"studios_kind": "scan", "path": str(Path(path).resolve())},
    }
    return (levels if len(levels) > 1 else levels[0], kwargs, "image")


def _contrast(stats: Any) -> tuple[float, float]:
    """Display range: the 0.5 and 99.5 percentiles (min/max when those are missing or equal)."""
    pct = stats.percentiles
    lo, hi = float(pct.get("0.5", stats.min)), float(pct.get("99.5", stats.max))
    if not hi > lo:
        lo, hi = float(stats.min), max(float(stats.max), float(stats.min) + 1.0)
    return lo, hi


def label_colormap(colors: Sequence[str]) -> dict[int | None, str]:
    """napari direct colormap: label k -> ``colors[k - 1]``; 0 and unknown labels transparent."""
    cmap: dict[int | None, str] = {None: "transparent", 0: "transparent"}
    cmap.update({k + 1: c for k, c in enumerate(colors)})
    return cmap


def labels_layer(path: str | os.PathLike[str]) -> LayerData:
    """A segmentation or annotations image as a Labels layer with class names and colours.

    The class of each label is a layer feature (``features["class"][k]``, shown in the status
    bar under the cursor). Segmentations open all pyramid levels (multiscale, read-only);
    annotations open level 0 as a writable zarr array (painting writes the touched chunks).
    """
    kind = image_kind(path)
    group = zarr.open_group(str(path), mode="r" if kind == "segmentation" else "r+")
    attrs = studios_attrs(group)
    if kind == "segmentation":
        image = open_image(path, kind="segmentation")
        levels: Any = pyramid(path)
        data = levels if len(levels) > 1 else levels[0]
        voxel = image.voxel_size
    else:
        data = group["0"]
        voxel = _voxel_size(group)
    classes = [str(c) for c in attrs.get("classes", [])]
    colors = list(attrs.get("colors") or default_colors(len(classes)))
    kwargs: dict[str, Any] = {
        "name": Path(path).name,
        "scale": voxel,
        "colormap": label_colormap(colors),
        "features": {"class": ["unlabelled", *classes]},
        "metadata": {"studios_kind": kind, "path": str(Path(path).resolve()), "classes": classes, "colors": colors},
    }
    if kind == "segmentation":
        kwargs["multiscale"] = isinstance(data, list)
    return (data, kwargs, "labels")


def _voxel_size(group: zarr.Group) -> tuple[float, float, float]:
    ome: Any = group.attrs.asdict().get("ome")
    try:
        scale = ome["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
        return (float(scale[-3]), float(scale[-2]), float(scale[-1]))
    except (KeyError, IndexError, TypeError):
        return (1.0, 1.0, 1.0)
