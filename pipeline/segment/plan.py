"""The plan of a segmentation: block shape, chunk shape, the blocks, and the run manifest.

This is the one place that decides a run's geometry:

- **block shape** (the write box): given, else :data:`DEFAULT_BLOCK` (128) on CPUs, else on
  GPUs the largest block whose forward pass fits in free GPU memory (:func:`auto_block`:
  :mod:`pipeline.models.footprint` + :func:`pipeline.core.tiling.choose_block`);
- **chunk shape** of the outputs: given, else ``min(block, 128)`` per axis, never larger than
  the volume; the block must be a multiple of it (checked by :func:`plan_blocks`);
- **blocks**: :func:`pipeline.core.tiling.plan_blocks` with the model's halo;
- **manifest**: what the ledger was made with, compared on resume.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import InputError
from pipeline.core.tiling import Block, choose_block, grid_shape, plan_blocks
from pipeline.io.store import DEFAULT_CHUNKS, fit_chunks
from pipeline.models.footprint import activation_bytes_per_voxel, model_widths

logger = logging.getLogger(__name__)

#: CPU write-block edge. On CPUs 128^3 blocks (146^3 with the default halo, ~190 MiB of
#: activations) run faster per voxel than 256^3 (1.26 GiB) despite the larger halo share: the
#: working set stays closer to the caches (bench/throughput.py; docs/performance.md).
DEFAULT_BLOCK = 128

Shape3 = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class Plan:
    """A run's geometry.

    Attributes:
        volume: (Z, Y, X) scan shape.
        block: (z, y, x) write-box shape.
        chunks: (z, y, x) output chunk shape.
        halo: the model's context per side, voxels.
        blocks: the blocks in C order of their grid index.
        grid: blocks per axis, (GZ, GY, GX).
    """

    volume: tuple[int, ...]
    block: Shape3
    chunks: tuple[int, ...]
    halo: int
    blocks: tuple[Block, ...]
    grid: tuple[int, ...]


def auto_block(
    model: Any, *, chunks: Sequence[int], volume: Sequence[int], precision: str = "fp32",
    free_bytes: int | None = None,
) -> Shape3 | None:
    """Block shape for GPU workers from the smallest free memory of the visible GPUs.

    Args:
        model: a built model (its widths, classes and halo size the activations).
        chunks: output chunks the block must be a multiple of.
        free_bytes: memory to fit in; default the smallest free memory of the visible GPUs.

    Returns:
        (z, y, x), or None when no GPU memory figure is available (the caller keeps its default).
    """
    if free_bytes is None:
        from pipeline.compute.cuda import gpu_free_memory

        free = gpu_free_memory()
        if not free:
            return None
        free_bytes = min(free)
    widths = model_widths(model)
    element = 2 if precision in ("bf16", "fp16") else 4
    bpv = activation_bytes_per_voxel(widths, classes=int(model.classes), element_bytes=element)
    block = choose_block(free_bytes, bpv, halo=int(model.halo), chunks=chunks, volume=volume, max_width=max(widths))
    logger.info("block %s from %.1f GiB free GPU memory (%.0f bytes/voxel)", block, free_bytes / 2**30, bpv)
    return block


def _as_shape(block: int | Sequence[int]) -> Shape3:
    shape = (block,) * 3 if isinstance(block, int) else tuple(int(b) for b in block)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"block shape {block!r} must be one or three positive integers")
    return (shape[0], shape[1], shape[2])


def block_shape(
    volume: Sequence[int],
    *,
    block: int | Sequence[int] | None,
    chunks: Sequence[int] | None,
    device: str,
    model: Any = None,
    precision: str = "fp32",
) -> Shape3:
    """The write-box shape: ``block``, else :func:`auto_block` on CUDA devices, else :data:`DEFAULT_BLOCK`.

    ``model`` (a zero-argument callable returning the built model, or None) is only built when
    the GPU default is needed.
    """
    if block is None:
        block = DEFAULT_BLOCK
        if device.startswith("cuda") and model is not None:
            gpu_chunks = fit_chunks(chunks or DEFAULT_CHUNKS, volume)
            block = auto_block(model(), chunks=gpu_chunks, volume=volume, precision=precision) or block
    return _as_shape(block)


def chunk_shape(volume: Sequence[int], block: Sequence[int], chunks: Sequence[int] | None) -> tuple[int, ...]:
    """Output chunks: ``chunks``, else ``min(block, 128)`` per axis; never larger than the volume."""
    default = tuple(min(int(b), c) for b, c in zip(block, DEFAULT_CHUNKS, strict=True))
    return fit_chunks(chunks or default, volume)


def make_plan(
    volume: Sequence[int],
    halo: int,
    *,
    block: int | Sequence[int] | None = None,
    chunks: Sequence[int] | None = None,
    device: str = "cpu",
    model: Any = None,
    precision: str = "fp32",
) -> Plan:
    """Decide block and chunk shapes and plan the blocks of a ``volume`` (Z, Y, X)."""
    vol = tuple(int(v) for v in volume)
    bshape = block_shape(vol, block=block, chunks=chunks, device=device, model=model, precision=precision)
    cshape = chunk_shape(vol, bshape, chunks)
    blocks = plan_blocks(vol, bshape, halo, chunk_shape=cshape)
    return Plan(volume=vol, block=bshape, chunks=cshape, halo=int(halo), blocks=tuple(blocks),
                grid=grid_shape(vol, bshape))


def manifest(
    plan: Plan, *, scan: str | os.PathLike[str], fingerprint: str, probabilities: bool, exact: bool, precision: str
) -> dict[str, Any]:
    """What the ledger is made with (``studios.ledger``); a resume must match it."""
    return {
        "scan": str(Path(scan).resolve()),
        "model_fingerprint": fingerprint,
        "block": list(plan.block),
        "chunks": list(plan.chunks),
        "probabilities": probabilities,
        "exact": exact,
        "precision": precision,
    }


def seam_grid(volume: Sequence[int], block: Sequence[int], halo: int) -> list[Block]:
    """The run's block grid as recorded in a manifest (``block`` capped to the volume), for QC."""
    bshape = tuple(min(int(b), int(s)) for b, s in zip(block, volume, strict=True))
    return plan_blocks(tuple(int(v) for v in volume), bshape, halo)
