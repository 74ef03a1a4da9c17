"""Sparse annotations: load, validate, and hold them as labelled planes.

Label convention: 0 = unlabelled, 1..K = classes. Users give annotations in one of three forms:

1. **A label volume of the scan's shape** (``.npy``, ``.tif``/``.tiff`` 3D, a zarr v2/v3 array,
   a studios/OME-Zarr image whose first level is used, a napari Labels layer saved as zarr or
   TIFF, an OME-Zarr label group, or an ilastik project ``.ilp`` whose brush strokes and class
   names are read, see :mod:`pipeline.train.label_formats`), mostly 0, with a few labelled
   slices along any axis, or scribbles. It is read slab by slab; only labelled voxels are kept.
2. **2D slice images**, each with its axis and index: palette (indexed) or greyscale PNG/TIFF
   whose pixel values are the class numbers (palette *indices*, not colours). On the command
   line: ``--slice AXIS:INDEX:FILE`` (repeatable), e.g. ``--slice z:64:labels_z64.png``; AXIS is
   ``z``, ``y`` or ``x`` (or 0, 1, 2) and INDEX is the slice number along it, counted from 0.
   A slice along z has the scan's (Y, X) shape, along y (Z, X), along x (Z, Y).
3. **A YAML listing** of slice images (paths relative to the YAML file)::

       slices:
         - {axis: z, index: 21, file: z021.png}
         - {axis: z, index: 64, file: z064.png}
         - {axis: y, index: 100, file: y100.tif}

Whatever the form, the result is an :class:`Annotations`: the labelled voxels grouped into
axis-aligned planes (:class:`LabelledPlane`, one 2D uint8 array each), never a dense 3D float
volume. A label volume is split into planes greedily (the plane holding the most still
unassigned labelled voxels first, along any axis), so slice annotations along any axis become
exactly those slices and scribbles become few planes.

Validation (errors are :class:`~pipeline.core.errors.InputError` naming the file and the fix):
shape mismatch with the scan, slice index out of range, colour images, float labels that are not
whole numbers, labels outside 1..K (negative, above 255, or above the number of class names
given), no labelled voxel at all, fewer than two classes labelled. A class in 1..K without any
example is a warning (logged) and is recorded in :attr:`Annotations.missing`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import ConfigError, InputError
from pipeline.core.geometry import AXES
from pipeline.io.sources import TIFF_SUFFIXES
from pipeline.train.label_formats import ILASTIK_SUFFIXES, open_zarr_labels, read_ilastik, squeeze_leading

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".bmp", ".gif", ".pgm", ".ppm", ".pnm")
YAML_SUFFIXES = (".yaml", ".yml")
MAX_LABEL = 255
MAX_LABELLED = 1 << 28  # labelled voxels accepted (about 64 slices of 2048^2)
_GREEDY_PLANES = 256  # greedy plane picks before the rest falls back to one axis
_SLAB_VOXELS = 1 << 24  # voxels read at once from a label volume


@dataclass(frozen=True, eq=False)
class LabelledPlane:
    """One axis-aligned plane holding labelled voxels.

    Attributes:
        axis: 0 (z), 1 (y) or 2 (x): the plane is ``volume.take(index, axis)``.
        index: position of the plane along ``axis``.
        labels: 2D uint8, the plane's shape (the volume shape without ``axis``); 0 = unlabelled.
    """

    axis: int
    index: int
    labels: np.ndarray[Any, np.dtype[np.uint8]] = field(repr=False)

    @property
    def count(self) -> int:
        return int(np.count_nonzero(self.labels))

    def __repr__(self) -> str:
        return f"LabelledPlane({AXES[self.axis]}={self.index}, {self.count} labelled)"


@dataclass(frozen=True, eq=False)
class Annotations:
    """Validated sparse annotations of one scan.

    Attributes:
        shape: (Z, Y, X) of the scan they annotate.
        planes: the labelled voxels, grouped into planes (each voxel in exactly one plane).
        n_classes: K; labels are 1..K.
        counts: labelled voxels per class, ``counts[k - 1]`` for class k.
        source: where they came from (for provenance), e.g. a path or ``"z:64:a.png, ..."``.
        names: class names carried by the annotations (ilastik projects), else ``()``.
    """

    shape: tuple[int, int, int]
    planes: tuple[LabelledPlane, ...]
    n_classes: int
    counts: tuple[int, ...]
    source: str
    names: tuple[str, ...] = ()

    @property
    def missing(self) -> tuple[int, ...]:
        """Classes in 1..K without any labelled voxel."""
        return tuple(k + 1 for k, n in enumerate(self.counts) if n == 0)

    @property
    def total(self) -> int:
        return int(sum(self.counts))

    def to_json(self) -> dict[str, Any]:
        """Provenance summary (no voxel data)."""
        return {
            "source": self.source,
            "classes": self.n_classes,
            "counts": list(self.counts),
            "missing_classes": list(self.missing),
            "planes": [f"{AXES[p.axis]}:{p.index}" for p in self.planes],
            **({"names": list(self.names)} if self.names else {}),
        }


@dataclass(frozen=True)
class SliceSpec:
    """A 2D label image for one slice: ``axis`` 0/1/2 (z/y/x), ``index`` along it, ``path``."""

    axis: int
    index: int
    path: Path

    def __str__(self) -> str:
        return f"{AXES[self.axis]}:{self.index}:{self.path}"


def parse_axis(value: Any, where: str) -> int:
    text = str(value).strip().lower()
    if text in AXES:
        return AXES.index(text)
    if text in ("0", "1", "2"):
        return int(text)
    raise ConfigError(f"{where}: axis {value!r} is unknown; use z, y or x (or 0, 1, 2), e.g. z:64:labels.png")


def parse_slice_spec(text: str, *, base: Path | None = None) -> SliceSpec:
    """``"AXIS:INDEX:FILE"`` (e.g. ``"z:64:labels64.png"``) -> :class:`SliceSpec`."""
    match = re.fullmatch(r"\s*([^:]+):\s*(-?\d+)\s*:(.+)", text)
    if match is None:
        raise ConfigError(f"slice {text!r}: is malformed; write AXIS:INDEX:FILE, e.g. z:64:labels_z64.png")
    axis = parse_axis(match.group(1), f"slice {text!r}")
    path = Path(match.group(3).strip())
    if base is not None and not path.is_absolute():
        path = base / path
    return SliceSpec(axis=axis, index=int(match.group(2)), path=path)


def read_slice_listing(path: Path) -> list[SliceSpec]:
    """Parse a YAML listing ``slices: [{axis, index, file}, ...]`` (paths relative to it)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: is not readable YAML ({str(exc).splitlines()[0]}); fix the listing") from None
    items = data.get("slices") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{path}: has no 'slices:' list; list {{axis, index, file}} entries under 'slices:'")
    specs = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not {"axis", "index", "file"} <= set(item):
            raise ConfigError(
                f"{path}: slices[{i}] lacks a key; give axis, index and file, e.g. {{axis: z, index: 64, file: a.png}}"
            )
        try:
            index = int(item["index"])
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: slices[{i}].index {item['index']!r} is not an integer; fix the index") from None
        file = Path(str(item["file"]))
        specs.append(
            SliceSpec(axis=parse_axis(item["axis"], f"{path}: slices[{i}]"), index=index,
                      path=file if file.is_absolute() else path.parent / file)
        )
    return specs


# --------------------------------------------------------------------------- loading


def load_annotations(
    source: str | os.PathLike[str] | None,
    shape: Sequence[int],
    *,
    slices: Iterable[SliceSpec | str] = (),
    classes: int | None = None,
) -> Annotations:
    """Load and validate annotations for a scan of ``shape`` (Z, Y, X).

    Args:
        source: a label volume (``.npy``, 3D ``.tif``, ``.zarr``), a YAML slice listing, or
            ``None`` when only ``slices`` are given.
        slices: further slice images (:class:`SliceSpec` or ``"AXIS:INDEX:FILE"`` strings).
        classes: K if known (e.g. from class names); default: the largest label present.

    Raises:
        InputError: unreadable or invalid annotations (the message names the file).
    """
    if len(shape) != 3:
        raise InputError(f"scan shape {tuple(shape)} is not (z, y, x); ingest a 3D scan")
    shape3 = (int(shape[0]), int(shape[1]), int(shape[2]))
    extra = [s if isinstance(s, SliceSpec) else parse_slice_spec(s) for s in slices]
    specs: list[SliceSpec] = []
    coords: list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]] = []
    names: list[str] = []
    class_names: tuple[str, ...] = ()
    if source is not None:
        path = Path(source)
        names.append(str(path))
        if path.suffix.lower() in ILASTIK_SUFFIXES:
            ilp = read_ilastik(path, shape3)
            coords.append((ilp.points, ilp.values))
            class_names = ilp.names
            if classes is None and class_names:
                classes = len(class_names)
        elif path.suffix.lower() in YAML_SUFFIXES:
            if not path.is_file():
                raise InputError(f"{path}: does not exist; check the path of the annotation listing")
            specs = read_slice_listing(path)
        else:
            coords.append(_volume_voxels(path, shape3))
    names.extend(str(s) for s in extra)
    specs.extend(extra)
    if not specs and not coords:
        raise ConfigError("no annotations given; pass a label volume, a YAML slice listing or --slice AXIS:INDEX:FILE")
    for spec in specs:
        coords.append(_slice_voxels(spec, shape3))
    return _assemble(coords, shape3, classes=classes, source=", ".join(names), files=names, names=class_names)


def from_array(
    labels: np.ndarray[Any, Any], *, classes: int | None = None, source: str = "<array>"
) -> Annotations:
    """Annotations from an in-memory (Z, Y, X) label volume (notebooks, tests, phantoms)."""
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise InputError(f"{source}: label array has shape {labels.shape}; a (z, y, x) volume is needed")
    shape = (int(labels.shape[0]), int(labels.shape[1]), int(labels.shape[2]))
    return _assemble([_array_voxels(labels, source)], shape, classes=classes, source=source, files=[source])


def _volume_voxels(path: Path, shape: tuple[int, int, int]) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    array = _open_volume(path)
    if tuple(array.shape) != shape:
        raise InputError(
            f"{path}: label volume has shape {tuple(array.shape)} but the scan is {shape}; "
            "annotate the scan you train on (same Z, Y, X), or give 2D slices with --slice"
        )
    return _array_voxels(array, str(path))


def _open_volume(path: Path) -> Any:
    if not path.exists():
        raise InputError(f"{path}: does not exist; check the path of the annotations")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            return squeeze_leading(np.load(path, mmap_mode="r", allow_pickle=False))
        except (ValueError, OSError) as exc:
            raise InputError(f"{path}: is not a readable .npy array ({exc}); save it with numpy.save") from None
    if suffix in TIFF_SUFFIXES:
        import tifffile

        try:
            try:
                return squeeze_leading(tifffile.memmap(path, mode="r"))
            except ValueError:
                return squeeze_leading(tifffile.imread(path))
        except (OSError, ValueError, tifffile.TiffFileError) as exc:
            raise InputError(f"{path}: is not a readable TIFF ({exc}); re-export the labels") from None
    if suffix == ".zarr" or any((path / m).exists() for m in ("zarr.json", ".zarray", ".zgroup")):
        return open_zarr_labels(path)
    if suffix in IMAGE_SUFFIXES:
        raise InputError(f"{path}: a 2D image needs its slice; pass it as --slice AXIS:INDEX:{path}")
    raise InputError(
        f"{path}: annotation format not recognised; give .npy, .tif, .zarr, .ilp, a YAML listing or --slice"
    )


def _array_voxels(array: Any, where: str) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Coordinates (N, 3) int32 and values (N,) uint8 of the non-zero voxels, read slab by slab."""
    if len(array.shape) != 3:
        raise InputError(f"{where}: label volume has shape {tuple(array.shape)}; a (z, y, x) volume is needed")
    _check_dtype(np.dtype(array.dtype), where)
    step = max(1, _SLAB_VOXELS // max(1, int(array.shape[1]) * int(array.shape[2])))
    pts, vals, count = [], [], 0
    for z0 in range(0, int(array.shape[0]), step):
        slab = np.asarray(array[z0 : z0 + step])
        values = _check_values(slab, where)
        nz = np.nonzero(values)
        count += nz[0].size
        if count > MAX_LABELLED:
            raise InputError(
                f"{where}: holds more than {MAX_LABELLED} labelled voxels; training expects sparse annotations, "
                "keep a few labelled slices (0 elsewhere)"
            )
        if nz[0].size:
            pts.append(np.stack([nz[0] + z0, nz[1], nz[2]], axis=1).astype(np.int32))
            vals.append(values[nz])
    if not pts:
        return np.zeros((0, 3), np.int32), np.zeros(0, np.uint8)
    return np.concatenate(pts), np.concatenate(vals)


def _check_dtype(dtype: np.dtype[Any], where: str) -> None:
    if dtype.kind not in "biuf":
        raise InputError(f"{where}: labels have type {dtype}; save them as integers 0..K (0 = unlabelled)")


def _check_values(data: np.ndarray[Any, Any], where: str) -> np.ndarray[Any, Any]:
    """Validate a chunk of labels; returns it as uint8 (whole-number floats accepted)."""
    if data.dtype.kind == "b":
        return data.astype(np.uint8)
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)):
            raise InputError(f"{where}: labels contain NaN or Inf; save them as integers 0..K (0 = unlabelled)")
        rounded = np.rint(data)
        bad = data != rounded
        if bad.any():
            raise InputError(
                f"{where}: labels are floats with non-integer values (e.g. {float(data[bad][0]):g}); "
                "save them as integers 0..K (0 = unlabelled), not probabilities or intensities"
            )
        data = rounded
    if data.size:
        lo, hi = data.min(), data.max()
        if lo < 0 or hi > MAX_LABEL:
            value = lo if lo < 0 else hi
            raise InputError(
                f"{where}: label value {value:g} is outside 1..{MAX_LABEL} (0 = unlabelled); "
                "relabel the classes as 1..K"
            )
    return data.astype(np.uint8, copy=False)


def _slice_voxels(spec: SliceSpec, shape: tuple[int, int, int]) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    n = shape[spec.axis]
    if not 0 <= spec.index < n:
        raise InputError(
            f"{spec.path}: slice index {spec.index} along {AXES[spec.axis]} is outside the scan (0..{n - 1}); "
            "fix the index"
        )
    image = read_label_image(spec.path)
    plane_shape = tuple(s for a, s in enumerate(shape) if a != spec.axis)
    if image.shape != plane_shape:
        raise InputError(
            f"{spec.path}: slice image is {image.shape[0]}x{image.shape[1]} but a {AXES[spec.axis]}-slice of the scan "
            f"is {plane_shape[0]}x{plane_shape[1]}; check the axis or export the slice at full size"
        )
    values = _check_values(image, str(spec.path))
    nz = np.nonzero(values)
    pts = np.zeros((nz[0].size, 3), np.int32)
    other = [a for a in range(3) if a != spec.axis]
    pts[:, spec.axis] = spec.index
    pts[:, other[0]] = nz[0]
    pts[:, other[1]] = nz[1]
    return pts, values[nz]


def read_label_image(path: Path) -> np.ndarray[Any, Any]:
    """A 2D label image: palette indices or grey values (colour images are refused)."""
    if not path.is_file():
        raise InputError(f"{path}: does not exist; check the slice image path")
    suffix = path.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        import tifffile

        try:
            data = np.asarray(tifffile.imread(path))
        except (OSError, ValueError, tifffile.TiffFileError) as exc:
            raise InputError(f"{path}: is not a readable TIFF ({exc}); re-export the slice") from None
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                img.load()
                mode = img.mode
                data = np.asarray(img)
        except (OSError, UnidentifiedImageError) as exc:
            raise InputError(f"{path}: is not a readable image ({exc}); save the slice as PNG or TIFF") from None
        if mode in ("RGBA", "LA") and data.ndim == 3:
            data = data[..., :-1] if np.all(data[..., -1] == data[..., -1].max()) else data
    _check_dtype(data.dtype, str(path))
    if data.ndim == 3 and data.shape[-1] in (1, 2, 3, 4):
        if data.shape[-1] == 1 or all(np.array_equal(data[..., 0], data[..., c]) for c in range(1, data.shape[-1])):
            data = data[..., 0]
        else:
            raise InputError(
                f"{path}: is a colour image; save it as an indexed (palette) or greyscale image whose values "
                "are the class numbers 0..K"
            )
    if data.ndim != 2:
        raise InputError(f"{path}: has shape {data.shape}; a 2D slice image is needed")
    return data


# --------------------------------------------------------------------------- assembly


def _assemble(
    parts: Sequence[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]],
    shape: tuple[int, int, int],
    *,
    classes: int | None,
    source: str,
    files: Sequence[str],
    names: tuple[str, ...] = (),
) -> Annotations:
    points = np.concatenate([p for p, _ in parts]) if parts else np.zeros((0, 3), np.int32)
    values = np.concatenate([v for _, v in parts]) if parts else np.zeros(0, np.uint8)
    where = files[0] if len(files) == 1 else source
    if values.size == 0:
        raise InputError(
            f"{where}: holds no labelled voxel (all 0); label some voxels with classes 1..K (0 means unlabelled)"
        )
    if len(parts) > 1:  # a voxel given twice (overlapping slices): the last value wins
        flat = np.ravel_multi_index(tuple(points.T), shape)
        _, last = np.unique(np.asarray(flat)[::-1], return_index=True)
        keep = np.sort(len(flat) - 1 - last)
        points, values = points[keep], values[keep]
    present = np.unique(values)
    if len(present) < 2:
        raise InputError(
            f"{where}: every labelled voxel is class {int(present[0])}; a segmentation model needs examples of at "
            "least two classes: label some background (or another class) too"
        )
    top = int(values.max())
    if classes is None:
        n_classes = top
    else:
        n_classes = int(classes)
        if top > n_classes:
            raise InputError(
                f"{where}: label value {top} found but only {n_classes} classes are named; "
                f"name {top} classes or relabel the annotations as 1..{n_classes}"
            )
    counts = tuple(int(c) for c in np.bincount(values, minlength=n_classes + 1)[1:])
    planes = _group_planes(points, values, shape)
    ann = Annotations(shape=shape, planes=planes, n_classes=n_classes, counts=counts, source=source, names=names)
    for k in ann.missing:
        logger.warning("%s: class %d has no labelled voxel; the model cannot learn it (label some examples)", where, k)
    return ann


def _group_planes(
    points: np.ndarray[Any, Any], values: np.ndarray[Any, Any], shape: tuple[int, int, int]
) -> tuple[LabelledPlane, ...]:
    """Split labelled voxels into planes, greedily taking the plane with the most of them."""
    remaining = np.ones(len(values), dtype=bool)
    chosen: list[tuple[int, int]] = []
    for _ in range(_GREEDY_PLANES):
        if not remaining.any():
            break
        per_axis = [np.bincount(points[remaining, a], minlength=shape[a]) for a in range(3)]
        axis = max(range(3), key=lambda a: (int(per_axis[a].max()), -a))
        index = int(np.argmax(per_axis[axis]))
        chosen.append((axis, index))
        remaining &= points[:, axis] != index
    if remaining.any():  # scattered rest: the axis needing the fewest planes
        rest = points[remaining]
        axis = min(range(3), key=lambda a: (np.unique(rest[:, a]).size, a))
        chosen.extend((axis, int(i)) for i in np.unique(rest[:, axis]))
    assigned = np.zeros(len(values), dtype=bool)
    planes = []
    for axis, index in chosen:
        sel = ~assigned & (points[:, axis] == index)
        assigned |= sel
        other = [a for a in range(3) if a != axis]
        plane = np.zeros((shape[other[0]], shape[other[1]]), dtype=np.uint8)
        plane[points[sel, other[0]], points[sel, other[1]]] = values[sel]
        planes.append(LabelledPlane(axis=axis, index=index, labels=plane))
    return tuple(sorted(planes, key=lambda p: (p.axis, p.index)))
