"""Blocks: write boxes that partition a volume, read boxes that add the model's halo.

::

    volume  +-----------------------------+
            |  read box = write box + halo |
            |   +-------------------+      |
            |   |  +-------------+  |      |
            |   |  |  write box  |  |      |
            |   |  +-------------+  |      |
            |   +-------------------+      |
            +-----------------------------+

Write boxes tile the volume on a regular grid of ``write_shape`` starting at the origin; the
last block along an axis is shrunk to the volume (``fit="shrink"``, the only policy: every
voxel is written exactly once). Read boxes are the write boxes grown by ``halo`` on every side
and may extend past the volume; the part outside is padded by the same rule the whole-volume
reference uses (see :mod:`pipeline.segment.predict`).

Block ids come from the grid index (``"z-y-x"``), so a block keeps its id across reruns.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pipeline.core.errors import ConfigError, GeometryError
from pipeline.core.geometry import Box


@dataclass(frozen=True, slots=True)
class Block:
    """One unit of work.

    Attributes:
        index: grid position, one int per axis.
        write: the voxels this block owns in the output (inside the volume).
        read: ``write`` grown by the halo; may extend outside the volume.
    """

    index: tuple[int, ...]
    write: Box
    read: Box

    @property
    def id(self) -> str:
        """Stable id from the grid index, e.g. ``"0-3-2"``."""
        return "-".join(str(i) for i in self.index)

    def source(self, volume: Box) -> Box:
        """The part of the read box that exists in ``volume``."""
        return self.read.intersect(volume)

    def padding(self, volume: Box) -> tuple[tuple[int, int], ...]:
        """Voxels to pad before/after per axis so ``source`` becomes ``read``."""
        src = self.source(volume)
        return tuple(
            (so - ro, re - se)
            for ro, re, so, se in zip(self.read.offset, self.read.end, src.offset, src.end, strict=True)
        )


def check_alignment(write_shape: Sequence[int], chunk_shape: Sequence[int], volume_shape: Sequence[int]) -> None:
    """Raise unless every write box starts on a chunk boundary.

    A write shape aligns when it is a multiple of the chunk shape along each axis, or covers
    the whole axis in one block.
    """
    for axis, (w, c, v) in enumerate(zip(write_shape, chunk_shape, volume_shape, strict=True)):
        if w >= v:
            continue
        if w % c:
            raise GeometryError(
                f"block shape {tuple(write_shape)} does not align with the output chunks "
                f"{tuple(chunk_shape)} on axis {axis}; use a multiple of {c}"
            )


def plan_blocks(
    volume_shape: Sequence[int],
    write_shape: Sequence[int],
    halo: int | Sequence[int],
    *,
    chunk_shape: Sequence[int] | None = None,
) -> list[Block]:
    """Plan the blocks of a volume, in C order of their grid index.

    Args:
        volume_shape: (z, y, x) shape of the volume.
        write_shape: (z, y, x) shape of a write box; each ``>= 1``.
        halo: context each side, in voxels (int or one per axis), ``>= 0``.
        chunk_shape: output chunk (or shard) shape the write boxes must align with.

    Returns:
        The blocks; their write boxes partition ``Box.from_shape(volume_shape)``.
    """
    return list(iter_blocks(volume_shape, write_shape, halo, chunk_shape=chunk_shape))


def grid_shape(volume_shape: Sequence[int], write_shape: Sequence[int]) -> tuple[int, ...]:
    """Number of blocks along each axis."""
    return tuple(-(-v // w) for v, w in zip(volume_shape, write_shape, strict=True))


def iter_blocks(
    volume_shape: Sequence[int],
    write_shape: Sequence[int],
    halo: int | Sequence[int],
    *,
    chunk_shape: Sequence[int] | None = None,
) -> Iterator[Block]:
    """Like :func:`plan_blocks` but lazy (for 10^5+ blocks)."""
    volume_shape = tuple(int(v) for v in volume_shape)
    write_shape = tuple(int(w) for w in write_shape)
    if len(write_shape) != len(volume_shape):
        raise GeometryError(f"block shape {write_shape} does not match volume shape {volume_shape}")
    if any(v < 1 for v in volume_shape):
        raise GeometryError(f"volume shape {volume_shape} has an empty axis")
    if any(w < 1 for w in write_shape):
        raise GeometryError(f"block shape {write_shape} must be at least 1 along every axis")
    halos = (int(halo),) * len(volume_shape) if isinstance(halo, int) else tuple(int(h) for h in halo)
    if len(halos) != len(volume_shape) or any(h < 0 for h in halos):
        raise GeometryError(f"halo {halo!r} must be >= 0, one value or one per axis")
    if chunk_shape is not None:
        check_alignment(write_shape, chunk_shape, volume_shape)
    volume = Box.from_shape(volume_shape)
    for index in itertools.product(*(range(n) for n in grid_shape(volume_shape, write_shape))):
        offset = tuple(i * w for i, w in zip(index, write_shape, strict=True))
        write = Box(offset, write_shape).intersect(volume)
        yield Block(index=tuple(index), write=write, read=write.grow(halos))

def choose_block(
    free_bytes: int,
    bytes_per_voxel: float,
    *,
    halo: int,
    chunks: Sequence[int],
    volume: Sequence[int],
    fraction: float = 0.8,
    max_width: int = 1,
    max_tensor_elements: int = 2**31 - 1,
) -> tuple[int, int, int]:
    """The largest near-cubic write block (a multiple of ``chunks`` on each axis) whose read box
    fits in ``fraction`` of ``free_bytes``.

    Grows the shortest edge by one chunk while the read box ``prod(block + 2 halo)`` fits,
    never past the chunk multiple that covers the volume, and keeps every feature map below
    ``max_tensor_elements`` elements (``max_width`` channels; 32-bit indexing in kernels).

    Raises:
        ConfigError: if not even a block of one chunk fits.
    """
    budget = fraction * free_bytes
    chunks = tuple(int(c) for c in chunks)
    limit = tuple(-(-int(v) // c) for v, c in zip(volume, chunks, strict=True))  # chunks covering the volume

    def fits(k: Sequence[int]) -> bool:
        voxels = math.prod(ki * c + 2 * halo for ki, c in zip(k, chunks, strict=True))
        return voxels * bytes_per_voxel <= budget and voxels * max(1, max_width) <= max_tensor_elements

    k = [1, 1, 1]
    if not fits(k):
        need = math.prod(c + 2 * halo for c in chunks) * bytes_per_voxel / fraction
        raise ConfigError(
            f"one block of {'x'.join(map(str, chunks))} voxels (+ halo {halo}) needs about {need / 2**30:.2f} GiB "
            f"of GPU memory, {free_bytes / 2**30:.2f} GiB is free; use smaller --chunks or free the GPU"
        )
    growable = [k[i] < limit[i] for i in range(3)]
    while any(growable):
        # the shortest growable edge; ties go to the last axis (x: contiguous in memory)
        axis = min((i for i in range(3) if growable[i]), key=lambda i: (k[i] * chunks[i], -i))
        trial = list(k)
        trial[axis] += 1
        if fits(trial):
            k = trial
            growable[axis] = k[axis] < limit[axis]
        else:
            growable[axis] = False
    return (k[0] * chunks[0], k[1] * chunks[1], k[2] * chunks[2])
