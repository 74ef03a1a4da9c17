"""The annotations of one scan: a sparse, chunked label image beside it.

Layout (OME-Zarr 0.5 label image on zarr v3)::

    SCAN.annotations.zarr/          beside SCAN.zarr
      0/          (Z, Y, X) uint8, chunks 64^3: 0 = unlabelled, 1..K = classes
      zarr.json   attributes {"ome": {multiscales}, "studios": {kind: "annotations",
                  classes: [names], colors: ["#rrggbb", ...], scan: path, complete: true}}

The napari Labels layer paints straight into ``0/``: zarr writes only the chunks a stroke
touches, and a chunk that stays all 0 is never stored, so a 2048^3 scan with three painted
slices stores a few hundred small files. ``studios train SCAN.zarr SCAN.annotations.zarr MODEL``
reads it as a label volume (level ``0``; see :mod:`pipeline.train.annotations`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zarr

from pipeline.core.errors import ConfigError, InputError
from pipeline.io.store import create_array, create_group, multiscales, open_image, set_studios_attrs

CHUNKS = (64, 64, 64)
SUFFIX = ".annotations.zarr"
#: tab10: distinct on a grey tomogram; class k gets ``PALETTE[(k - 1) % 10]``
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
_HEX = re.compile(r"#[0-9a-fA-F]{6}")


def studios_attrs(group: zarr.Group) -> dict[str, Any]:
    """``attributes["studios"]`` of a group as a plain dict (empty if absent)."""
    value = dict(group.attrs.asdict()).get("studios")
    return dict(value) if isinstance(value, dict) else {}


def default_colors(n: int) -> tuple[str, ...]:
    """``n`` class colours (``#rrggbb``) from :data:`PALETTE`."""
    return tuple(PALETTE[k % len(PALETTE)] for k in range(n))


def check_classes(names: Sequence[str], colors: Sequence[str] | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Validated (names, colours); colours default to :func:`default_colors`."""
    names = tuple(str(n).strip() for n in names)
    if len(names) < 1 or any(not n for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"class names {list(names)} must be non-empty and distinct, e.g. --classes void cement")
    if len(names) > 255:
        raise ConfigError(f"{len(names)} classes given; at most 255 fit in uint8 labels")
    cols = tuple(colors) if colors is not None else default_colors(len(names))
    if len(cols) != len(names) or not all(_HEX.fullmatch(c) for c in cols):
        raise ConfigError(f"class colours {list(cols)} must be one '#rrggbb' per class")
    return names, cols


def annotations_path(scan: str | os.PathLike[str]) -> Path:
    """``a/b/scan.zarr`` -> ``a/b/scan.annotations.zarr``."""
    scan = Path(scan)
    stem = scan.name[: -len(".zarr")] if scan.name.endswith(".zarr") else scan.name
    return scan.with_name(stem + SUFFIX)


@dataclass(frozen=True)
class AnnotationStore:
    """An opened annotations image.

    Attributes:
        path: the ``.annotations.zarr`` folder.
        array: level 0, (Z, Y, X) uint8, writable; paint into it directly.
        classes: names of labels 1..K.
        colors: ``#rrggbb`` of labels 1..K.
    """

    path: Path
    array: zarr.Array
    classes: tuple[str, ...]
    colors: tuple[str, ...]

    def with_classes(self, names: Sequence[str], colors: Sequence[str]) -> AnnotationStore:
        """Record new class names/colours in the attributes; returns the updated store."""
        names_t, cols_t = check_classes(names, colors)
        group = zarr.open_group(str(self.path), mode="r+")
        set_studios_attrs(group, classes=list(names_t), colors=list(cols_t))
        return AnnotationStore(self.path, self.array, names_t, cols_t)

    def stored_chunks(self) -> list[str]:
        """Keys of the chunks written so far (e.g. ``"c/0/1/0"``), sorted."""
        root = self.path / "0" / "c"
        if not root.is_dir():
            return []
        return sorted(str(p.relative_to(self.path / "0")).replace(os.sep, "/") for p in root.rglob("*") if p.is_file())


def open_annotations(
    scan: str | os.PathLike[str],
    *,
    classes: Sequence[str] | None = None,
    colors: Sequence[str] | None = None,
    path: str | os.PathLike[str] | None = None,
) -> AnnotationStore:
    """Open the annotations of ``scan``, creating an empty image on first use.

    Args:
        scan: an ingested scan (its shape and voxel size are used).
        classes, colors: names/colours of labels 1..K. For a new store they default to
            ``class1``, ``class2``; for an existing one, when given, they replace the stored ones.
        path: default :func:`annotations_path` of ``scan``.

    Raises:
        InputError: the scan is unusable, or the annotations exist with another shape.
    """
    image = open_image(scan, kind="scan")
    target = Path(path) if path is not None else annotations_path(scan)
    shape = tuple(int(s) for s in image.shape)
    if (target / "zarr.json").exists():
        try:
            group = zarr.open_group(str(target), mode="r+")
            array = group["0"]
        except (KeyError, ValueError, FileNotFoundError) as exc:
            raise InputError(f"{target}: is not an annotations image ({exc}); move it away to start afresh") from None
        attrs: dict[str, Any] = studios_attrs(group)
        if not isinstance(array, zarr.Array) or tuple(array.shape) != shape:
            raise InputError(f"{target}: annotations have shape {getattr(array, 'shape', '?')} but the scan is "
                             f"{shape}; move the annotations away or open the scan they belong to")
        stored = tuple(attrs.get("classes") or ())
        names, cols = check_classes(classes or stored or ("class1", "class2"),
                                    colors if colors is not None else
                                    (attrs.get("colors") if not classes or tuple(classes) == stored else None))
        store = AnnotationStore(target, array, names, cols)
        if (names, cols) != (stored, tuple(attrs.get("colors") or ())):
            store = store.with_classes(names, cols)
        return store
    names, cols = check_classes(classes or ("class1", "class2"), colors)
    group = create_group(target)
    array = create_array(group, "0", shape=shape, dtype="uint8", chunks=CHUNKS)
    group.attrs["ome"] = {"version": "0.5", "multiscales": [
        multiscales(1, voxel_size=image.voxel_size, name=target.name)]}
    set_studios_attrs(group, kind="annotations", classes=list(names), colors=list(cols),
                      scan=str(Path(scan).resolve()), complete=True)
    return AnnotationStore(target, array, names, cols)
