"""The studios flows: ingest, train, segment, qc, and ``process_scan`` chaining them (with analyse).

A Prefect task is a *stage* (one task run, whatever the number of blocks) wrapping one stage
function of :mod:`pipeline.service.process` (what is reused, which model source) with retries
and artifacts. ``ingest`` is atomic and ``segment`` resumes from its ledger, so both retry a
transient error once; errors a retry cannot fix fail at once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.artifacts import ArtifactReporter, publish_markdown
from flows.logs import library_logs
from pipeline.core import interrupt
from pipeline.core.settings import AnalyseOptions, ClusterOptions, IngestOptions, ModelOptions, SegmentOptions
from pipeline.service import process as lib
from pipeline.service.runstate import RunStatus, now_iso
from pipeline.service.summary import summary_markdown


def _retry_safe(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient failures only (see :func:`pipeline.service.process.retryable`)."""
    try:
        state.result()
    except Exception as exc:
        return lib.retryable(exc)
    return True


def _first_attempt() -> bool:
    from prefect.runtime import task_run

    return int(task_run.run_count or 1) <= 1


def flow_run_links() -> dict[str, str]:
    """The current flow run's id and (when the Prefect UI is known) its URL."""
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_UI_URL

    run_id = flow_run.get_id()
    if not run_id:
        return {}
    ui = PREFECT_UI_URL.value()
    url = {"flow_run_url": f"{str(ui).rstrip('/')}/runs/flow-run/{run_id}"} if ui else {}
    return {"flow_run_id": str(run_id), **url}


def _reporter(stage: str, label: str, status: RunStatus | None) -> ArtifactReporter:
    return ArtifactReporter(f"{stage}-progress-{label}", status=status)


RETRIED: dict[str, Any] = {"retries": 1, "retry_delay_seconds": 10,
                           "retry_condition_fn": _retry_safe, "cache_policy": NO_CACHE}


@task(name="ingest", **RETRIED)
def ingest_stage(source: str, output: Path, options: IngestOptions, *, overwrite: bool = False,
                 status: RunStatus | None = None, label: str = "") -> dict[str, Any]:
    """Reconstruction -> ``output`` (scan.zarr); a finished scan from the same source is reused."""
    return lib.ingest_scan(source, output, options, overwrite=overwrite, status=status,
                           reporter=_reporter("ingest", label, status))


@task(name="train", cache_policy=NO_CACHE)
def train_stage(scan: Path, model: ModelOptions, model_dir: Path, *, overwrite: bool = False,
                status: RunStatus | None = None, label: str = "") -> dict[str, Any]:
    """The model for this scan: an existing bundle, a seeded random one, or one trained here."""
    return lib.prepare_model(scan, model, model_dir, overwrite=overwrite, status=status,
                             reporter=_reporter("train", label, status))


@task(name="segment", **RETRIED)
def segment_stage(scan: Path, model: Path, output: Path, options: SegmentOptions, cluster: ClusterOptions, *,
                  overwrite: bool = False, status: RunStatus | None = None, label: str = "") -> dict[str, Any]:
    """Blockwise segmentation on the stage's Dask cluster; a retry resumes, never overwrites."""
    return lib.segment_scan(scan, model, output, options, cluster, overwrite=overwrite and _first_attempt(),
                            status=status, reporter=_reporter("segment", label, status))


@task(name="qc", **RETRIED)
def qc_stage(seg: Path, *, scan: Path | None = None, truth: Path | None = None, out_dir: Path | None = None,
             suggest: int = 0, status: RunStatus | None = None, label: str = "") -> dict[str, Any]:
    """QC of a finished segmentation: ``qc.json`` + ``report.html``."""
    return lib.check_segmentation(seg, scan=scan, truth=truth, out_dir=out_dir, suggest=suggest, status=status,
                                  reporter=_reporter("qc", label or seg.stem, status))


@task(name="analyse", **RETRIED)
def analyse_stage(seg: Path, options: AnalyseOptions, out: Path, *, report_dir: Path | None = None,
                  overwrite: bool = False, status: RunStatus | None = None, label: str = "") -> dict[str, Any]:
    """Objects, orientation, pores, surfaces of a finished segmentation; the report's Analysis section."""
    return lib.analyse_segmentation(seg, options, out, report_dir=report_dir, overwrite=overwrite and _first_attempt(),
                                    status=status, reporter=_reporter("analyse", label or seg.stem, status))


def _publish(key: str, title: str, description: str, **summary: Any) -> None:
    publish_markdown(key, summary_markdown(title, **{"state": "done", **summary}), description)


def _path(value: str | None) -> Path | None:
    return Path(value).absolute() if value else None


@flow(name="ingest")
def ingest_flow(source: str, output: str, ingest: dict[str, Any] | None = None,
                overwrite: bool = False) -> dict[str, Any]:
    """Convert a reconstruction into a studios OME-Zarr scan (``output``, a .zarr)."""
    from pipeline.core.settings import resolve_source

    with library_logs():
        src, out = resolve_source(source), Path(output).absolute()
        r = ingest_stage(src, out, lib.parse_options(ingest, IngestOptions, "ingest"), overwrite=overwrite,
                         label=out.stem)
        facts = [("shape", "x".join(map(str, r["shape"]))), *((k, r[k]) for k in ("dtype", "mean", "std", "reused"))]
        _publish(f"ingest-summary-{out.stem}", f"ingest {out.stem}", f"ingest of {src}", facts=facts,
                 outputs={"scan": r["path"], "source": src})
        return r


@flow(name="train")
def train_flow(scan: str, annotations: str, output: str, arch: str | None = None,
               params: dict[str, Any] | None = None, classes: list[str] | None = None,
               minutes: float | None = None, epochs: int | None = None, seed: int = 0, device: str = "cpu",
               overwrite: bool = False) -> dict[str, Any]:
    """Train a model bundle (``output``) from sparse annotations of an ingested scan."""
    with library_logs():
        options = lib.train_options(annotations, arch=arch, params=params, classes=classes, minutes=minutes,
                                    epochs=epochs, seed=seed, device=device)
        out = Path(output).absolute()
        r = train_stage(Path(scan).absolute(), options, out, overwrite=overwrite, label=out.name)
        metrics = {k: v for k, v in (r.get("metrics") or {}).items() if isinstance(v, int | float | str)}
        _publish(f"train-summary-{out.name}", f"train {out.name}", f"training on {scan}",
                 facts=list(metrics.items()), outputs={"model": r["bundle"], "scan": scan})
        return r


@flow(name="segment")
def segment_flow(scan: str, model: str, output: str, segment: dict[str, Any] | None = None,
                 cluster: dict[str, Any] | None = None, overwrite: bool = False, qc: bool = True) -> dict[str, Any]:
    """Segment an ingested scan blockwise with a model bundle into ``output`` (a .zarr), then QC it
    into ``output/qc`` (``qc: false`` skips that)."""
    with library_logs():
        options = lib.parse_options(segment, SegmentOptions, "segment")
        cluster_opts = ClusterOptions.parse(cluster, "parameter cluster")
        out, scan_path = Path(output).absolute(), Path(scan).absolute()
        r = segment_stage(scan_path, Path(model).absolute(), out, options, cluster_opts, overwrite=overwrite,
                          label=out.stem)
        outputs = {"segmentation": str(out), "scan": scan, "model": model}
        qc_result = qc_stage(out, scan=scan_path, out_dir=out / "qc") if qc else None
        warnings, qc_data = lib.qc_parts(qc_result)
        if qc_result is not None:
            outputs.update(qc_json=qc_result["json"], report=qc_result["html"] or "")
        _publish(f"segment-summary-{out.stem}", f"segment {out.stem}", f"segmentation of {scan}",
                 facts=lib.segment_facts(r), class_fractions=r.get("class_fractions"), qc=qc_data,
                 warnings=warnings, outputs=outputs)
        return {**r, "qc_warnings": warnings}


@flow(name="qc")
def qc_flow(seg: str, scan: str | None = None, truth: str | None = None, out_dir: str | None = None) -> dict[str, Any]:
    """Quality control of a finished segmentation: ``qc.json`` and ``report.html``."""
    with library_logs():
        seg_path = Path(seg).absolute()
        r = qc_stage(seg_path, scan=_path(scan), truth=_path(truth), out_dir=_path(out_dir))
        warnings, data = lib.qc_parts(r)
        _publish(f"qc-summary-{seg_path.stem}", f"qc {seg_path.stem}", f"QC of {seg}", qc=data, warnings=warnings,
                 outputs={"qc.json": r["json"], "report": r["html"]})
        return r


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
    analyse: dict[str, Any] | None = None,
    overwrite: bool | None = None,
    config: str | None = None,
) -> dict[str, Any]:
    """One scan end to end: ingest -> (train) -> segment -> qc -> (analyse), into the folder ``output``.

    The parameters are the keys of a run profile (``configs/*.yaml``); ``config`` names a
    profile whose values the other parameters override (section by section, key by key).
    """
    # inside Prefect's flow engine (which turns SIGTERM into a crash): stop gracefully instead
    with library_logs(), interrupt.handling():
        cfg = lib.resolve_parameters(source, output, config=config, name=name, model=model, ingest=ingest,
                                     segment=segment, cluster=cluster, qc=qc, analyse=analyse, overwrite=overwrite)
        plan = lib.plan_run(cfg)
        label, over = plan.name, cfg.overwrite
        outputs = plan.outputs()
        status = lib.start_status(plan, cluster=cfg.cluster.kind, **flow_run_links())
        t0 = time.perf_counter()
        try:
            scan = ingest_stage(plan.source, plan.scan, cfg.ingest, overwrite=over, status=status, label=label)
            model_ = train_stage(plan.scan, plan.model, plan.model_dir, overwrite=over, status=status, label=label)
            seg = segment_stage(plan.scan, Path(model_["bundle"]), plan.segmentation, cfg.segment, cfg.cluster,
                                overwrite=over, status=status, label=label)
            qc_ = None
            if plan.qc:
                qc_ = qc_stage(plan.segmentation, scan=plan.scan, truth=cfg.qc.truth, out_dir=plan.qc_dir,
                               suggest=cfg.qc.suggest, status=status, label=label)
                outputs.update(qc_json=qc_["json"], report=qc_["html"] or "")
            analysed = None if plan.analyse is None else analyse_stage(
                plan.segmentation, plan.analyse, plan.analysis_dir, report_dir=plan.qc_dir if plan.qc else None,
                overwrite=over, status=status, label=label)
        except BaseException as exc:
            error = lib.error_line(exc)
            state = "interrupted" if isinstance(exc, interrupt.Interrupted) else "failed"
            status.update(state="failed", error=error, finished=now_iso(), dask_dashboard=None)  # error says why
            _publish(f"process-scan-{label}", f"process-scan {label}", f"{label}: {state}", state=state,
                     error=error, facts=[("stage", status.data.get("stage"))], outputs=outputs)
            raise
        warnings, qc_data = lib.qc_parts(qc_)
        seconds = round(time.perf_counter() - t0, 2)
        fractions = seg.get("class_fractions") or {}
        status.update(state="done", stage=None, finished=now_iso(), outputs=outputs, seconds=seconds,
                      qc={"warnings": warnings, "class_fractions": fractions})
        facts = [("scan", label), ("shape", "x".join(map(str, scan["shape"]))), ("model", model_["kind"]),
                 *lib.segment_facts(seg), *lib.analysis_facts(analysed), ("total seconds", seconds)]
        _publish(f"process-scan-{label}", f"process-scan {label}", f"{label}: done", facts=facts,
                 class_fractions=fractions, qc=qc_data, warnings=warnings, outputs=outputs)
        return {"name": label, "output": str(plan.output), "outputs": outputs, "segment": seg,
                "qc_warnings": warnings, "seconds": seconds}
