"""Ingest: a reconstruction in any supported format -> a studios OME-Zarr scan.

One streaming pass, slab by slab along z, several slabs in flight on a thread pool: each slab
is read, checked for NaN/Inf, added to the global intensity statistics and written to its own
z-range of chunks (slabs are chunk-aligned, so no two threads touch one chunk), encoded and
written by the slab's own thread (:class:`~pipeline.io.chunks.ChunkWriter`). The first
pyramid level is down-sampled from the slab in memory (two slabs fill one chunk row of level 1,
written by the slab thread that completes it: no chunk is shared), so level 0 is never read
back; the coarser levels come from level 1. Peak memory is about ``(workers + 1)`` slabs,
independent of the volume size. The output is built under a temporary name and renamed into
place when complete.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import __version__
from pipeline.core import interrupt
from pipeline.core.errors import InputError, StudiosError
from pipeline.core.normalize import IntensityStats, StatsAccumulator
from pipeline.core.progress import NullReporter, Reporter
from pipeline.io.chunks import ChunkWriter
from pipeline.io.outputs import OutputLock, atomic_directory, check_output, storage_error
from pipeline.io.sources import Source, open_source
from pipeline.io.store import (
    DEFAULT_CHUNKS,
    build_pyramid,
    create_array,
    create_group,
    downsample,
    fit_chunks,
    has_level,
    multiscales,
    set_studios_attrs,
)

logger = logging.getLogger(__name__)

NONFINITE_POLICIES = ("error", "zero")


class LevelOne:
    """Level 1 of the pyramid assembled from the down-sampled slabs, one chunk row at a time.

    Slab ``k`` (level-0 z in ``[k C, (k + 1) C)``, ``C`` the chunk height) gives level-1 z in
    ``[k C / 2, (k + 1) C / 2)``: half a chunk row. Halves are held until their partner arrives
    and each full row is written once (the last row may be a single half), so no chunk is written
    twice or from two threads: the slab thread that completes a row writes it. Needs an even
    ``C``: an odd slab would be padded at its end where the whole-volume down-sampling is not.
    """

    def __init__(self, group: Any, shape: Sequence[int], chunks: Sequence[int], dtype: Any) -> None:
        self.height = int(chunks[0])
        down = tuple(-(-int(s) // 2) for s in shape)
        self.array = create_array(group, "1", shape=down, dtype=dtype, chunks=tuple(chunks))
        self.writer = ChunkWriter(self.array)
        self.pending: dict[int, np.ndarray[Any, Any]] = {}
        self._lock = threading.Lock()
        self.slabs = -(-int(shape[0]) // self.height)

    def add(self, slab: int, data: np.ndarray[Any, Any]) -> None:
        """The down-sampled slab number ``slab``; writes its row when the row is complete.

        Thread-safe: called from the slab threads; the row is written outside the lock.
        """
        first = slab - slab % 2
        parts = [k for k in (first, first + 1) if k < self.slabs]
        with self._lock:
            self.pending[slab] = data
            if not all(k in self.pending for k in parts):
                return
            row = np.concatenate([self.pending.pop(k) for k in parts], axis=0)
        self.writer.write((first * self.height // 2, 0, 0), row)


@dataclass(frozen=True, slots=True)
class IngestResult:
    path: Path
    shape: tuple[int, int, int]
    dtype: str
    stats: IntensityStats
    levels: int
    nonfinite: int


def ingest(
    source: str | os.PathLike[str] | Source,
    output: str | os.PathLike[str],
    *,
    chunks: Sequence[int] = DEFAULT_CHUNKS,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    unit: str = "micrometer",
    workers: int = 2,
    nonfinite: str = "error",
    overwrite: bool = False,
    pyramid: bool = True,
    reporter: Reporter | None = None,
    raw_shape: Sequence[int] | None = None,
    raw_dtype: str | None = None,
    byte_order: str = "<",
    raw_offset: int = 0,
) -> IngestResult:
    """Convert a reconstruction to ``output`` (a zarr v3 OME-Zarr scan).

    Args:
        source: path (see :func:`pipeline.io.sources.open_source`) or an opened source.
        output: the ``.zarr`` directory to create.
        chunks: (z, y, x) chunk shape; the slab height is ``chunks[0]``.
        voxel_size: (z, y, x) physical voxel size in ``unit``.
        workers: slabs processed concurrently.
        nonfinite: ``"error"`` (refuse NaN/Inf, the default) or ``"zero"`` (replace by 0 and
            record the count in the provenance). Float scans only.
        overwrite: replace an existing output (atomically, only once the new one is complete).

    Returns:
        What was written, including the global statistics.
    """
    reporter = reporter or NullReporter()
    out = Path(output)
    if nonfinite not in NONFINITE_POLICIES:
        raise InputError(f"nonfinite policy {nonfinite!r} is unknown; use one of {', '.join(NONFINITE_POLICIES)}")
    if len(voxel_size) != 3 or any(not (float(v) > 0) for v in voxel_size):
        raise InputError(f"voxel size {tuple(voxel_size)} must be three positive numbers (z y x)")
    if len(chunks) != 3 or any(int(c) < 1 for c in chunks):
        raise InputError(f"chunk shape {tuple(chunks)} must be three positive integers (z y x)")
    src = (
        source
        if not isinstance(source, str | os.PathLike)
        else open_source(source, shape=raw_shape, dtype=raw_dtype, byte_order=byte_order, offset=raw_offset)
    )
    check_output(out, inputs=[src.path], overwrite=overwrite)
    chunk_shape = fit_chunks(chunks, src.shape)
    slab = chunk_shape[0]
    starts = list(range(0, src.shape[0], slab))
    logger.info("ingest %s (%s, %s %s) -> %s", src.path, src.format, src.shape, src.dtype.name, out)

    try:
        return _write(src, out, chunk_shape, slab, starts, voxel_size=voxel_size, unit=unit, workers=workers,
                      nonfinite=nonfinite, overwrite=overwrite, pyramid=pyramid, reporter=reporter)
    except StudiosError:
        raise
    except OSError as exc:
        raise storage_error(out, exc) from None


def _write(
    src: Source,
    out: Path,
    chunk_shape: tuple[int, ...],
    slab: int,
    starts: list[int],
    *,
    voxel_size: Sequence[float],
    unit: str,
    workers: int,
    nonfinite: str,
    overwrite: bool,
    pyramid: bool,
    reporter: Reporter,
) -> IngestResult:
    with OutputLock(out), atomic_directory(out, overwrite=overwrite) as tmp:
        group = create_group(tmp)
        array = create_array(group, "0", shape=src.shape, dtype=src.dtype, chunks=chunk_shape)
        level0 = ChunkWriter(array)
        set_studios_attrs(group, kind="scan", complete=False)
        total = StatsAccumulator(src.dtype)
        bad = 0
        in_memory = pyramid and slab % 2 == 0 and has_level(src.shape, 1)
        level1 = LevelOne(group, src.shape, chunk_shape, src.dtype) if in_memory else None

        def work(z0: int) -> tuple[StatsAccumulator, int]:
            try:
                data = src.read(z0, min(z0 + slab, src.shape[0]))
            except StudiosError:
                raise
            except Exception as exc:  # decoder errors of corrupted inputs come in many types
                raise InputError(
                    f"{src.path}: slab z={z0}.. could not be read ({type(exc).__name__}: {exc}); "
                    "the file is damaged, re-export it"
                ) from None
            count = 0
            if data.dtype.kind == "f":
                finite = np.isfinite(data)
                count = int(data.size - np.count_nonzero(finite))
                if count and nonfinite == "error":
                    z_bad = z0 + int(np.argmin(finite.reshape(data.shape[0], -1).all(axis=1)))
                    raise InputError(
                        f"{src.path}: holds {count} NaN/Inf voxels in slab z={z0}.. (first at z={z_bad}); "
                        "fix the reconstruction or pass --nonfinite zero"
                    )
                if count:
                    data = np.where(finite, data, np.float32(0)).astype(src.dtype)
            acc = StatsAccumulator(src.dtype)
            acc.add(data)
            level0.write((z0, 0, 0), data)
            if level1 is not None:
                level1.add(z0 // slab, downsample(data, method="mean"))
            return acc, count

        def collect(z0: int, fut: Future[tuple[StatsAccumulator, int]]) -> int:
            acc, count = fut.result()
            total.merge(acc)
            reporter.advance(1, voxels=slab * src.shape[1] * src.shape[2])
            return count

        reporter.start("ingest", len(starts))
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            pending: list[tuple[int, Future[tuple[StatsAccumulator, int]]]] = []
            for z0 in starts:
                if interrupt.requested() is not None:
                    break  # the slabs in flight finish (bounded: ``workers`` slabs), then we stop
                pending.append((z0, pool.submit(work, z0)))
                if len(pending) > workers:
                    bad += collect(*pending.pop(0))
            for z0, fut in pending:
                bad += collect(z0, fut)
        reporter.finish()
        # nothing partial is kept: atomic_directory removes the temporary output on the way out
        interrupt.check(f"ingest of {src.path} stopped before it finished; nothing was written, "
                        "run the same command to start it again")
        stats = total.result()
        levels = build_pyramid(group, method="mean", workers=workers, done=2 if in_memory else 1) if pyramid else 1
        group.attrs["ome"] = {
            "version": "0.5",
            "multiscales": [multiscales(levels, voxel_size=voxel_size, unit=unit, name=out.stem)],
        }
        set_studios_attrs(
            group,
            stats=stats.to_json(),
            provenance={
                "source": str(src.path),
                "format": src.format,
                "shape": list(src.shape),
                "dtype": src.dtype.name,
                "nonfinite_replaced": bad,
                "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "host": socket.gethostname(),
                "studios_version": __version__,
            },
        )
        set_studios_attrs(group, complete=True)
    logger.info("ingest done: %s, %d levels, mean %.4g std %.4g", out, levels, stats.mean, stats.std)
    return IngestResult(path=out, shape=src.shape, dtype=src.dtype.name, stats=stats, levels=levels, nonfinite=bad)


def ingest_array(volume: np.ndarray[Any, Any], output: str | os.PathLike[str], **kwargs: Any) -> IngestResult:
    """Ingest an in-memory (Z, Y, X) array (tests, demos, notebooks)."""
    from pipeline.io.sources import ArraySource

    src = ArraySource.__new__(ArraySource)
    src.path = Path("<memory>")
    src.format = "memory"
    src._array = volume
    src.shape = tuple(int(s) for s in volume.shape)  # type: ignore[assignment]
    if volume.ndim != 3:
        raise InputError(f"<memory>: array has shape {volume.shape}; a (z, y, x) volume is needed")
    src.dtype = np.dtype(volume.dtype)
    return ingest(src, output, **kwargs)
