"""The studios flows: ingest, train, segment, qc, and ``process_scan`` chaining them.

Prefect tasks here are *stages*: one task run per stage, whatever the number of blocks. The
segment stage hands its blocks to the Dask cluster of its ``cluster`` options through
:func:`pipeline.segment.run.segment`; progress comes back through an :class:`ArtifactReporter`.

Retries: ``ingest`` is atomic (the output appears only when complete) and ``segment`` resumes
from its ledger, so both retry on transient errors (cluster lost, blocks failed, I/O). Errors a
retry cannot fix (bad input, bad config, existing output, a lock held by another run) fail at
once. Reruns are idempotent: finished outputs made from the same inputs are reused, unfinished
ones resumed; ``overwrite: true`` recomputes.

Each scan's output folder::

    OUTPUT/scan.zarr  model/  seg.zarr  qc/qc.json  qc/report.html  studios-run.json
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.logs import library_logs
from flows.reporting import ArtifactReporter, artifact_key, publish_markdown, summary_markdown
from flows.runstate import RunStatus, now_iso
from pipeline.core import interrupt
from pipeline.core.errors import (
    ConfigError,
    InputError,
    LedgerMismatchError,
    LockError,
    ModelError,
    OutputExistsError,
)
from pipeline.core.interrupt import Interrupted
from pipeline.core.runconfig import (
    ClusterOptions,
    IngestOptions,
    ModelOptions,
    RunConfig,
    SegmentOptions,
    load_run_config,
    merge_sections,
    parse_run_config,
)

logger = logging.getLogger(__name__)

NOT_RETRYABLE = (ConfigError, InputError, ModelError, OutputExistsError, LedgerMismatchError, LockError, Interrupted)
RETRY_DELAY_SECONDS = 10


def _retry_safe(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient failures only; a retry cannot fix bad input or an existing output."""
    try:
        state.result()
    except NOT_RETRYABLE:
        return False
    except Exception:
        return True
    return True


def _run_count() -> int:
    try:
        from prefect.runtime import task_run

        return int(task_run.run_count or 1)
    except Exception:
        return 1


def flow_run_links() -> dict[str, str]:
    """The current flow run's id and (when the Prefect UI is known) its URL."""
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_UI_URL

    run_id = flow_run.get_id()
    if not run_id:
        return {}
    links = {"flow_run_id": str(run_id)}
    ui = PREFECT_UI_URL.value()
    if ui:
        links["flow_run_url"] = f"{str(ui).rstrip('/')}/runs/flow-run/{run_id}"
    return links


# ---------------------------------------------------------------------------------- stages


@task(name="ingest", retries=1, retry_delay_seconds=RETRY_DELAY_SECONDS, retry_condition_fn=_retry_safe,
      cache_policy=NO_CACHE)
def ingest_stage(source: str, output: Path, options: IngestOptions, *, overwrite: bool = False,
                 status: RunStatus | None = None, label: str = "") -> dict[str, Any]:
    """Reconstruction -> ``output`` (scan.zarr); a finished scan from the same source is reused."""
    from pipeline.core.runconfig import _source_file
    from pipeline.ingest.run import ingest
    from pipeline.io.store import open_image

    if status is not None:
        status.update(stage="ingest")
    if output.exists() and not overwrite:
        try:
            image = open_image(output, kind="scan")
            made_from = image.attrs.get("provenance", {}).get("source")
            if made_from and Path(made_from).resolve() == _source_file(source).resolve():
                logger.info("ingest: %s already holds %s, reused", output, source)
                return {"path": str(output), "shape": list(image.shape), "dtype": str(image.array.dtype),
                        "mean": image.stats.mean, "std": image.stats.std, "reused": True}
        except InputError:
            pass  # not a finished scan: ingest() below refuses or replaces it with a clear message
    reporter = ArtifactReporter(f"ingest-progress-{label}", status=status)
    result = ingest(
        source, output, chunks=options.chunks, voxel_size=options.voxel_size, unit=options.unit,
        workers=options.workers, nonfinite=options.nonfinite, overwrite=overwrite, reporter=reporter,
        raw_shape=options.shape, raw_dtype=options.dtype, byte_order=options.byte_order, raw_offset=options.offset,
    )
    return {"path": str(result.path), "shape": list(result.shape), "dtype": result.dtype,
            "mean": result.stats.mean, "std": result.stats.std, "reused": False}


@task(name="train", cache_policy=NO_CACHE)
def train_stage(scan: Path, model: ModelOptions, model_dir: Path, *, overwrite: bool = False,
                status: RunStatus | None = None, label: str = "") -> dict[str, Any]:
    """The model for this scan: an existing bundle, a seeded random one, or one trained here."""
    from pipeline.io.bundle import init_bundle, load_bundle, save_bundle
    from pipeline.models import DEFAULT_ARCH

    if status is not None:
        status.update(stage="train")
    if model.bundle is not None:
        load_bundle(model.bundle)  # validate now, not on a worker
        return {"bundle": str(model.bundle), "kind": "bundle"}
    if model.init is not None:
        init = model.init
        bundle = init_bundle(classes=init.classes, arch=init.arch or DEFAULT_ARCH, params=dict(init.params),
                             seed=init.seed)
        if (model_dir / "model.json").exists() and not overwrite:
            existing = load_bundle(model_dir)
            if existing.fingerprint != bundle.fingerprint:
                raise OutputExistsError(
                    f"{model_dir}: holds another model; pass overwrite: true to replace it or choose another output"
                )
        else:
            save_bundle(bundle, model_dir, overwrite=overwrite)
        return {"bundle": str(model_dir), "kind": "init", "fingerprint": bundle.fingerprint}
    assert model.train is not None
    opts = model.train
    if (model_dir / "model.json").exists() and not overwrite:
        logger.info("train: %s already holds a model, reused (overwrite: true retrains)", model_dir)
        return {"bundle": str(model_dir), "kind": "train", "reused": True}
    from pipeline.train.loop import train

    reporter = ArtifactReporter(f"train-progress-{label}", status=status)
    kwargs: dict[str, Any] = {"arch": opts.arch} if opts.arch else {}
    result = train(
        scan, opts.annotations, model_dir, params=dict(opts.params) if opts.params else None,
        classes=list(opts.classes) if opts.classes else None, minutes=opts.minutes, epochs=opts.epochs,
        seed=opts.seed, device=opts.device, reporter=reporter, overwrite=overwrite, **kwargs,
    )
    return {"bundle": str(result.bundle_path), "kind": "train", "metrics": dict(result.metrics),
            "seconds": result.seconds, "reused": False}


@task(name="segment", retries=1, retry_delay_seconds=RETRY_DELAY_SECONDS, retry_condition_fn=_retry_safe,
      cache_policy=NO_CACHE)
def segment_stage(scan: Path, model: Path, output: Path, options: SegmentOptions, cluster: ClusterOptions, *,
                  overwrite: bool = False, status: RunStatus | None = None, label: str = "") -> dict[str, Any]:
    """Blockwise segmentation on the stage's Dask cluster; resumes an unfinished output."""
    from pipeline.compute.executors import SerialExecutor
    from pipeline.io.bundle import load_bundle
    from pipeline.io.store import open_image
    from pipeline.segment.run import segment

    if status is not None:
        status.update(stage="segment")
    if output.exists() and not overwrite:
        try:
            seg = open_image(output, kind="segmentation")
            ledger = seg.attrs.get("ledger", {})
            if (ledger.get("model_fingerprint") == load_bundle(model).fingerprint
                    and ledger.get("scan") == str(Path(scan).resolve()) and seg.attrs.get("run")):
                logger.info("segment: %s is finished with the same scan and model, reused", output)
                return {**seg.attrs["run"], "reused": True}
        except InputError:
            pass  # unfinished: segment() resumes it
    if _run_count() > 1:
        overwrite = False  # a retry continues what the first attempt started
    reporter = ArtifactReporter(f"segment-progress-{label}", status=status)
    spec = cluster.spec()
    executor = SerialExecutor(retries=options.retries) if spec is None else None
    block: Any = options.block if options.block is None or isinstance(options.block, int) else tuple(options.block)
    result = segment(
        scan, model, output, block=block, chunks=options.chunks, cluster=spec, executor=executor,
        probabilities=options.probabilities, device=options.device, precision=options.precision, exact=options.exact,
        skip_constant=options.skip_constant, mask=options.mask, overwrite=overwrite, retries=options.retries,
        reporter=reporter, qc=False,  # QC is its own stage (retries, ground truth, its own artifact)
    )
    if status is not None:
        status.update(dask_dashboard=None)
    return {**result.to_json(), "reused": False}


@task(name="qc", retries=1, retry_delay_seconds=RETRY_DELAY_SECONDS, retry_condition_fn=_retry_safe,
      cache_policy=NO_CACHE)
def qc_stage(seg: Path, *, scan: Path | None = None, truth: Path | None = None, out_dir: Path | None = None,
             status: RunStatus | None = None, label: str = "") -> dict[str, Any]:
    """QC of a finished segmentation: ``qc.json`` + ``report.html``."""
    from pipeline.qc.run import run_qc

    if status is not None:
        status.update(stage="qc")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    reporter = ArtifactReporter(f"qc-progress-{label or seg.stem}", status=status)
    result = run_qc(seg, scan=scan, truth=truth, out_dir=out_dir, reporter=reporter)
    report = result.report_path
    return {"json": str(result.json_path), "html": str(report) if report else None, "data": dict(result.data)}


# ---------------------------------------------------------------------------------- flows


def _section(value: dict[str, Any] | None, cls: type, name: str) -> Any:
    from pipeline.core.config import parse_section

    return parse_section(value or {}, cls, f"parameter {name}")


def _qc_parts(qc: dict[str, Any] | None) -> tuple[list[str], dict[str, Any]]:
    data = dict((qc or {}).get("data") or {})
    return [str(w) for w in data.get("warnings", [])], data


def _seg_facts(seg: dict[str, Any]) -> list[tuple[str, Any]]:
    return [
        ("blocks", f"{seg.get('blocks_done', '?')}/{seg.get('blocks_total', '?')} "
                   f"({seg.get('blocks_resumed', 0)} resumed, {seg.get('blocks_skipped', 0)} skipped)"),
        ("segment seconds", seg.get("seconds", 0.0)),
        ("voxels/s", seg.get("voxels_per_second", 0.0)),
        ("reused", seg.get("reused", False)),
    ]


@flow(name="ingest")
def ingest_flow(
    source: str, output: str, ingest: dict[str, Any] | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Convert a reconstruction into a studios OME-Zarr scan (``output``, a .zarr)."""
    from pipeline.core.runconfig import resolve_source

    with library_logs():
        options = _section(ingest, IngestOptions, "ingest")
        src = resolve_source(source)
        out = Path(output).absolute()
        result = ingest_stage(src, out, options, overwrite=overwrite, label=out.stem)
        facts = [("shape", "x".join(map(str, result["shape"]))), ("dtype", result["dtype"]),
                 ("mean", result["mean"]), ("std", result["std"]), ("reused", result["reused"])]
        publish_markdown(f"ingest-summary-{out.stem}",
                         summary_markdown(f"ingest {out.stem}", state="done", facts=facts,
                                          outputs={"scan": result["path"], "source": src}),
                         f"ingest of {src}")
        return result


@flow(name="train")
def train_flow(scan: str, annotations: str, output: str, arch: str | None = None,
               params: dict[str, Any] | None = None, classes: list[str] | None = None,
               minutes: float | None = None, epochs: int | None = None, seed: int = 0, device: str = "cpu",
               overwrite: bool = False) -> dict[str, Any]:
    """Train a model bundle (``output``) from sparse annotations of an ingested scan."""
    with library_logs():
        options = _section({"train": {
            "annotations": annotations, "arch": arch, "params": params, "classes": classes, "minutes": minutes,
            "epochs": epochs, "seed": seed, "device": device}}, ModelOptions, "model")
        out = Path(output).absolute()
        result = train_stage(Path(scan).absolute(), options, out, overwrite=overwrite, label=out.name)
        metrics = {k: v for k, v in (result.get("metrics") or {}).items() if isinstance(v, int | float | str)}
        publish_markdown(f"train-summary-{out.name}",
                         summary_markdown(f"train {out.name}", state="done", facts=list(metrics.items()),
                                          outputs={"model": result["bundle"], "scan": scan}),
                         f"training on {scan}")
        return result


@flow(name="segment")
def segment_flow(scan: str, model: str, output: str, segment: dict[str, Any] | None = None,
                 cluster: dict[str, Any] | None = None, overwrite: bool = False, qc: bool = True) -> dict[str, Any]:
    """Segment an ingested scan blockwise with a model bundle into ``output`` (a .zarr), then QC it
    into ``output/qc`` (``qc: false`` skips that)."""
    with library_logs():
        options = _section(segment, SegmentOptions, "segment")
        cluster_opts = ClusterOptions.parse(cluster, "parameter cluster")
        out = Path(output).absolute()
        scan_path = Path(scan).absolute()
        result = segment_stage(scan_path, Path(model).absolute(), out, options, cluster_opts,
                               overwrite=overwrite, label=out.stem)
        outputs = {"segmentation": str(out), "scan": scan, "model": model}
        warnings: list[str] = []
        qc_data: dict[str, Any] = {}
        if qc:
            qc_result = qc_stage(out, scan=scan_path, out_dir=out / "qc")
            warnings, qc_data = _qc_parts(qc_result)
            outputs.update(qc_json=qc_result["json"], report=qc_result["html"] or "")
        publish_markdown(f"segment-summary-{out.stem}",
                         summary_markdown(f"segment {out.stem}", state="done", facts=_seg_facts(result),
                                          class_fractions=result.get("class_fractions"), qc=qc_data,
                                          warnings=warnings, outputs=outputs),
                         f"segmentation of {scan}")
        return {**result, "qc_warnings": warnings}


@flow(name="qc")
def qc_flow(seg: str, scan: str | None = None, truth: str | None = None, out_dir: str | None = None) -> dict[str, Any]:
    """Quality control of a finished segmentation: ``qc.json`` and ``report.html``."""
    with library_logs():
        seg_path = Path(seg).absolute()
        result = qc_stage(seg_path, scan=Path(scan).absolute() if scan else None,
                          truth=Path(truth).absolute() if truth else None,
                          out_dir=Path(out_dir).absolute() if out_dir else None)
        warnings, data = _qc_parts(result)
        publish_markdown(f"qc-summary-{seg_path.stem}",
                         summary_markdown(f"qc {seg_path.stem}", state="done", qc=data, warnings=warnings,
                                          outputs={"qc.json": result["json"], "report": result["html"]}),
                         f"QC of {seg}")
        return result


def resolve_parameters(
    source: str | None, output: str | None, *, config: str | None = None, **sections: Any
) -> RunConfig:
    """The validated run configuration from a profile file and/or explicit parameters."""
    overrides = {"source": source, "output": output, **sections}
    if config:
        return load_run_config(config, overrides=overrides)
    return parse_run_config(merge_sections({}, overrides), "process_scan parameters")


@flow(name="process-scan")
def process_scan(
    source: str | None = None,
    output: str | None = None,
    name: str | None = None,
    model: dict[str, Any] | None = None,
    ingest: dict[str, Any] | None = None,
    segment: dict[str, Any] | None = None,
    cluster: dict[str, Any] | None = None,
    qc: dict[str, Any] | None = None,
    overwrite: bool | None = None,
    config: str | None = None,
) -> dict[str, Any]:
    """One scan end to end: ingest -> (train) -> segment -> qc, into the folder ``output``.

    The parameters are the keys of a run profile (``configs/*.yaml``); ``config`` names a
    profile whose values the other parameters override (section by section, key by key).
    """
    # inside Prefect's flow engine (which turns SIGTERM into a crash): stop gracefully instead
    with library_logs(), interrupt.handling():
        cfg = resolve_parameters(source, output, config=config, name=name, model=model, ingest=ingest,
                                 segment=segment, cluster=cluster, qc=qc, overwrite=overwrite)
        return _process(cfg)


def _process(cfg: RunConfig) -> dict[str, Any]:
    assert cfg.output is not None and cfg.source is not None and cfg.model is not None
    out = cfg.output
    label = cfg.scan_name
    out.mkdir(parents=True, exist_ok=True)
    scan_path, seg_path = out / "scan.zarr", out / "seg.zarr"
    paths = {
        "scan": scan_path,
        "model": cfg.model.bundle if cfg.model.bundle is not None else out / "model",
        "segmentation": seg_path,
        "qc_json": out / "qc" / "qc.json" if cfg.qc.enabled else None,
        "report": out / "qc" / "report.html" if cfg.qc.enabled else None,
    }
    outputs = {k: str(v) for k, v in paths.items() if v is not None}
    status = RunStatus(out, name=label)
    status.update(state="running", stage="ingest", source=cfg.source, output=str(out), outputs=outputs,
                  started=now_iso(), finished=None, error=None, progress=None, qc=None, dask_dashboard=None,
                  cluster=cfg.cluster.kind, **flow_run_links())
    t0 = time.perf_counter()
    try:
        scan = ingest_stage(cfg.source, scan_path, cfg.ingest, overwrite=cfg.overwrite, status=status, label=label)
        model = train_stage(scan_path, cfg.model, out / "model", overwrite=cfg.overwrite, status=status, label=label)
        seg = segment_stage(scan_path, Path(model["bundle"]), seg_path, cfg.segment, cfg.cluster,
                            overwrite=cfg.overwrite, status=status, label=label)
        qc = None
        if cfg.qc.enabled:
            qc = qc_stage(seg_path, scan=scan_path, truth=cfg.qc.truth, out_dir=out / "qc", status=status,
                          label=label)
            outputs.update(qc_json=qc["json"], report=qc["html"] or "")
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        status.update(state="failed", error=error, finished=now_iso(), dask_dashboard=None)  # error says why
        state = "interrupted" if isinstance(exc, Interrupted) else "failed"
        publish_markdown(f"process-scan-{label}", summary_markdown(
            f"process-scan {label}", state=state, error=error, facts=[("stage", status.data.get("stage"))],
            outputs=outputs), f"{label}: {state}")
        raise
    warnings, qc_data = _qc_parts(qc)
    seconds = time.perf_counter() - t0
    status.update(state="done", stage=None, finished=now_iso(), outputs=outputs, seconds=round(seconds, 2),
                  qc={"warnings": warnings, "class_fractions": seg.get("class_fractions", {})})
    facts = [("scan", label), ("shape", "x".join(map(str, scan["shape"]))), ("model", model["kind"]),
             *_seg_facts(seg), ("total seconds", seconds)]
    publish_markdown(f"process-scan-{label}", summary_markdown(
        f"process-scan {label}", state="done", facts=facts, class_fractions=seg.get("class_fractions"),
        qc=qc_data, warnings=warnings, outputs=outputs), f"{label}: done")
    return {"name": label, "output": str(out), "outputs": outputs, "segment": seg, "qc_warnings": warnings,
            "seconds": round(seconds, 2)}


__all__ = ["ingest_flow", "process_scan", "qc_flow", "segment_flow", "train_flow", "artifact_key"]
