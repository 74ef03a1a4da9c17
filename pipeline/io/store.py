"""Zarr v3 / OME-Zarr storage for scans and segmentations.

Layout of an image written by studios (OME-Zarr 0.5 on zarr v3)::

    scan.zarr/
      zarr.json        group; attributes {"ome": {multiscales}, "studios": {...}}
      0/               full resolution (Z, Y, X), chunked, Blosc-zstd compressed
      1/, 2/, ...      2x down-sampled pyramid levels for viewers

``attributes["studios"]`` holds ``kind`` ("scan" or "segmentation"), ``complete`` (written
last), intensity ``stats`` for scans, ``provenance`` and, for segmentations, ``classes``.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from pipeline.core.errors import InputError, StorageError
from pipeline.core.geometry import AXES, Box
from pipeline.core.normalize import IntensityStats
from pipeline.core.tiling import Block
from pipeline.io.chunks import ChunkWriter

logger = logging.getLogger(__name__)

OME_VERSION = "0.5"
DEFAULT_CHUNKS = (128, 128, 128)


#: zstd level: 1 compresses tomograms about as well as 3 (the shuffle does most of the work) at
#: about four times the speed on one core (docs/performance.md, ingest).
CLEVEL = 1


def compressor_for(dtype: np.dtype[Any]) -> BloscCodec:
    """Blosc-zstd level :data:`CLEVEL`, bit-shuffled for bytes, byte-shuffled for wider types."""
    shuffle: Literal["bitshuffle", "shuffle"] = "bitshuffle" if np.dtype(dtype).itemsize == 1 else "shuffle"
    return BloscCodec(cname="zstd", clevel=CLEVEL, shuffle=shuffle)


def fit_chunks(chunks: Sequence[int], shape: Sequence[int]) -> tuple[int, ...]:
    """Chunks no larger than the array (zarr allows larger, but they waste space)."""
    return tuple(max(1, min(int(c), int(s))) for c, s in zip(chunks, shape, strict=True))


def multiscales(
    levels: int, *, voxel_size: Sequence[float], unit: str = "micrometer", name: str = "", ndim: int = 3
) -> dict[str, Any]:
    """OME-Zarr 0.5 ``multiscales`` entry for ``levels`` 2x pyramid levels over (z, y, x)."""
    axes: list[dict[str, str]] = [{"name": a, "type": "space", "unit": unit} for a in AXES]
    if ndim == 4:
        axes = [{"name": "c", "type": "channel"}, *axes]
    datasets = []
    for level in range(levels):
        scale = [float(v) * 2**level for v in voxel_size]
        if ndim == 4:
            scale = [1.0, *scale]
        datasets.append({"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": scale}]})
    return {"name": name, "axes": axes, "datasets": datasets}


def create_group(path: Path, *, overwrite: bool = False) -> zarr.Group:
    try:
        return zarr.create_group(store=str(path), zarr_format=3, overwrite=overwrite)
    except OSError as exc:
        raise StorageError(f"{path}: cannot create the output ({exc}); check the path and free space") from None


def create_array(
    group: zarr.Group,
    name: str,
    *,
    shape: Sequence[int],
    dtype: Any,
    chunks: Sequence[int],
    shards: Sequence[int] | None = None,
    dimension_names: Sequence[str] = AXES,
) -> zarr.Array:
    """A compressed zarr v3 array in ``group`` filled with 0."""
    chunks = fit_chunks(chunks, shape)
    kwargs: dict[str, Any] = {}
    if shards is not None:
        kwargs["shards"] = tuple(int(s) for s in shards)
    return group.create_array(
        name,
        shape=tuple(int(s) for s in shape),
        chunks=chunks,
        dtype=np.dtype(dtype),
        compressors=compressor_for(np.dtype(dtype)),
        fill_value=0,
        dimension_names=tuple(dimension_names),
        **kwargs,
    )


def downsample(data: np.ndarray[Any, Any], *, method: str) -> np.ndarray[Any, Any]:
    """2x down-sampling of a (.., Z, Y, X) array: ``"mean"`` for intensities, ``"nearest"`` for labels.

    Odd trailing planes are kept (mean over the voxels present: the last plane is repeated).
    Integer means are rounded half to even; for integers up to 16 bits the float32 sums of 8
    voxels are exact.
    """
    if method == "nearest":
        return data[..., ::2, ::2, ::2]
    pads = [(0, 0)] * (data.ndim - 3) + [(0, n % 2) for n in data.shape[-3:]]
    if any(p for _, p in pads):
        data = np.pad(data, pads, mode="edge")
    out = data[..., 0::2, :, :].astype(np.float32)  # one float copy of half the input
    out += data[..., 1::2, :, :]
    out = out[..., :, 0::2, :] + out[..., :, 1::2, :]
    out = out[..., :, :, 0::2] + out[..., :, :, 1::2]
    out *= 0.125
    if np.dtype(data.dtype).kind in "ui":
        info = np.iinfo(data.dtype)
        np.rint(out, out=out)
        np.clip(out, info.min, info.max, out=out)
    return out.astype(data.dtype)


def _array(group: zarr.Group, name: str) -> zarr.Array:
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise StorageError(f"{group.store}: {name!r} is not an array; rewrite the output with --overwrite")
    return node


def has_level(spatial: Sequence[int], level: int, *, min_size: int = 32, max_levels: int = 5) -> bool:
    """Whether a pyramid of a (Z, Y, X) shape ``spatial`` gets level ``level`` (>= 1)."""
    return level < max_levels and min(s // 2**level for s in spatial) >= min_size


def build_pyramid(
    group: zarr.Group, *, method: str, min_size: int = 32, max_levels: int = 5, base: str = "0", workers: int = 1,
    done: int = 1,
) -> int:
    """Write levels ``done..`` of a 2x pyramid below array ``base``, tile by tile.

    Each level is made from the one above in tiles of two source chunks per axis, so every tile
    fills exactly one chunk of the new level (levels share the chunk shape): tiles never share a
    chunk and run on ``workers`` threads. Memory: ``workers`` tiles (e.g. 256^3 as float32 =
    64 MiB each for 128^3 chunks), whatever the scan's size. ``done``: levels ``0..done-1``
    exist already (ingest writes level 1 from the slabs it holds in memory).

    Returns the number of levels including level 0.
    """
    source = _array(group, base)
    levels = done
    prefix = base[:-1] if base.endswith("0") else ""
    spatial = source.shape[-3:]
    while has_level(spatial, levels, min_size=min_size, max_levels=max_levels):
        src = _array(group, f"{prefix}{levels - 1}")
        shape = (*src.shape[:-3], *(-(-s // 2) for s in src.shape[-3:]))
        names: Any = getattr(src.metadata, "dimension_names", None)
        dst = create_array(
            group,
            f"{prefix}{levels}",
            shape=shape,
            dtype=src.dtype,
            chunks=src.chunks,
            dimension_names=tuple(str(n) for n in names) if names else AXES,
        )
        step = [2 * c for c in src.chunks[-3:]]
        starts = itertools.product(*(range(0, n, st) for n, st in zip(src.shape[-3:], step, strict=True)))
        writer = ChunkWriter(dst) if len(dst.shape) == 3 else None

        def tile(start: tuple[int, ...], src: zarr.Array = src, dst: zarr.Array = dst, step: list[int] = step,
                 writer: ChunkWriter | None = writer) -> None:
            read: tuple[Any, ...] = (..., *(slice(a, a + st) for a, st in zip(start, step, strict=True)))
            part = downsample(np.asarray(src[read]), method=method)
            if writer is not None:  # one whole chunk of the new level, encoded in this thread
                writer.write((start[0] // 2, start[1] // 2, start[2] // 2), part)
                return
            write: tuple[Any, ...] = (..., *(slice(a // 2, a // 2 + n)
                                             for a, n in zip(start, part.shape[-3:], strict=True)))
            dst[write] = part

        if workers > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for _ in pool.map(tile, starts):
                    pass
        else:
            for start in starts:
                tile(start)
        levels += 1
    return levels


def studios_attrs(group: zarr.Group) -> dict[str, Any]:
    """A copy of ``attributes["studios"]`` (empty if absent or not a mapping)."""
    value: Any = group.attrs.get("studios", {})
    return dict(value) if isinstance(value, Mapping) else {}


def set_studios_attrs(group: zarr.Group, **values: Any) -> None:
    """Merge ``values`` into ``attributes["studios"]``."""
    current = studios_attrs(group)
    current.update(values)
    group.attrs["studios"] = current


@dataclass(frozen=True)
class Image:
    """An OME-Zarr image opened for reading.

    Attributes:
        path: the group's directory.
        array: level 0, shape (Z, Y, X) (or (C, Z, Y, X)).
        attrs: ``attributes["studios"]``.
        voxel_size: (z, y, x) physical size of a level-0 voxel.
    """

    path: Path
    array: zarr.Array
    attrs: Mapping[str, Any]
    voxel_size: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete", False))

    @property
    def stats(self) -> IntensityStats:
        if "stats" not in self.attrs:
            raise InputError(f"{self.path}: has no intensity statistics; ingest it with 'studios ingest'")
        return IntensityStats.from_json(self.attrs["stats"])


def open_image(path: str | os.PathLike[str], *, kind: str | None = None, require_complete: bool = True) -> Image:
    """Open an image written by studios; errors name the path and the fix."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: does not exist; check the path")
    try:
        group = zarr.open_group(str(path), mode="r")
        array = group["0"]
    except (KeyError, FileNotFoundError, ValueError, TypeError) as exc:
        raise InputError(f"{path}: is not a studios OME-Zarr image ({exc}); create it with 'studios ingest'") from None
    if not isinstance(array, zarr.Array):
        raise InputError(f"{path}: '0' is not an array; create it with 'studios ingest'")
    attrs = studios_attrs(group)
    if kind is not None and attrs.get("kind") != kind:
        raise InputError(f"{path}: is a {attrs.get('kind', 'foreign')!r} image, expected {kind!r}")
    if require_complete and not attrs.get("complete", False):
        raise InputError(f"{path}: is incomplete (its run did not finish); rerun the command that writes it")
    voxel = (1.0, 1.0, 1.0)
    try:
        ome: Any = group.attrs["ome"]
        scale = ome["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
        voxel = (float(scale[-3]), float(scale[-2]), float(scale[-1]))
    except (KeyError, IndexError, TypeError):
        logger.debug("%s: no OME scale metadata, assuming unit voxels", path)
    return Image(path=path, array=array, attrs=attrs, voxel_size=voxel)


#: Border rule shared by blocks and the whole-volume reference: replicate the edge voxels.
PAD_MODE: Final = "edge"


def read_padded(array: Any, block: Block, volume_shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    """Read ``block.read`` from ``array`` (Z, Y, X), edge-padding outside the volume.

    Returns:
        ``block.read.shape`` array of the source dtype.
    """
    volume = Box.from_shape(volume_shape)
    src = block.source(volume)
    data = np.asarray(array[src.to_slices()])
    pad = block.padding(volume)
    if any(a or b for a, b in pad):
        data = np.pad(data, pad, mode=PAD_MODE)
    return data


def write_box(array: Any, box: Box, data: np.ndarray[Any, Any], *, where: str | Path = "", what: str = "") -> None:
    """Write ``data`` into the (Z, Y, X) box ``box`` of ``array``; leading axes (e.g. classes) whole.

    Args:
        array: a zarr array (Z, Y, X) or (C, Z, Y, X).
        data: ``box.shape`` or ``(C, *box.shape)``, the array's dtype.
        where, what: name the output and the part for the error message.

    Raises:
        DiskFullError: the filesystem is full (stop the run); StorageError: any other write error.
    """
    from pipeline.io.outputs import storage_error

    lead = (slice(None),) * (len(array.shape) - len(box.shape))
    try:
        array[(*lead, *box.to_slices())] = data
    except OSError as exc:
        raise storage_error(where or str(getattr(array, "store", "")), exc, what=what) from None
