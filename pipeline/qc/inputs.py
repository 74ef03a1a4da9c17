"""QC inputs: the segmentation and its ledger, the scan, stored probabilities, ground truth, options."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.core.errors import InputError, LedgerMismatchError
from pipeline.core.geometry import Box
from pipeline.io.store import Image, open_image
from pipeline.segment.ledger import Ledger


def open_segmentation(seg: str | os.PathLike[str]) -> tuple[Image, zarr.Group, Ledger]:
    image = open_image(seg, kind="segmentation", require_complete=False)
    classes = image.attrs.get("classes")
    if not isinstance(classes, list) or not classes or image.array.ndim != 3 or image.array.dtype != np.uint8:
        raise InputError(f"{image.path}: is not a studios segmentation (uint8 (z, y, x) labels with class names); "
                         "make one with 'studios segment'")
    group = zarr.open_group(str(image.path), mode="r")
    try:
        ledger = Ledger(group)
        ledger.check_layout()
    except (KeyError, AssertionError, TypeError):
        raise InputError(f"{image.path}: has no block ledger; make it with 'studios segment'") from None
    except LedgerMismatchError as exc:
        raise InputError(str(exc)) from None
    if ledger.classes != len(classes):
        raise InputError(f"{image.path}: the ledger holds {ledger.classes} classes but the output names "
                         f"{len(classes)}; the output is damaged, segment again with --overwrite")
    return image, group, ledger


def resolve_scan(scan: Any, manifest: Mapping[str, Any], shape: tuple[int, ...], notes: list[str]) -> Image | None:
    if scan is not None:
        image = open_image(scan, kind="scan")
    else:
        recorded = manifest.get("scan")
        if not recorded:
            notes.append("no scan given or recorded: intensity histograms, slice views and the seam check are skipped")
            return None
        try:
            image = open_image(recorded, kind="scan")
        except InputError as exc:
            notes.append(f"the segmented scan is not available ({exc}); pass --scan for intensity histograms, "
                         "slice views and the seam check")
            return None
    if image.shape != shape:
        raise InputError(f"{image.path}: scan shape {image.shape} differs from the segmentation {shape}; "
                         "give the scan that was segmented")
    return image


def stored_probabilities(group: zarr.Group, k: int, shape: tuple[int, ...]) -> zarr.Array | None:
    try:
        arr = group["probabilities/0"]
    except KeyError:
        return None
    if isinstance(arr, zarr.Array) and tuple(arr.shape) == (k, *shape):
        return arr
    return None


class TruthReader:
    """Dense truth labels read box by box (zarr / studios image / .npy directly; TIFF/HDF5 by z-slab)."""

    def __init__(self, path: str | os.PathLike[str], shape: tuple[int, ...], classes: int) -> None:
        self.path = Path(path)
        self.classes = classes
        self._slab: tuple[int, int, np.ndarray[Any, Any]] | None = None
        self._source: Any = None
        self._array: Any = None
        if not self.path.exists():
            raise InputError(f"{self.path}: truth does not exist; check the path")
        if self.path.suffix.lower() == ".npy":
            try:
                self._array = np.load(self.path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as exc:
                raise InputError(f"{self.path}: truth is not a readable .npy array ({exc})") from None
        elif self.path.is_dir() and ((self.path / "zarr.json").exists() or self.path.suffix.lower() == ".zarr"):
            try:
                node = zarr.open(str(self.path), mode="r")
                self._array = node["0"] if isinstance(node, zarr.Group) else node
            except (KeyError, FileNotFoundError, ValueError, TypeError) as exc:
                raise InputError(f"{self.path}: truth is not a zarr array or studios image ({exc})") from None
        else:
            from pipeline.io.sources import open_source

            self._source = open_source(self.path)
        found = tuple(int(s) for s in (self._array if self._array is not None else self._source).shape)
        dtype = np.dtype((self._array if self._array is not None else self._source).dtype)
        if found != tuple(shape):
            raise InputError(f"{self.path}: truth shape {found} differs from the segmentation {tuple(shape)}; "
                             "give labels for the same volume")
        if dtype.kind not in "uib":
            raise InputError(f"{self.path}: truth has voxel type {dtype}; integer labels (0 = ignore, 1..K) are needed")

    def read(self, box: Box) -> np.ndarray[Any, Any]:
        if self._array is not None:
            data = np.asarray(self._array[box.to_slices()])
        else:
            z0, z1 = box.offset[0], box.end[0]
            if self._slab is None or self._slab[:2] != (z0, z1):
                self._slab = (z0, z1, np.asarray(self._source.read(z0, z1)))
            data = self._slab[2][(slice(None), *box.to_slices()[1:])]
        if data.size and (int(data.min()) < 0 or int(data.max()) > self.classes):
            bad = int(data.max()) if int(data.max()) > self.classes else int(data.min())
            raise InputError(f"{self.path}: truth has label {bad} but the segmentation has {self.classes} classes; "
                             "truth labels must be 0 (ignore) or 1..K")
        return data


def choose_classes(wanted: Sequence[str | int] | None, classes: Sequence[str], counts: np.ndarray) -> list[int]:
    """Labels (1..K) to analyse for connected components."""
    if wanted is None:
        if counts.sum() == 0:
            return []
        majority = int(np.argmax(counts)) + 1
        return [c for c in range(1, len(classes) + 1) if c != majority]
    out = []
    for w in wanted:
        text = str(w)
        if text in classes:
            out.append(classes.index(text) + 1)
        elif text.isdigit() and 1 <= int(text) <= len(classes):
            out.append(int(text))
        else:
            raise InputError(f"class {text!r} is not one of {', '.join(classes)} (or labels 1..{len(classes)})")
    return sorted(set(out))


def qc_block(
    block: int | Sequence[int] | None, manifest: Mapping[str, Any], shape: tuple[int, ...]
) -> tuple[int, ...]:
    """The QC block: given, or the run's block capped at 256 per axis (bounds QC memory)."""
    if block is None:
        block = [min(int(v), 256) for v in manifest.get("block") or (256, 256, 256)]
    b = (int(block),) * 3 if isinstance(block, int) else tuple(int(v) for v in block)
    if len(b) != 3 or min(b) < 1:
        raise InputError(f"QC block shape {block!r} must be one or three positive integers")
    return tuple(min(v, s) for v, s in zip(b, shape, strict=True))
