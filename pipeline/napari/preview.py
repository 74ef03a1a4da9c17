"""Live preview of one slice: the blockwise computation with write boxes inside that slice.

A stride-free model with halo ``h`` computes an output voxel from the input within ``h`` of it,
so one slice needs only a slab ``1 + 2h`` thick. The preview splits the slice into tiles (in-plane
``tile x tile``), and each tile is a :class:`~pipeline.core.tiling.Block` whose write box is that
tile of the slice: read with :func:`~pipeline.io.store.read_padded` (the edge rule of every
block), normalised with the bundle's global affine map and passed through
:func:`~pipeline.segment.predict.forward` — the same code :func:`pipeline.segment` runs for each
of its blocks. Hence, in exact mode, the preview's probabilities are bit-identical to the
segmentation of the whole scan on that slice and its labels equal; in the default (oneDNN) mode
labels equal it except where the two top classes are within float rounding (~1e-7).

Tiles are ordered nearest first to a focus point (the centre of the view), so the visible region
appears first and the rest fills in.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.core.errors import ConfigError
from pipeline.core.geometry import Box
from pipeline.core.tiling import Block
from pipeline.io.store import read_padded
from pipeline.models.base import StridefreeModel
from pipeline.segment.predict import forward, numerics, to_labels, top2_margin

DEFAULT_TILE = 256


@dataclass(frozen=True, eq=False)
class PreviewTile:
    """The prediction of one tile of the slice.

    Attributes:
        block: the block computed; ``block.write`` lies in the slice (thickness 1 along the axis).
        labels: ``block.write.shape`` uint8, classes 1..K.
        probs: ``(K, *block.write.shape)`` float32 softmax probabilities.
        uncertainty: ``block.write.shape`` float32, ``1 - (p_top1 - p_top2)`` in [0, 1].
        seconds: wall-clock time of read + forward.
    """

    block: Block
    labels: np.ndarray[Any, np.dtype[np.uint8]] = field(repr=False)
    probs: np.ndarray[Any, np.dtype[np.float32]] = field(repr=False)
    uncertainty: np.ndarray[Any, np.dtype[np.float32]] = field(repr=False)
    seconds: float = 0.0


def slice_blocks(
    shape: Sequence[int], axis: int, index: int, halo: int, *, tile: int = DEFAULT_TILE,
    focus: Sequence[float] | None = None,
) -> list[Block]:
    """Blocks whose write boxes tile the slice ``index`` along ``axis`` of a (Z, Y, X) volume.

    Args:
        focus: (a, b) in-plane point (the two axes other than ``axis``); tiles nearest to it come
            first. Default: the slice centre.

    Returns:
        Blocks with write boxes of thickness 1 along ``axis`` and up to ``tile`` in-plane; read
        boxes grown by ``halo`` on every side (they may extend past the volume).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or axis not in (0, 1, 2):
        raise ConfigError(f"slice along axis {axis} of shape {shape}: need a (z, y, x) volume and axis 0, 1 or 2")
    if not 0 <= index < shape[axis]:
        raise ConfigError(f"slice {index} along axis {'zyx'[axis]} is outside the scan (0..{shape[axis] - 1})")
    if tile < 1:
        raise ConfigError(f"preview tile {tile} must be at least 1")
    a, b = (d for d in range(3) if d != axis)
    centre = tuple(focus) if focus is not None else (shape[a] / 2.0, shape[b] / 2.0)
    blocks = []
    for i, oa in enumerate(range(0, shape[a], tile)):
        for j, ob in enumerate(range(0, shape[b], tile)):
            offset, size, grid = [0, 0, 0], [1, 1, 1], [0, 0, 0]
            offset[axis], offset[a], offset[b] = index, oa, ob
            size[a], size[b] = min(tile, shape[a] - oa), min(tile, shape[b] - ob)
            grid[axis], grid[a], grid[b] = index, i, j
            write = Box(tuple(offset), tuple(size))
            blocks.append(Block(index=tuple(grid), write=write, read=write.grow(halo)))

    def distance(block: Block) -> float:
        ca = block.write.offset[a] + block.write.shape[a] / 2.0
        cb = block.write.offset[b] + block.write.shape[b] / 2.0
        return float((ca - centre[0]) ** 2 + (cb - centre[1]) ** 2)

    return sorted(blocks, key=distance)


def predict_block(
    model: StridefreeModel, scan: Any, block: Block, *, offset: float, scale: float,
    exact: bool = False, precision: str = "fp32", device: torch.device | None = None,
) -> PreviewTile:
    """Predict one block of ``scan`` (a (Z, Y, X) zarr or numpy array) exactly as a segment worker does."""
    t0 = time.perf_counter()
    raw = read_padded(scan, block, tuple(int(s) for s in scan.shape))
    with numerics(exact=exact):
        probs = forward(model, raw, offset=offset, scale=scale, device=device, precision=precision)
    labels = to_labels(probs)
    uncertainty = (1.0 - top2_margin(probs)).astype(np.float32)
    return PreviewTile(block, labels, probs, uncertainty, time.perf_counter() - t0)


def preview_slice(
    model: StridefreeModel, scan: Any, axis: int, index: int, *, offset: float, scale: float,
    tile: int = DEFAULT_TILE, focus: Sequence[float] | None = None, exact: bool = False,
    precision: str = "fp32", device: torch.device | None = None,
) -> Iterator[PreviewTile]:
    """Tiles of the prediction of slice ``index`` along ``axis``, nearest the focus first."""
    for block in slice_blocks(scan.shape, axis, index, model.halo, tile=tile, focus=focus):
        yield predict_block(model, scan, block, offset=offset, scale=scale, exact=exact,
                            precision=precision, device=device)


@dataclass(frozen=True, eq=False)
class SlicePreview:
    """A whole slice assembled from its tiles.

    Attributes:
        axis, index: the slice.
        labels: plane-shaped (the volume shape without ``axis``) uint8; 0 where not yet computed.
        uncertainty: plane-shaped float32.
        probs: ``(K, *plane)`` float32.
    """

    axis: int
    index: int
    labels: np.ndarray[Any, np.dtype[np.uint8]] = field(repr=False)
    uncertainty: np.ndarray[Any, np.dtype[np.float32]] = field(repr=False)
    probs: np.ndarray[Any, np.dtype[np.float32]] = field(repr=False)
    seconds: float = 0.0


def plane_slices(block: Block, axis: int) -> tuple[slice, slice]:
    """In-plane position of ``block.write`` (the two axes other than ``axis``)."""
    sl = block.write.to_slices()
    return tuple(s for d, s in enumerate(sl) if d != axis)  # type: ignore[return-value]


def assemble(tiles: Sequence[PreviewTile] | Iterator[PreviewTile], shape: Sequence[int], axis: int,
             index: int, classes: int) -> SlicePreview:
    """Stitch tiles of one slice into plane-shaped arrays."""
    plane = tuple(int(s) for d, s in enumerate(shape) if d != axis)
    labels = np.zeros(plane, np.uint8)
    unc = np.zeros(plane, np.float32)
    probs = np.zeros((classes, *plane), np.float32)
    t0 = time.perf_counter()
    for t in tiles:
        sa, sb = plane_slices(t.block, axis)
        labels[sa, sb] = np.squeeze(t.labels, axis=axis)
        unc[sa, sb] = np.squeeze(t.uncertainty, axis=axis)
        probs[:, sa, sb] = np.squeeze(t.probs, axis=axis + 1)
    return SlicePreview(axis, index, labels, unc, probs, time.perf_counter() - t0)
