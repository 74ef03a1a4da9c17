"""The per-block task that runs on a worker.

A task receives a :class:`SegmentJob` (paths and a few numbers) and a :class:`Block`
(coordinates); it never receives voxel data. It reads block + halo from the scan, normalises
with the global affine map, predicts, trims the halo (the model is valid, so its output *is*
the write box), writes its own output chunks, then its ledger record and done-marker.

The model is loaded once per worker process and cached.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from pipeline.core.errors import DiskFullError, StorageError
from pipeline.core.geometry import Box
from pipeline.core.tiling import Block
from pipeline.io.bundle import load_bundle
from pipeline.io.store import read_padded
from pipeline.models.base import StridefreeModel
from pipeline.segment.ledger import CONF_BINS, BlockRecord, Ledger
from pipeline.segment.predict import forward, numerics, quantize, resolve_device, to_labels

logger = logging.getLogger(__name__)

_CACHE: dict[tuple[str, str, str], StridefreeModel] = {}
_CACHE_LOCK = threading.Lock()
_THREADS_SET = False


@dataclass(frozen=True, slots=True)
class SegmentJob:
    """Everything a worker needs besides the block (all small, picklable values)."""

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
    fail_first_attempt: tuple[str, ...] = ()  # fault injection for tests: block ids
    hang_first_attempt: tuple[str, ...] = ()  # fault injection: first attempt sleeps 60 s
    kill_worker: tuple[str, ...] = ()  # fault injection: SIGKILL the worker process (as an OOM kill does)


def _model(job: SegmentJob) -> StridefreeModel:
    key = (job.model, job.fingerprint, job.device)
    with _CACHE_LOCK:
        model = _CACHE.get(key)
        if model is None:
            bundle = load_bundle(job.model)
            model = bundle.build().to(resolve_device(job.device))
            _CACHE[key] = model
            logger.info("loaded model %s on %s (pid %d)", job.model, job.device, os.getpid())
        return model


def _set_threads(job: SegmentJob) -> None:
    global _THREADS_SET
    if job.torch_threads and not _THREADS_SET:
        torch.set_num_threads(job.torch_threads)
        _THREADS_SET = True


def _open(job: SegmentJob) -> tuple[zarr.Array, zarr.Group]:
    scan = zarr.open_group(job.scan, mode="r")["0"]
    out = zarr.open_group(job.output, mode="r+")
    if not isinstance(scan, zarr.Array):
        raise StorageError(f"{job.scan}: '0' is not an array; re-ingest the scan")
    return scan, out


def _attempt_marker(job: SegmentJob, block: Block) -> Path:
    return Path(job.output).with_name(Path(job.output).name + ".faults") / block.id


#: Fault injection for tests: seconds each block sleeps before it runs.
DELAY_ENV = "STUDIOS_TEST_BLOCK_DELAY"


def _inject_fault(job: SegmentJob, block: Block) -> None:
    """Test hook: the first attempt of the named blocks raises, or hangs (state kept on disk)."""
    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
    if delay > 0:  # tests of walltime limits: blocks that take a known time on any machine
        time.sleep(delay)
    if block.id in job.kill_worker:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    if block.id not in job.fail_first_attempt and block.id not in job.hang_first_attempt:
        return
    marker = _attempt_marker(job, block)
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("first attempt\n")
        if block.id in job.hang_first_attempt:
            time.sleep(60)
            return
        raise RuntimeError(f"injected fault in block {block.id}")


def write_error(job: SegmentJob, block: Block, exc: OSError) -> StorageError:
    """The error for a failed write; a full disk is :class:`DiskFullError` (stops the run)."""
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return DiskFullError(
            f"{job.output}: writing block {block.id} failed ({exc.strerror}); free space on its filesystem "
            "and rerun the same command to resume"
        )
    return StorageError(f"{job.output}: writing block {block.id} failed ({exc}); check the output's filesystem")


def block_statistics(
    raw: np.ndarray[Any, Any], probs: np.ndarray[Any, Any], labels: np.ndarray[Any, Any], classes: int
) -> dict[str, float]:
    """Per-block sums used by QC: class counts, per-class intensity sums, confidence histogram.

    Args:
        raw: (Z, Y, X) raw intensities of the write box.
        probs: (K, Z, Y, X) float32 probabilities.
        labels: (Z, Y, X) uint8 labels 1..K.
    """
    flat = labels.reshape(-1).astype(np.int64) - 1
    counts = np.bincount(flat, minlength=classes)
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
        isum = np.bincount(flat, weights=values, minlength=classes)
        isum2 = np.bincount(flat, weights=values * values, minlength=classes)
    top = probs[0]  # max over classes, plane by plane (faster than max(axis=0) on forward()'s layout)
    for k in range(1, len(probs)):
        top = np.maximum(top, probs[k])
    conf, _ = np.histogram(top, bins=CONF_BINS, range=(0.0, 1.0))
    p = np.clip(np.moveaxis(probs, 0, -1), 1e-12, 1.0)  # classes last: forward()'s memory order
    plogp = np.log(p)
    plogp *= p
    entropy = -float(plogp.sum(dtype=np.float64))
    out: dict[str, float] = {}
    for k in range(classes):
        out[f"count_{k + 1}"] = float(counts[k])
        out[f"isum_{k + 1}"] = float(isum[k])
        out[f"isum2_{k + 1}"] = float(isum2[k])
    for i in range(CONF_BINS):
        out[f"conf_{i}"] = float(conf[i])
    out["entropy_sum"] = entropy
    return out


def run_block(job: SegmentJob, block: Block) -> dict[str, Any]:
    """Segment one block and record it in the ledger.

    Returns:
        ``{"id", "index", "skipped", "voxels", "read_s", "normalize_s", "forward_s", "write_s"}``.
    """
    _set_threads(job)
    _inject_fault(job, block)
    try:
        scan, out = _open(job)
    except (OSError, KeyError, ValueError) as exc:
        raise StorageError(f"block {block.id}: cannot open the scan or output ({exc})") from exc
    ledger = Ledger(out)
    labels_arr = out["0"]
    volume = tuple(scan.shape)
    write_slices = block.write.to_slices()
    t0 = time.perf_counter()

    if job.mask is not None:
        mask = np.asarray(zarr.open_group(job.mask, mode="r")["0"][write_slices])
        if not mask.any():
            record = BlockRecord(block.id, block.index, {"voxels": block.write.size, "skipped": 1})
            ledger.mark(record, skipped=True)
            logger.debug("block %s: outside the mask, skipped", block.id)
            return {"id": block.id, "index": block.index, "skipped": True, "voxels": block.write.size}

    try:
        raw = read_padded(scan, block, volume)
    except Exception as exc:  # codec errors from a corrupted chunk come in several types
        raise StorageError(
            f"{job.scan}: block {block.id} ({block.source(Box.from_shape(volume))}) could not be read "
            f"({type(exc).__name__}: {exc}); a chunk is corrupted or missing, re-ingest the scan"
        ) from None
    t_read = time.perf_counter() - t0
    if job.skip_constant:
        src = raw[block.write.relative_to(block.read).to_slices()]
        if src.min() == src.max():
            record = BlockRecord(block.id, block.index, {"voxels": block.write.size, "skipped": 1, "read_s": t_read})
            ledger.mark(record, skipped=True)
            logger.debug("block %s: constant input, skipped", block.id)
            return {"id": block.id, "index": block.index, "skipped": True, "voxels": block.write.size}

    model = _model(job)
    device = resolve_device(job.device)
    with numerics(exact=job.exact):
        t1 = time.perf_counter()
        probs = forward(model, raw, offset=job.offset, scale=job.scale, device=device, precision=job.precision)
        t_fwd = time.perf_counter() - t1
    t2 = time.perf_counter()
    labels = to_labels(probs)
    inner = raw[block.write.relative_to(block.read).to_slices()]
    stats = block_statistics(inner, probs, labels, job.classes)
    t_norm = time.perf_counter() - t2  # post-processing; normalisation is fused into forward
    t3 = time.perf_counter()
    try:
        labels_arr[write_slices] = labels
        if job.probabilities:
            out["probabilities/0"][(slice(None), *write_slices)] = quantize(probs)
    except OSError as exc:
        raise write_error(job, block, exc) from None
    t_write = time.perf_counter() - t3
    values = {
        "voxels": float(block.write.size),
        "read_s": t_read,
        "normalize_s": t_norm,
        "forward_s": t_fwd,
        "write_s": t_write,
        "skipped": 0.0,
        **stats,
    }
    try:
        ledger.mark(BlockRecord(block.id, block.index, values))
    except OSError as exc:
        raise write_error(job, block, exc) from None
    logger.debug("block %s: %d voxels in %.3fs", block.id, block.write.size, time.perf_counter() - t0)
    return {"id": block.id, "index": block.index, "skipped": False, **values}
