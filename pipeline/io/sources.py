"""Readers for reconstructions in the formats beamlines write.

Each source is validated when it is opened (cheaply: headers, sizes, shapes) so that a bad
file is reported before any output is written, and then read slab by slab along z:
``read(z0, z1)`` returns ``(z1 - z0, Y, X)`` in the native byte order of the source dtype.

Supported: a folder of 2D TIFF slices (natural sort), a multipage/3D TIFF, an HDF5 dataset
(``file.h5:/exchange/data``), raw binary (shape/dtype/byte order given), ``.npy``, and a zarr
array (or a studios/OME-Zarr group, whose level ``0`` is used).
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from pipeline.core.errors import InputError

SUPPORTED_DTYPES = ("uint8", "uint16", "int16", "float32")
#: The readable formats and the file-name suffixes (lower case) that select them. Every reader,
#: the run-profile checks and the watched-folder scan detection use this one table.
FORMAT_SUFFIXES: dict[str, tuple[str, ...]] = {
    "hdf5": (".h5", ".hdf5", ".hdf", ".he5", ".nxs", ".nx5", ".cxi"),  # HDF5, NeXus, CXI
    "tiff": (".ome.tiff", ".ome.tif", ".tiff", ".tif"),
    "npy": (".npy",),
    "zarr": (".zarr",),
    "raw": (".raw", ".bin", ".vol", ".dat"),
}
HDF5_SUFFIXES = FORMAT_SUFFIXES["hdf5"]
TIFF_SUFFIXES = (".tif", ".tiff")  # what Path.suffix gives for every TIFF name above
RAW_SUFFIXES = FORMAT_SUFFIXES["raw"]
READABLE_SUFFIXES: tuple[str, ...] = tuple(s for suffixes in FORMAT_SUFFIXES.values() for s in suffixes)
_DATASET = re.compile(r"^(.*?(?:" + "|".join(re.escape(s) for s in HDF5_SUFFIXES) + r")):(.*)$",
                      re.IGNORECASE | re.DOTALL)
_BYTE_ORDERS: dict[str, Literal["<", ">", "=", "|"]] = {"<": "<", ">": ">", "=": "=", "|": "|"}


def split_source(source: str | os.PathLike[str]) -> tuple[str, str | None]:
    """``FILE.h5:/exchange/data`` -> ``("FILE.h5", "/exchange/data")``; other sources ->
    ``(source, None)``. Any suffix of :data:`HDF5_SUFFIXES` may carry a dataset."""
    text = os.fspath(source)
    m = _DATASET.match(text)
    return (text, None) if m is None else (m.group(1), m.group(2))


def source_file(source: str | os.PathLike[str]) -> Path:
    """The file or folder a source names (the HDF5 file of ``FILE.h5:/dataset``)."""
    return Path(split_source(source)[0])


def strip_suffix(name: str) -> str:
    """``name`` without its readable-format suffix (``scan.ome.tif`` -> ``scan``); unchanged if none."""
    lower = name.lower()
    for ext in sorted(READABLE_SUFFIXES, key=len, reverse=True):
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return name


class Source(Protocol):
    path: Path
    format: str
    shape: tuple[int, int, int]
    dtype: np.dtype[Any]

    def read(self, z0: int, z1: int) -> np.ndarray[Any, Any]: ...


def natural_key(name: str) -> list[Any]:
    """Sort key that orders ``slice_2`` before ``slice_10``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _check_dtype(dtype: np.dtype[Any], path: Path) -> np.dtype[Any]:
    native = np.dtype(dtype).newbyteorder("=")
    if native.name not in SUPPORTED_DTYPES:
        raise InputError(
            f"{path}: voxel type {native.name} is not supported; convert to one of {', '.join(SUPPORTED_DTYPES)}"
        )
    return native


def _check_shape(shape: Sequence[int], path: Path) -> tuple[int, int, int]:
    if len(shape) == 2:
        raise InputError(f"{path}: is a 2D image {tuple(shape)}, not a volume; give a folder of slices or a 3D file")
    if len(shape) != 3:
        raise InputError(f"{path}: has {len(shape)} dimensions {tuple(shape)}; a (z, y, x) volume is needed")
    if min(shape) < 1:
        raise InputError(f"{path}: has an empty axis {tuple(shape)}")
    return (int(shape[0]), int(shape[1]), int(shape[2]))


def _tiff_page_ok(page: Any, size: int) -> bool:
    offsets, counts = page.dataoffsets, page.databytecounts
    return bool(offsets) and all(o + c <= size for o, c in zip(offsets, counts, strict=False))


@dataclass
class TiffStack:
    """A folder of 2D TIFF slices, one per z, in natural order."""

    path: Path
    files: list[Path] = field(default_factory=list)
    format: str = "tiff-stack"
    shape: tuple[int, int, int] = (0, 0, 0)
    dtype: np.dtype[Any] = field(default_factory=lambda: np.dtype("uint8"))
    #: per file, (byte offset, byte-swap needed) of its pixels when tifffile finds them stored in
    #: final form in one contiguous run (uncompressed, no predictor), else None
    _raw: list[tuple[int, bool] | None] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        import tifffile

        entries = sorted((p for p in self.path.iterdir() if not p.name.startswith(".")),
                         key=lambda p: natural_key(p.name))
        self.files = [p for p in entries if p.suffix.lower() in TIFF_SUFFIXES]
        if not self.files:
            raise InputError(f"{self.path}: contains no .tif/.tiff slices; point to the folder holding the slices")
        first: tuple[tuple[int, ...], np.dtype[Any]] | None = None
        for f in self.files:
            try:
                with tifffile.TiffFile(f) as tif:
                    page = tif.pages.first
                    shape, dtype = tuple(page.shape), np.dtype(page.dtype)
                    if len(tif.pages) != 1 or len(shape) != 2:
                        raise InputError(f"{f}: holds {len(tif.pages)} page(s) of shape {shape}; "
                                         "each slice file must be one 2D image")
                    if not _tiff_page_ok(page, f.stat().st_size):
                        raise InputError(f"{f}: is truncated (image data runs past the end of the file); "
                                         "re-export or replace this slice")
                    final = (page.is_final and page.is_contiguous
                             and sum(page.databytecounts) == dtype.itemsize * math.prod(shape))
                    swap = dtype.itemsize > 1 and tif.byteorder != ("<" if sys.byteorder == "little" else ">")
                    self._raw.append((int(page.dataoffsets[0]), swap) if final else None)
            except InputError:
                raise
            except Exception as exc:  # tifffile raises several types for non-TIFF content
                raise InputError(f"{f}: is not a readable TIFF image ({type(exc).__name__}); "
                                 "remove it from the folder or replace it") from None
            if first is None:
                first = (shape, dtype)
            elif (shape, dtype) != first:
                raise InputError(
                    f"{f}: slice is {shape} {dtype.name} but {self.files[0].name} is {first[0]} {first[1].name}; "
                    "all slices must share shape and type"
                )
        if first is None:  # unreachable: self.files is non-empty
            raise InputError(f"{self.path}: contains no readable slices; point to the folder holding the slices")
        self.dtype = _check_dtype(first[1], self.path)
        self.shape = _check_shape((len(self.files), *first[0]), self.path)

    def read(self, z0: int, z1: int) -> np.ndarray[Any, Any]:
        """Slices ``z0..z1`` as a (Z, Y, X) array of :attr:`dtype`.

        Uncompressed slices are read straight into the slab (``readinto`` at the pixel offset
        tifffile found when the folder was opened: no header parsing per read, no copy, the GIL
        released while reading); others are decoded by ``tifffile.imread``.
        """
        import tifffile

        out = np.empty((z1 - z0, *self.shape[1:]), dtype=self.dtype)
        for i, f in enumerate(self.files[z0:z1]):
            raw = self._raw[z0 + i]
            try:
                if raw is None:
                    out[i] = tifffile.imread(f)
                    continue
                with open(f, "rb") as fh:
                    fh.seek(raw[0])
                    got = fh.readinto(memoryview(out[i]).cast("B"))
                if got != out[i].nbytes:
                    raise OSError(f"read {got} of {out[i].nbytes} bytes")
                if raw[1]:
                    out[i].byteswap(inplace=True)
            except Exception as exc:
                raise InputError(f"{f}: could not be read ({exc}); replace this slice") from None
        return out


@dataclass
class TiffVolume:
    """A multipage TIFF (one page per z) or a single 3D TIFF series."""

    path: Path
    format: str = "tiff"
    shape: tuple[int, int, int] = (0, 0, 0)
    dtype: np.dtype[Any] = field(default_factory=lambda: np.dtype("uint8"))
    _paged: bool = False

    def __post_init__(self) -> None:
        import tifffile

        try:
            with tifffile.TiffFile(self.path) as tif:
                series = tif.series[0]
                shape = tuple(series.shape)
                dtype = np.dtype(series.dtype)
                size = self.path.stat().st_size
                for page in tif.pages:
                    if not _tiff_page_ok(page, size):
                        raise InputError(
                            f"{self.path}: is truncated (image data runs past the end of the file); re-export it")
                self._paged = len(tif.pages) == shape[0] if len(shape) == 3 else False
        except InputError:
            raise
        except Exception as exc:
            raise InputError(
                f"{self.path}: is not a readable TIFF ({type(exc).__name__}: {exc}); check the file") from None
        squeezed = tuple(s for s in shape if s != 1) if len(shape) > 3 else shape
        self.shape = _check_shape(squeezed, self.path)
        self.dtype = _check_dtype(dtype, self.path)

    def read(self, z0: int, z1: int) -> np.ndarray[Any, Any]:
        import tifffile

        if self._paged:
            data = tifffile.imread(self.path, key=range(z0, z1))
            return np.asarray(data, dtype=self.dtype).reshape((z1 - z0, *self.shape[1:]))
        return np.asarray(tifffile.imread(self.path), dtype=self.dtype).reshape(self.shape)[z0:z1]


@dataclass
class Hdf5Source:
    """An HDF5 dataset, ``file.h5:/exchange/data`` (DXchange) or a NeXus path."""

    path: Path
    dataset: str = "/exchange/data"
    format: str = "hdf5"
    shape: tuple[int, int, int] = (0, 0, 0)
    dtype: np.dtype[Any] = field(default_factory=lambda: np.dtype("uint8"))

    def __post_init__(self) -> None:
        import h5py

        try:
            with h5py.File(self.path, "r") as f:
                if self.dataset not in f:
                    raise InputError(
                        f"{self.path}: has no dataset {self.dataset!r}; give FILE:/path/to/dataset "
                        f"(top-level keys: {', '.join(list(f.keys())[:8])})"
                    )
                ds = f[self.dataset]
                if not isinstance(ds, h5py.Dataset):
                    raise InputError(
                        f"{self.path}:{self.dataset} is a group, not a dataset; name the dataset inside it")
                self.shape = _check_shape(ds.shape, self.path)
                self.dtype = _check_dtype(ds.dtype, self.path)
        except InputError:
            raise
        except OSError as exc:
            raise InputError(f"{self.path}: is not a readable HDF5 file ({exc}); check the file") from None

    def read(self, z0: int, z1: int) -> np.ndarray[Any, Any]:
        import h5py

        with h5py.File(self.path, "r") as f:
            return np.asarray(f[self.dataset][z0:z1], dtype=self.dtype)


@dataclass
class RawSource:
    """Headerless binary volume with a known shape, dtype and byte order."""

    path: Path
    raw_shape: tuple[int, int, int] = (0, 0, 0)
    raw_dtype: str = "uint16"
    byte_order: str = "<"
    offset: int = 0
    format: str = "raw"
    shape: tuple[int, int, int] = (0, 0, 0)
    dtype: np.dtype[Any] = field(default_factory=lambda: np.dtype("uint8"))

    def __post_init__(self) -> None:
        order = _BYTE_ORDERS.get(self.byte_order)
        if order is None:
            raise InputError(f"{self.path}: byte order {self.byte_order!r} is invalid; use '<' (little) or '>' (big)")
        try:
            file_dtype = np.dtype(self.raw_dtype).newbyteorder(order)
        except TypeError:
            raise InputError(
                f"{self.path}: dtype {self.raw_dtype!r} is unknown; use one of {', '.join(SUPPORTED_DTYPES)}"
            ) from None
        self.dtype = _check_dtype(file_dtype, self.path)
        self.shape = _check_shape(self.raw_shape, self.path)
        expected = int(np.prod(self.shape)) * file_dtype.itemsize + self.offset
        actual = self.path.stat().st_size
        if actual != expected:
            raise InputError(
                f"{self.path}: holds {actual} bytes but shape {self.shape} {file_dtype.name} needs {expected}; "
                "check --shape, --dtype and --offset"
            )
        self._file_dtype = file_dtype

    def read(self, z0: int, z1: int) -> np.ndarray[Any, Any]:
        mm = np.memmap(self.path, dtype=self._file_dtype, mode="r", offset=self.offset, shape=self.shape)
        return np.asarray(mm[z0:z1]).astype(self.dtype)


@dataclass
class ArraySource:
    """``.npy`` files and zarr arrays (memory-mapped / lazily read)."""

    path: Path
    format: str = "npy"
    shape: tuple[int, int, int] = (0, 0, 0)
    dtype: np.dtype[Any] = field(default_factory=lambda: np.dtype("uint8"))
    _array: Any = None

    def __post_init__(self) -> None:
        if self.format == "npy":
            try:
                self._array = np.load(self.path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as exc:
                raise InputError(
                    f"{self.path}: is not a readable .npy array ({exc}); save it with numpy.save") from None
        else:
            import zarr

            try:
                node = zarr.open(str(self.path), mode="r")
                studios = node.attrs.get("studios") if isinstance(node, zarr.Group) else None
                if isinstance(node, zarr.Group):
                    node = node["0"]
            except (KeyError, FileNotFoundError, ValueError, TypeError) as exc:
                raise InputError(f"{self.path}: is not a zarr array or image ({exc}); check the path") from None
            if isinstance(studios, dict) and studios.get("complete") is False:  # a studios image still being written
                raise InputError(
                    f"{self.path}: is not marked complete (its writer has not finished); wait for it or rerun the "
                    "command that writes it"
                )
            self._array = node
        self.shape = _check_shape(self._array.shape, self.path)
        self.dtype = _check_dtype(np.dtype(self._array.dtype), self.path)

    def read(self, z0: int, z1: int) -> np.ndarray[Any, Any]:
        return np.asarray(self._array[z0:z1]).astype(self.dtype, copy=False)


def open_source(
    spec: str | os.PathLike[str],
    *,
    shape: Sequence[int] | None = None,
    dtype: str | None = None,
    byte_order: str = "<",
    offset: int = 0,
) -> Source:
    """Open and validate a reconstruction; the format follows from the path.

    ``shape``/``dtype``/``byte_order``/``offset`` are for raw binary files only.
    """
    text, dataset = split_source(spec)
    if dataset is not None:
        return Hdf5Source(_existing(Path(text)), dataset=dataset or "/exchange/data")
    path = _existing(Path(text))
    suffix = path.suffix.lower()
    if path.is_dir() and (path / "zarr.json").exists() or suffix == ".zarr":
        return ArraySource(path, format="zarr")
    if path.is_dir():
        return TiffStack(path)
    if suffix in TIFF_SUFFIXES:
        return TiffVolume(path)
    if suffix in HDF5_SUFFIXES:
        return Hdf5Source(path)
    if suffix == ".npy":
        return ArraySource(path, format="npy")
    if shape is not None or dtype is not None or suffix in RAW_SUFFIXES:
        if shape is None or dtype is None:
            raise InputError(f"{path}: raw binary needs --shape Z Y X and --dtype (and --byte-order '<' or '>')")
        raw_shape: Any = tuple(int(s) for s in shape)  # its length is checked by RawSource
        return RawSource(path, raw_shape=raw_shape, raw_dtype=dtype, byte_order=byte_order, offset=offset)
    raise InputError(
        f"{path}: format not recognised; use a TIFF folder, .tif, .h5:/dataset, .npy, .zarr, "
        "or raw with --shape/--dtype"
    )


def _existing(path: Path) -> Path:
    if not path.exists():
        raise InputError(f"{path}: does not exist; check the path")
    if path.is_dir() and path.suffix.lower() != ".zarr" and not any(path.iterdir()):
        raise InputError(f"{path}: is an empty folder; point to the folder holding the TIFF slices")
    return path
