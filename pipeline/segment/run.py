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
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zarr

from pipeline import __version__
from pipeline.compute.cluster import ClusterSpec, open_client, preflight
from pipeline.compute.executors import DaskExecutor, Executor, RunOutcome, SerialExecutor
from pipeline.core.errors import (
    BlockFailedError,
    DiskFullError,
    InputError,
    StudiosError,
)
from pipeline.core.interrupt import RESUME_HINT, Interrupted
from pipeline.core.progress import NullReporter, Reporter
from pipeline.io.bundle import ModelBundle, load_bundle
from pipeline.io.labels import mark_segmentation
from pipeline.io.outputs import OutputLock, check_output, storage_error
from pipeline.io.store import (
    Image,
    build_pyramid,
    multiscales,
    open_image,
    set_studios_attrs,
    studios_attrs,
)
from pipeline.segment.ledger import SKIPPED, BlockStats, Ledger
from pipeline.segment.output import open_output
from pipeline.segment.plan import DEFAULT_BLOCK, make_plan, manifest
from pipeline.segment.precision import resolve_precision
from pipeline.segment.predict import resolve_device
from pipeline.segment.worker import SegmentJob, run_block

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_BLOCK", "SegmentResult", "segment", "serial"]


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


@dataclass(frozen=True)
class _Inputs:
    """Validated inputs of a run."""

    image: Image
    bundle: ModelBundle
    mask: Image | None
    spec: ClusterSpec
    device: str
    precision: str  # resolved: fp32, bf16 or fp16


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
        precision: ``fp32`` (default), ``bf16``, ``fp16`` (GPU autocast; see docs/gpu.md), or
            ``auto``: ``bf16`` on CPUs with a bf16 unit (AMX-BF16 or AVX512-BF16), else ``fp32``,
            decided on the machine that calls segment(). Not the default: bf16 missed the label
            agreement criterion on one real scan (docs/exactness.md). ``exact`` makes ``auto``
            ``fp32``; ``exact`` with ``bf16``/``fp16`` is an error.
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
    inputs = _validate(scan, model, mask, cluster=cluster, executor=executor, device=device,
                       precision=precision, exact=exact)
    bundle, image = inputs.bundle, inputs.image
    precision = inputs.precision
    plan = make_plan(image.shape, bundle.halo, block=block, chunks=chunks, device=inputs.device,
                     model=bundle.build, precision=precision)
    wanted = manifest(plan, scan=scan, fingerprint=bundle.fingerprint, probabilities=probabilities, exact=exact,
                      precision=precision)
    try:
        # before the lock file is made beside it: never inside the scan or another zarr store
        check_output(out, inputs=[Path(scan), *([Path(mask)] if mask is not None else [])], overwrite=True)
        with OutputLock(out, take_over=take_over_lock):
            group, ledger, model_dir = open_output(out, plan, wanted, bundle, Path(scan), overwrite=overwrite,
                                                    probabilities=probabilities)
            todo = list(plan.blocks) if force else ledger.pending(plan.blocks)
            n_resumed = len(plan.blocks) - len(todo)
            if n_resumed:
                logger.info("resuming %s: %d of %d blocks already done, skipped", out, n_resumed, len(plan.blocks))
            job = _job(inputs, out, model_dir, probabilities=probabilities, exact=exact, precision=precision,
                       skip_constant=skip_constant)
            outcome = _dispatch(job, todo, executor=executor, cluster=inputs.spec, retries=retries,
                                reporter=reporter, timeout=timeout)
            result = _finish(group, out, image.shape, bundle, ledger, plan.blocks, outcome, n_resumed, t_start,
                             pyramid)
            if qc and not result.failed and result.blocks_done == result.blocks_total:
                result = _quality_control(group, out, Path(scan), result, device=inputs.device)
    except StudiosError:
        raise
    except OSError as exc:
        raise storage_error(out, exc) from None
    if outcome.interrupted is not None and result.blocks_done < result.blocks_total:
        raise Interrupted(
            f"interrupted: {result.blocks_done}/{result.blocks_total} blocks done; {RESUME_HINT}", outcome.interrupted
        )
    _raise_failures(out, outcome, result, len(plan.blocks))
    return result


def _validate(
    scan: str | os.PathLike[str],
    model: str | os.PathLike[str] | ModelBundle,
    mask: str | os.PathLike[str] | None,
    *,
    cluster: ClusterSpec | None,
    executor: Executor | None,
    device: str | None,
    precision: str,
    exact: bool,
) -> _Inputs:
    """Open the scan, model and mask; check the device and numerics, before any output is written."""
    image = open_image(scan, kind="scan")
    bundle = model if isinstance(model, ModelBundle) else load_bundle(model)
    mask_image = open_image(mask) if mask is not None else None
    if mask_image is not None and mask_image.shape != image.shape:
        raise InputError(f"{mask}: mask shape {mask_image.shape} differs from the scan {image.shape}; "
                         "give a matching mask")
    spec = cluster or ClusterSpec()
    device = device or (spec.device if executor is None else "cpu")
    resolved = resolve_precision(precision, device, exact=exact)  # unknown name / exact with bf16: errors
    if exact and precision == "auto":
        logger.warning("precision auto with exact: running fp32 (exact mode is always fp32)")
    elif resolved != precision:
        logger.info("precision %s: running %s on device %s", precision, resolved, device)
    if executor is None:
        preflight(spec)  # dask-cuda / GPUs / sbatch present, before any output is written
    if executor is not None or spec.kind == "local":
        resolve_device(device)  # blocks run here (or on this machine): the device must exist
    return _Inputs(image=image, bundle=bundle, mask=mask_image, spec=spec, device=device, precision=resolved)


def _job(
    inputs: _Inputs, out: Path, model_dir: Path, *, probabilities: bool, exact: bool, precision: str,
    skip_constant: bool,
) -> SegmentJob:
    bundle = inputs.bundle
    offset, scale = bundle.normalization.affine(inputs.image.stats)
    return SegmentJob(
        scan=str(inputs.image.path),
        output=str(out),
        model=str(model_dir),
        fingerprint=bundle.fingerprint,
        classes=len(bundle.classes),
        offset=offset,
        scale=scale,
        probabilities=probabilities,
        device=inputs.device,
        exact=exact,
        skip_constant=skip_constant,
        mask=str(inputs.mask.path) if inputs.mask else None,
        torch_threads=inputs.spec.torch_threads(),
        precision=precision,
        run_id=uuid.uuid4().hex,
    )


def _raise_failures(out: Path, outcome: RunOutcome, result: SegmentResult, n_blocks: int) -> None:
    """Write the failure log and raise :class:`DiskFullError` / :class:`BlockFailedError` if blocks failed."""
    log = _write_failure_log(out, outcome) if outcome.failed else None
    if outcome.fatal:
        raise DiskFullError(outcome.fatal)
    if result.failed:
        ids = ", ".join(sorted(result.failed)[:10])
        first = next(iter(result.failed.values()))
        raise BlockFailedError(
            f"{out}: {len(result.failed)} of {n_blocks} blocks failed ({ids}); first error: {first}; "
            f"the output is marked incomplete, rerun the same command to retry them; tracebacks in {log}",
            result.failed,
        )


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
    n_skipped = int((mask == SKIPPED).sum())
    counts = totals.counts
    total = float(counts.sum())
    fractions = {c: float(n) / total if total else 0.0 for c, n in zip(bundle.classes, counts, strict=True)}
    seconds = time.perf_counter() - t_start
    computed_voxels = sum(_stats(r).voxels for r in outcome.results)
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
        stage_seconds={**totals.stage_seconds, "dispatch": outcome.seconds},
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
    mark_segmentation(group, out, bundle.classes)  # image-label metadata, listed in the scan's labels/
    set_studios_attrs(group, run=run)
    set_studios_attrs(group, complete=True)
    return result


def _stats(result: Mapping[str, Any]) -> BlockStats:
    stats = result["stats"]
    if not isinstance(stats, BlockStats):
        raise TypeError(f"block {result.get('id')}: the block function returned no BlockStats")
    return stats


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
    set_studios_attrs(group, run={**dict(studios_attrs(group).get("run") or {}), "qc": info})
    return result


def _voxel_size(group: zarr.Group, out: Path) -> tuple[float, float, float]:
    scan = (studios_attrs(group).get("ledger") or {}).get("scan")
    if isinstance(scan, str) and scan:
        try:
            return open_image(scan, require_complete=False).voxel_size
        except InputError:
            pass
    return (1.0, 1.0, 1.0)


def serial(retries: int = 2) -> SerialExecutor:
    """The in-process executor (debugging, tests)."""
    return SerialExecutor(retries=retries)
