"""The per-block task that runs on a worker.

A task receives a :class:`SegmentJob` (paths and a few numbers) and a :class:`Block`
(coordinates); it never receives voxel data. Its path, one step per module::

    store.read_padded -> predict.forward_logits (the model is valid: its output *is* the write box)
      -> post.post_block (softmax, labels, confidence, entropy, uint8 probabilities, one pass)
      -> class_sums -> store.write_box (labels, probabilities) -> Ledger.mark (stats, then marker)

Each worker process keeps a small cache (:class:`WorkerCache`): the model per (bundle,
fingerprint, device), and the open arrays (scan, mask, outputs, ledger) per run. A run is
identified by ``SegmentJob.run_id`` (new for every ``segment()`` call), so a new run or a
replaced output never gets the handles of an earlier one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr

from pipeline.core.errors import StorageError
from pipeline.core.geometry import Box
from pipeline.core.tiling import Block
from pipeline.io.bundle import load_bundle
from pipeline.io.outputs import storage_error
from pipeline.io.store import read_padded, write_box
from pipeline.models.base import StridefreeModel
from pipeline.segment.ledger import CONF_BINS, BlockStats, Ledger
from pipeline.segment.post import post_block
from pipeline.segment.predict import forward_logits, numerics, resolve_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SegmentJob:
    """Everything a worker needs besides the block (all small, picklable values).

    ``run_id`` is unique per ``segment()`` call; it keys the worker's cache of open arrays.
    """

    scan: str
    output: str
    model: str
    fingerprint: str
    classes: int
    offset: float
    scale: float
    probabilities: bool = False
    device: str = "cpu"
    exact: bool = False
    skip_constant: bool = False
    mask: str | None = None
    torch_threads: int = 0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; see docs/gpu.md)
    run_id: str = ""


@dataclass(frozen=True, slots=True)
class OpenRun:
    """The arrays one run's blocks read and write, opened once per worker process."""

    scan: zarr.Array
    mask: zarr.Array | None
    labels: zarr.Array
    probabilities: zarr.Array | None
    ledger: Ledger


def _array(group: zarr.Group, name: str, where: str) -> zarr.Array:
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise StorageError(f"{where}: {name!r} is not an array; rewrite it with --overwrite or re-ingest")
    return node


def open_run(job: SegmentJob) -> OpenRun:
    """Open the scan, mask, output arrays and ledger of ``job``."""
    out = zarr.open_group(job.output, mode="r+")
    mask = _array(zarr.open_group(job.mask, mode="r"), "0", job.mask) if job.mask is not None else None
    return OpenRun(
        scan=_array(zarr.open_group(job.scan, mode="r"), "0", job.scan),
        mask=mask,
        labels=_array(out, "0", job.output),
        probabilities=_array(out, "probabilities/0", job.output) if job.probabilities else None,
        ledger=Ledger(out),
    )


class WorkerCache:
    """Per-process cache of models and of open runs (least recently used first out).

    Args:
        runs: open runs kept (a worker serves one run at a time; a few cover overlapping runs).
        models: models kept.
    """

    def __init__(self, *, runs: int = 4, models: int = 4) -> None:
        self._lock = threading.Lock()
        self._runs: OrderedDict[tuple[str, ...], OpenRun] = OrderedDict()
        self._models: OrderedDict[tuple[str, str, str], StridefreeModel] = OrderedDict()
        self._sizes = {"runs": runs, "models": models}
        self._threads_set = False
        self.misses = {"runs": 0, "models": 0}

    def run(self, job: SegmentJob) -> OpenRun:
        key = (job.run_id, job.scan, job.output, job.mask or "", str(job.probabilities))
        with self._lock:
            hit = self._runs.get(key)
            if hit is None:
                hit = open_run(job)
                self.misses["runs"] += 1
                self._runs[key] = hit
                while len(self._runs) > self._sizes["runs"]:
                    self._runs.popitem(last=False)
            self._runs.move_to_end(key)
            return hit

    def model(self, job: SegmentJob) -> StridefreeModel:
        key = (job.model, job.fingerprint, job.device)
        with self._lock:
            model = self._models.get(key)
            if model is None:
                model = load_bundle(job.model).build().to(resolve_device(job.device))
                self.misses["models"] += 1
                self._models[key] = model
                while len(self._models) > self._sizes["models"]:
                    self._models.popitem(last=False)
                logger.info("loaded model %s on %s (pid %d)", job.model, job.device, os.getpid())
            self._models.move_to_end(key)
            return model

    def set_threads(self, job: SegmentJob) -> None:
        """``torch.set_num_threads(job.torch_threads)`` once per process (0: leave torch's default)."""
        with self._lock:
            if job.torch_threads and not self._threads_set:
                torch.set_num_threads(job.torch_threads)
                self._threads_set = True

    def clear(self) -> None:
        with self._lock:
            self._runs.clear()
            self._models.clear()


CACHE = WorkerCache()


def class_sums(
    raw: np.ndarray[Any, Any], labels: np.ndarray[Any, Any], classes: int
) -> tuple[np.ndarray[Any, np.dtype[np.float64]], ...]:
    """(counts, isum, isum2): per-class voxel counts and sums of raw intensity and its square.

    Args:
        raw: (Z, Y, X) raw intensities of the write box.
        labels: (Z, Y, X) uint8 labels 1..K.
    """
    flat = labels.reshape(-1).astype(np.int64) - 1
    counts = np.bincount(flat, minlength=classes).astype(np.float64)
    isum: np.ndarray[Any, np.dtype[np.float64]]
    isum2: np.ndarray[Any, np.dtype[np.float64]]
    lo, hi = (int(raw.min()), int(raw.max())) if raw.dtype.kind in "ui" and raw.dtype.itemsize <= 2 else (0, -1)
    span = hi - lo + 1
    if span > 0 and classes * span <= 1 << 22:
        # integer scans: a per-class intensity histogram gives the same sums (exact integers in
        # float64) as weighted bincounts, about 5x faster on a 256^3 block
        flat *= span
        flat += raw.reshape(-1) - np.int64(lo)
        hist = np.bincount(flat, minlength=classes * span).reshape(classes, span).astype(np.float64)
        v = np.arange(lo, hi + 1, dtype=np.float64)
        isum, isum2 = hist @ v, hist @ (v * v)
    else:
        values = raw.reshape(-1).astype(np.float64)
        isum = np.bincount(flat, weights=values, minlength=classes).astype(np.float64)
        isum2 = np.bincount(flat, weights=values * values, minlength=classes).astype(np.float64)
    return counts, isum, isum2


def block_stats(
    raw: np.ndarray[Any, Any], probs: np.ndarray[Any, Any], labels: np.ndarray[Any, Any], classes: int
) -> BlockStats:
    """Per-block sums used by QC from numpy probabilities (the reference of :func:`post_block`).

    Args:
        raw: (Z, Y, X) raw intensities of the write box.
        probs: (K, Z, Y, X) float32 probabilities.
        labels: (Z, Y, X) uint8 labels 1..K.

    Returns:
        The block's stats without stage times (the caller adds them).
    """
    counts, isum, isum2 = class_sums(raw, labels, classes)
    top = probs[0]  # max over classes, plane by plane (faster than max(axis=0) on forward()'s layout)
    for k in range(1, len(probs)):
        top = np.maximum(top, probs[k])
    conf, _ = np.histogram(top, bins=CONF_BINS, range=(0.0, 1.0))
    p = np.clip(np.moveaxis(probs, 0, -1), 1e-12, 1.0)  # classes last: forward()'s memory order
    plogp = np.log(p)
    plogp *= p
    entropy = -float(plogp.sum(dtype=np.float64))
    return BlockStats(classes=classes, voxels=float(labels.size), counts=counts, isum=isum, isum2=isum2,
                      confidence=conf.astype(np.float64), entropy_sum=entropy)


def _skip(run: OpenRun, job: SegmentJob, block: Block, why: str, *, read_s: float = 0.0) -> dict[str, Any]:
    stats = BlockStats(classes=job.classes, voxels=float(block.write.size), skipped=1.0, read_s=read_s)
    try:
        run.ledger.mark(block, stats)
    except OSError as exc:
        raise storage_error(job.output, exc, what=f"the ledger of block {block.id}") from None
    logger.debug("block %s: %s, skipped", block.id, why)
    return {"id": block.id, "index": block.index, "stats": stats}


def run_block(job: SegmentJob, block: Block, *, cache: WorkerCache = CACHE) -> dict[str, Any]:
    """Segment one block and record it in the ledger.

    Returns:
        ``{"id": str, "index": tuple, "stats": BlockStats}``.
    """
    cache.set_threads(job)
    try:
        run = cache.run(job)
    except (OSError, KeyError, ValueError) as exc:
        raise StorageError(f"block {block.id}: cannot open the scan or output ({exc})") from exc
    write_slices = block.write.to_slices()
    volume = tuple(run.scan.shape)
    t0 = time.perf_counter()
    if run.mask is not None and not np.asarray(run.mask[write_slices]).any():
        return _skip(run, job, block, "outside the mask")
    try:
        raw = read_padded(run.scan, block, volume)
    except Exception as exc:  # codec errors from a corrupted chunk come in several types
        raise StorageError(
            f"{job.scan}: block {block.id} ({block.source(Box.from_shape(volume))}) could not be read "
            f"({type(exc).__name__}: {exc}); a chunk is corrupted or missing, re-ingest the scan"
        ) from None
    t_read = time.perf_counter() - t0
    inner = raw[block.write.relative_to(block.read).to_slices()]
    if job.skip_constant and inner.min() == inner.max():
        return _skip(run, job, block, "constant input", read_s=t_read)

    model = cache.model(job)
    device = resolve_device(job.device)
    t1 = time.perf_counter()
    with numerics(exact=job.exact):
        logits = forward_logits(model, raw, offset=job.offset, scale=job.scale, device=device,
                                precision=job.precision)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # forward_s is the forward's time, not the post's
        t_fwd = time.perf_counter() - t1
        t2 = time.perf_counter()
        # labels, confidence, entropy (and uint8 probabilities) in one pass over the logits
        post = post_block(logits, probabilities=run.probabilities is not None)
    del logits
    counts, isum, isum2 = class_sums(inner, post.labels, job.classes)
    partial = BlockStats(classes=job.classes, voxels=float(post.labels.size), counts=counts, isum=isum,
                         isum2=isum2, confidence=post.confidence, entropy_sum=post.entropy_sum)
    t_post = time.perf_counter() - t2
    t3 = time.perf_counter()
    what = f"block {block.id}"
    write_box(run.labels, block.write, post.labels, where=job.output, what=what)
    if run.probabilities is not None and post.probabilities is not None:
        write_box(run.probabilities, block.write, post.probabilities, where=job.output, what=what)
    t_write = time.perf_counter() - t3
    stats = dataclasses.replace(partial, read_s=t_read, normalize_s=t_post, forward_s=t_fwd, write_s=t_write)
    try:
        run.ledger.mark(block, stats)
    except OSError as exc:
        raise storage_error(job.output, exc, what=f"the ledger of block {block.id}") from None
    logger.debug("block %s: %d voxels in %.3fs", block.id, block.write.size, time.perf_counter() - t0)
    return {"id": block.id, "index": block.index, "stats": stats}
