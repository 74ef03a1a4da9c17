"""Blockwise segmentation of a scan: plan, dispatch, stitch by trimming halos, summarise.

Output layout (OME-Zarr on zarr v3)::

    seg.zarr/
      0/                 (Z, Y, X) uint8 labels: 0 = not computed, 1..K = classes
      1/, 2/ ...         label pyramid (nearest) for viewers
      probabilities/0    (K, Z, Y, X) uint8 round(255 p), with --probabilities
      ledger/done        per-block done markers; ledger/stats per-block records
      zarr.json          attributes: ome multiscales, studios {kind, classes, complete, run, ...}

Resume: an unfinished output made with the same scan, model and blocks is continued (finished
blocks are skipped); ``force`` recomputes every block; ``overwrite`` replaces a finished one.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import shutil
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline import __version__
from pipeline.compute.cluster import ClusterSpec, auto_block, open_client, preflight
from pipeline.compute.executors import DaskExecutor, Executor, RunOutcome, SerialExecutor
from pipeline.core.errors import (
    BlockFailedError,
    ConfigError,
    DiskFullError,
    InputError,
    OutputExistsError,
    StudiosError,
)
from pipeline.core.interrupt import RESUME_HINT, Interrupted
from pipeline.core.progress import NullReporter, Reporter
from pipeline.core.tiling import grid_shape, plan_blocks
from pipeline.io.bundle import ModelBundle, load_bundle, save_bundle
from pipeline.io.outputs import OutputLock, check_output, storage_error
from pipeline.io.store import (
    DEFAULT_CHUNKS,
    build_pyramid,
    create_array,
    create_group,
    fit_chunks,
    multiscales,
    open_image,
    set_studios_attrs,
)
from pipeline.segment.ledger import Ledger, check_manifest, field_names
from pipeline.segment.predict import PRECISIONS, resolve_device
from pipeline.segment.worker import SegmentJob, run_block

logger = logging.getLogger(__name__)

#: CPU write-block edge. On CPUs 128^3 blocks (146^3 with the default halo, ~190 MiB of
#: activations) run faster per voxel than 256^3 (1.26 GiB) despite the larger halo share: the
#: working set stays closer to the caches (bench/throughput.py; docs/performance.md).
DEFAULT_BLOCK = 128


@dataclass(frozen=True)
class SegmentResult:
    """Summary of a segmentation run (also stored as ``studios.run`` in the output)."""

    path: Path
    shape: tuple[int, ...]
    classes: tuple[str, ...]
    blocks_total: int
    blocks_done: int
    blocks_skipped: int
    blocks_resumed: int
    failed: dict[str, str]
    seconds: float
    voxels_per_second: float
    stage_seconds: dict[str, float] = field(default_factory=dict)
    class_fractions: dict[str, float] = field(default_factory=dict)
    qc: Path | None = None  # report.html of the QC run at the end (None: no QC)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "shape": list(self.shape),
            "classes": list(self.classes),
            "blocks_total": self.blocks_total,
            "blocks_done": self.blocks_done,
            "blocks_skipped": self.blocks_skipped,
            "blocks_resumed": self.blocks_resumed,
            "failed": dict(self.failed),
            "seconds": round(self.seconds, 3),
            "voxels_per_second": round(self.voxels_per_second, 1),
            "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
            "class_fractions": self.class_fractions,
            "qc": str(self.qc) if self.qc else None,
        }


def _block_shape(block: int | Sequence[int], chunks: Sequence[int]) -> tuple[int, int, int]:
    shape = (block,) * 3 if isinstance(block, int) else tuple(int(b) for b in block)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"block shape {block!r} must be one or three positive integers")
    return shape  # type: ignore[return-value]


def segment(
    scan: str | os.PathLike[str],
    model: str | os.PathLike[str] | ModelBundle,
    output: str | os.PathLike[str],
    *,
    block: int | Sequence[int] | None = None,
    chunks: Sequence[int] | None = None,
    cluster: ClusterSpec | None = None,
    executor: Executor | None = None,
    probabilities: bool = False,
    device: str | None = None,
    precision: str = "fp32",
    exact: bool = False,
    skip_constant: bool = False,
    mask: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    force: bool = False,
    take_over_lock: bool = False,
    retries: int = 2,
    reporter: Reporter | None = None,
    pyramid: bool = True,
    fail_first_attempt: Sequence[str] = (),
    hang_first_attempt: Sequence[str] = (),
    kill_worker: Sequence[str] = (),
    timeout: float | None = None,
    qc: bool = True,
) -> SegmentResult:
    """Segment ``scan`` with ``model`` into ``output``.

    Args:
        scan: an ingested scan (``studios ingest``).
        model: a bundle folder or an in-memory :class:`ModelBundle`.
        output: the ``.zarr`` to write.
        block: write-box edge (or (z, y, x)); a multiple of the output chunks. Default: chosen
            from free GPU memory when blocks run on a GPU, else :data:`DEFAULT_BLOCK` (128).
        chunks: output chunk shape; default ``min(block, 128)`` per axis.
        cluster: where blocks run (default: a LocalCluster); ignored if ``executor`` is given.
        executor: run blocks with this executor (e.g. :class:`SerialExecutor`).
        probabilities: also write ``probabilities/0`` (K, Z, Y, X) uint8.
        device: torch device of the blocks; default ``cuda`` on GPU clusters, else ``cpu``.
        precision: ``fp32`` (default), ``bf16`` or ``fp16`` autocast (GPU; see docs/gpu.md).
        exact: bit-identical to the whole-volume reference (oneDNN off; slower on CPU).
        skip_constant: blocks whose input is constant (air) are written as 0 and skipped.
        mask: a studios image; blocks where it is all 0 are skipped.
        overwrite: replace a finished output. force: recompute all blocks of an unfinished one.
        retries: extra attempts per block; timeout: seconds before a running block's attempt is
            abandoned and retried (Dask executors only).
        qc: after a complete run, write ``qc/qc.json`` and ``qc/report.html`` into the output
            (:func:`pipeline.qc.run.run_qc`); a QC failure is logged and recorded, never fatal.

    Returns:
        The run summary. Raises :class:`BlockFailedError` if blocks kept failing; the output
        then stays marked incomplete and a rerun resumes it.
    """
    reporter = reporter or NullReporter()
    t_start = time.perf_counter()
    out = Path(output)
    image = open_image(scan, kind="scan")
    bundle = model if isinstance(model, ModelBundle) else load_bundle(model)
    mask_image = open_image(mask) if mask is not None else None
    if mask_image is not None and mask_image.shape != image.shape:
        raise InputError(f"{mask}: mask shape {mask_image.shape} differs from the scan {image.shape}; give a matching mask")
    spec = cluster or ClusterSpec()
    device = device or (spec.device if executor is None else "cpu")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is unknown; use one of {', '.join(PRECISIONS)}")
    if exact and precision != "fp32":
        raise InputError(f"exact=True needs precision fp32, not {precision}; drop --exact or --precision")
    if executor is None:
        preflight(spec)  # dask-cuda / GPUs / sbatch present, before any output is written
    if executor is not None or spec.kind == "local":
        resolve_device(device)  # blocks run here (or on this machine): the device must exist
    if block is None:
        block = DEFAULT_BLOCK
        if device.startswith("cuda"):
            gpu_chunks = fit_chunks(chunks or DEFAULT_CHUNKS, image.shape)
            block = auto_block(bundle.build(), chunks=gpu_chunks, volume=image.shape, precision=precision) or block
    block_shape = _block_shape(block, chunks or DEFAULT_CHUNKS)
    chunk_shape = fit_chunks(chunks or tuple(min(b, c) for b, c in zip(block_shape, DEFAULT_CHUNKS, strict=True)), image.shape)
    blocks = plan_blocks(image.shape, block_shape, bundle.halo, chunk_shape=chunk_shape)
    grid = grid_shape(image.shape, block_shape)
    offset, scale = bundle.normalization.affine(image.stats)
    manifest = {
        "scan": str(Path(scan).resolve()),
        "model_fingerprint": bundle.fingerprint,
        "block": list(block_shape),
        "chunks": list(chunk_shape),
        "probabilities": probabilities,
        "exact": exact,
        "precision": precision,
    }

    # before the lock file is made beside it: never inside the scan or another zarr store
    check_output(out, inputs=[Path(scan), *([Path(mask)] if mask is not None else [])], overwrite=True)
    try:
        with OutputLock(out, take_over=take_over_lock):
            group, resumed = _prepare_output(out, manifest, overwrite=overwrite, inputs=[Path(scan)])
            if not resumed:
                _create_output(group, image.shape, chunk_shape, bundle, grid, probabilities=probabilities)
                set_studios_attrs(group, ledger=manifest)
            model_dir = out / "model"
            if not (model_dir / "model.json").exists():
                save_bundle(bundle, model_dir)
            ledger = Ledger(group)
            todo = blocks if force else ledger.pending(blocks)
            n_resumed = len(blocks) - len(todo)
            if n_resumed:
                logger.info("resuming %s: %d of %d blocks already done, skipped", out, n_resumed, len(blocks))
            job = SegmentJob(
                scan=str(image.path),
                output=str(out),
                model=str(model_dir),
                fingerprint=bundle.fingerprint,
                classes=len(bundle.classes),
                offset=offset,
                scale=scale,
                probabilities=probabilities,
                device=device,
                exact=exact,
                skip_constant=skip_constant,
                mask=str(mask_image.path) if mask_image else None,
                torch_threads=spec.torch_threads(),
                precision=precision,
                fail_first_attempt=tuple(fail_first_attempt),
                hang_first_attempt=tuple(hang_first_attempt),
                kill_worker=tuple(kill_worker),
            )
            outcome = _dispatch(
                job, todo, executor=executor, cluster=spec, retries=retries, reporter=reporter, timeout=timeout
            )
            result = _finish(group, out, image.shape, bundle, ledger, blocks, outcome, n_resumed, t_start, pyramid)
            if qc and not result.failed and result.blocks_done == result.blocks_total:
                result = _quality_control(group, out, Path(scan), result, device=device)
    except StudiosError:
        raise
    except OSError as exc:
        raise storage_error(out, exc) from None
    if outcome.interrupted is not None and result.blocks_done < result.blocks_total:
        raise Interrupted(
            f"interrupted: {result.blocks_done}/{result.blocks_total} blocks done; {RESUME_HINT}", outcome.interrupted
        )
    if outcome.failed:
        log = _write_failure_log(out, outcome)
        if outcome.fatal:
            raise DiskFullError(outcome.fatal)
    if result.failed:
        ids = ", ".join(sorted(result.failed)[:10])
        first = next(iter(result.failed.values()))
        raise BlockFailedError(
            f"{out}: {len(result.failed)} of {len(blocks)} blocks failed ({ids}); first error: {first}; "
            f"the output is marked incomplete, rerun the same command to retry them; tracebacks in {log}",
            result.failed,
        )
    return result


def _write_failure_log(out: Path, outcome: RunOutcome) -> Path:
    """``<output>.failed.log``: each failed block's id, error and traceback (replaced per run)."""
    log = out.with_name(out.name + ".failed.log")
    stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    parts = [f"# {stamp} {out}: {len(outcome.failed)} failed block(s)\n"]
    for block_id in sorted(outcome.failed):
        parts.append(f"\n## block {block_id}: {outcome.failed[block_id]}\n{outcome.tracebacks.get(block_id, '')}")
    try:
        log.write_text("".join(parts))
    except OSError as exc:
        logger.error("could not write %s: %s", log, exc)
    return log


def _prepare_output(
    out: Path, manifest: dict[str, Any], *, overwrite: bool, inputs: Sequence[Path]
) -> tuple[zarr.Group, bool]:
    """Open an unfinished output to resume, or create a fresh one. Returns (group, resumed)."""
    if out.exists():
        try:
            group = zarr.open_group(str(out), mode="r+")
            attrs = dict(group.attrs.get("studios", {}))
        except Exception:
            attrs = {}
            group = None
        finished = attrs.get("complete", False)
        if group is not None and attrs.get("kind") == "segmentation" and not finished and not overwrite:
            check_manifest(attrs.get("ledger"), manifest, str(out))
            return group, True
        if not overwrite:
            what = "a finished segmentation" if finished else "something that is not a studios segmentation"
            raise OutputExistsError(f"{out}: already holds {what}; pass --overwrite to replace it or choose another path")
        check_output(out, inputs=inputs, overwrite=True)
        shutil.rmtree(out)
    else:
        check_output(out, inputs=inputs, overwrite=overwrite)
    return create_group(out), False


def _create_output(
    group: zarr.Group,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    bundle: ModelBundle,
    grid: Sequence[int],
    *,
    probabilities: bool,
) -> None:
    set_studios_attrs(group, kind="segmentation", complete=False, classes=list(bundle.classes))
    create_array(group, "0", shape=shape, dtype="uint8", chunks=chunks)
    if probabilities:
        probs = group.create_group("probabilities")
        create_array(
            probs, "0", shape=(len(bundle.classes), *shape), dtype="uint8",
            chunks=(len(bundle.classes), *chunks), dimension_names=("c", "z", "y", "x"),
        )
    Ledger.create(group, grid, field_names(len(bundle.classes)))


def _dispatch(
    job: SegmentJob,
    blocks: Sequence[Any],
    *,
    executor: Executor | None,
    cluster: ClusterSpec,
    retries: int,
    reporter: Reporter,
    timeout: float | None = None,
) -> RunOutcome:
    if not blocks:
        return RunOutcome()
    if executor is not None:
        return executor.run(run_block, job, blocks, reporter=reporter)
    with open_client(cluster, tasks=len(blocks)) as client:
        return DaskExecutor(client, retries=retries, resources=cluster.resources, timeout=timeout).run(
            run_block, job, blocks, reporter=reporter
        )


def _finish(
    group: zarr.Group,
    out: Path,
    shape: tuple[int, ...],
    bundle: ModelBundle,
    ledger: Ledger,
    blocks: Sequence[Any],
    outcome: RunOutcome,
    n_resumed: int,
    t_start: float,
    pyramid: bool,
) -> SegmentResult:
    totals = ledger.totals()
    mask = ledger.done_mask()
    n_done = int((mask > 0).sum())
    n_skipped = int((mask == 2).sum())
    stage = {k: totals.get(k, 0.0) for k in ("read_s", "normalize_s", "forward_s", "write_s")}
    counts = np.array([totals.get(f"count_{k + 1}", 0.0) for k in range(len(bundle.classes))])
    fractions = {c: float(n / counts.sum()) if counts.sum() else 0.0 for c, n in zip(bundle.classes, counts, strict=True)}
    seconds = time.perf_counter() - t_start
    computed_voxels = sum(r.get("voxels", 0) for r in outcome.results)
    result = SegmentResult(
        path=out,
        shape=shape,
        classes=bundle.classes,
        blocks_total=len(blocks),
        blocks_done=n_done,
        blocks_skipped=n_skipped,
        blocks_resumed=n_resumed,
        failed=dict(outcome.failed),
        seconds=seconds,
        voxels_per_second=computed_voxels / outcome.seconds if outcome.seconds else 0.0,
        stage_seconds={**stage, "dispatch": outcome.seconds},
        class_fractions=fractions,
    )
    run = {**result.to_json(), "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
           "host": socket.gethostname(), "studios_version": __version__, "model": bundle.to_json()["provenance"]}
    if outcome.failed or n_done < len(blocks):
        set_studios_attrs(group, run=run, complete=False)
        return result
    levels = build_pyramid(group, method="nearest") if pyramid else 1
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [multiscales(levels, voxel_size=_voxel_size(group, out), name=out.stem)],
    }
    set_studios_attrs(group, run=run)
    set_studios_attrs(group, complete=True)
    return result


def _quality_control(
    group: zarr.Group, out: Path, scan: Path, result: SegmentResult, *, device: str
) -> SegmentResult:
    """Run QC into ``<output>/qc`` (seam check on the run's device); record it in ``studios.run.qc``."""
    from pipeline.qc.run import run_qc

    try:
        report = run_qc(out, scan=scan, out_dir=out / "qc", device=device)
    except Exception as exc:  # the segmentation is complete and valid; QC trouble must not lose it
        logger.warning("%s: quality control failed: %s: %s", out, type(exc).__name__, exc)
        info: dict[str, Any] = {"error": f"{type(exc).__name__}: {exc}"}
        result = dataclasses.replace(result, qc=None)
    else:
        info = {"json": str(report.json_path), "report": str(report.report_path), "status": report.status,
                "warnings": len(report.warnings)}
        result = dataclasses.replace(result, qc=report.report_path)
    set_studios_attrs(group, run={**dict(group.attrs.get("studios", {}).get("run", {})), "qc": info})
    return result


def _voxel_size(group: zarr.Group, out: Path) -> tuple[float, float, float]:
    scan = group.attrs.get("studios", {}).get("ledger", {}).get("scan")
    if scan:
        try:
            return open_image(scan, require_complete=False).voxel_size
        except InputError:
            pass
    return (1.0, 1.0, 1.0)


def serial(retries: int = 2) -> SerialExecutor:
    """The in-process executor (debugging, tests)."""
    return SerialExecutor(retries=retries)
