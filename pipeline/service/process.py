"""The decisions of a ``process_scan`` run, without Prefect: parameters, paths, reuse, model source.

Each stage function here is one stage as the flows run it, and is what a Prefect task in
:mod:`flows.process` calls (the task adds retries and artifacts, nothing else):

- :func:`ingest_scan`: a finished ``scan.zarr`` made from the same source is reused;
- :func:`prepare_model`: the model source is ``model.bundle`` (validated here, not on a
  worker), ``model.init`` (a seeded random bundle, saved once) or ``model.train`` (trained here;
  an existing trained bundle is reused);
- :func:`segment_scan`: a finished ``seg.zarr`` of the same scan and model is reused, an
  unfinished one resumed;
- :func:`check_segmentation`: ``qc.json`` + ``report.html``;
- :func:`analyse_segmentation` (profile key ``analyse:``): ``seg.analysis/`` and the report's
  Analysis section; a finished analysis of the same segmentation is reused.

``overwrite`` recomputes instead of reusing. Errors a retry cannot fix are :data:`NOT_RETRYABLE`.
Each scan's output folder::

    OUTPUT/scan.zarr  model/  seg.zarr  qc/qc.json  qc/report.html  seg.analysis/  studios-run.json
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pipeline.core.errors import (
    ConfigError,
    InputError,
    LedgerMismatchError,
    LockError,
    ModelError,
    OutputExistsError,
    one_line,
)
from pipeline.core.interrupt import Interrupted
from pipeline.core.progress import Reporter
from pipeline.core.schema import Section
from pipeline.core.settings import (
    AnalyseOptions,
    ClusterOptions,
    IngestOptions,
    ModelOptions,
    RunConfig,
    SegmentOptions,
    load_run_config,
    merge_sections,
    parse_run_config,
)
from pipeline.service.runstate import RunStatus, StatusReporter, now_iso

logger = logging.getLogger(__name__)

T = TypeVar("T", bound=Section)

#: Errors a retry cannot fix: bad input or config, an existing output, a lock held by another run.
NOT_RETRYABLE = (ConfigError, InputError, ModelError, OutputExistsError, LedgerMismatchError, LockError, Interrupted)


def retryable(exc: BaseException) -> bool:
    """Whether a stage that failed with ``exc`` may succeed when run again (transient errors)."""
    return not isinstance(exc, NOT_RETRYABLE)


def error_line(exc: BaseException) -> str:
    """``"TypeName: message"`` on one line, as recorded in status files and summaries."""
    return f"{type(exc).__name__}: {one_line(exc)}"


# ------------------------------------------------------------------------------ parameters


def parse_options(value: dict[str, Any] | None, cls: type[T], name: str) -> T:
    """A flow parameter (a mapping) parsed strictly into the options dataclass ``cls``."""
    from pipeline.core.schema import parse_section

    return parse_section(value or {}, cls, f"parameter {name}")


def train_options(annotations: str, **values: Any) -> ModelOptions:
    """``model: {train: {...}}`` from the ``train`` flow's parameters (``None`` values dropped)."""
    train = {"annotations": annotations, **{k: v for k, v in values.items() if v is not None}}
    return parse_options({"train": train}, ModelOptions, "model")


def resolve_parameters(
    source: str | None, output: str | None, *, config: str | None = None, **sections: Any
) -> RunConfig:
    """The validated run configuration from a profile file and/or explicit parameters."""
    overrides = {"source": source, "output": output, **sections}
    if config:
        return load_run_config(config, overrides=overrides)
    return parse_run_config(merge_sections({}, overrides), "process_scan parameters")


def check_processing(config: str | None, sections: dict[str, Any]) -> None:
    """Validate the processing template of a watcher (profile + sections, no ``source`` yet)."""
    if config:
        load_run_config(config, overrides=sections, require_source=False)
    else:
        parse_run_config(merge_sections({}, sections), "watch_folder parameters", require_source=False)


@dataclass(frozen=True)
class RunPlan:
    """Where one run reads and writes (all absolute)."""

    name: str
    source: str
    output: Path
    model: ModelOptions
    qc: bool
    analyse: AnalyseOptions | None = None

    @property
    def scan(self) -> Path:
        return self.output / "scan.zarr"

    @property
    def model_dir(self) -> Path:
        return self.output / "model"

    @property
    def segmentation(self) -> Path:
        return self.output / "seg.zarr"

    @property
    def qc_dir(self) -> Path:
        return self.output / "qc"

    @property
    def analysis_dir(self) -> Path:
        return self.output / "seg.analysis"

    def outputs(self) -> dict[str, str]:
        """Output name -> path (``scan``, ``model``, ``segmentation``, ``qc_json``, ``report``)."""
        model = self.model.bundle if self.model.bundle is not None else self.model_dir
        paths = {"scan": self.scan, "model": model, "segmentation": self.segmentation}
        if self.qc:
            paths.update(qc_json=self.qc_dir / "qc.json", report=self.qc_dir / "report.html")
        if self.analyse is not None and self.analyse.enabled:
            paths.update(analysis_json=self.analysis_dir / "analysis.json")
        return {k: str(v) for k, v in paths.items()}


def plan_run(cfg: RunConfig) -> RunPlan:
    """The plan of ``cfg``; a run needs ``source``, ``output`` and ``model``."""
    missing = [k for k in ("source", "output", "model") if getattr(cfg, k) is None]
    if missing or cfg.source is None or cfg.output is None or cfg.model is None:
        raise ConfigError(f"process_scan parameters: missing {', '.join(missing)}; give them or a profile (config)")
    analyse = cfg.analyse if cfg.analyse is not None and cfg.analyse.enabled else None
    return RunPlan(cfg.scan_name, cfg.source, cfg.output, cfg.model, cfg.qc.enabled, analyse)


def start_status(plan: RunPlan, *, cluster: str, **links: str) -> RunStatus:
    """Create the output folder and mark the run ``running`` in its status file."""
    plan.output.mkdir(parents=True, exist_ok=True)
    status = RunStatus(plan.output, name=plan.name)
    status.update(state="running", stage="ingest", source=plan.source, output=str(plan.output),
                  outputs=plan.outputs(), started=now_iso(), finished=None, error=None, progress=None, qc=None,
                  analysis=None, dask_dashboard=None, cluster=cluster, **links)
    return status


# ---------------------------------------------------------------------------------- stages


def _stage(status: RunStatus | None, reporter: Reporter | None, stage: str) -> Reporter:
    if status is not None:
        status.update(stage=stage)
    return reporter if reporter is not None else StatusReporter(status)


def reusable_scan(output: Path, source: str) -> dict[str, Any] | None:
    """The summary of ``output`` if it is a finished scan ingested from ``source``, else ``None``."""
    from pipeline.io.sources import source_file
    from pipeline.io.store import open_image

    if not output.exists():
        return None
    try:
        image = open_image(output, kind="scan")
    except InputError:
        return None  # not a finished scan: ingest refuses or replaces it with a clear message
    made_from = image.attrs.get("provenance", {}).get("source")
    if not made_from or Path(made_from).resolve() != source_file(source).resolve():
        return None
    return {"path": str(output), "shape": list(image.shape), "dtype": str(image.array.dtype),
            "mean": image.stats.mean, "std": image.stats.std, "reused": True}


def ingest_scan(source: str, output: Path, options: IngestOptions, *, overwrite: bool = False,
                status: RunStatus | None = None, reporter: Reporter | None = None) -> dict[str, Any]:
    """Reconstruction ``source`` -> ``output`` (scan.zarr); returns path, shape, dtype, mean, std, reused."""
    from pipeline.ingest.run import ingest

    reporter = _stage(status, reporter, "ingest")
    if not overwrite and (reused := reusable_scan(output, source)) is not None:
        logger.info("ingest: %s already holds %s, reused", output, source)
        return reused
    result = ingest(
        source, output, chunks=options.chunks, voxel_size=options.voxel_size, unit=options.unit,
        workers=options.workers, nonfinite=options.nonfinite, overwrite=overwrite, reporter=reporter,
        raw_shape=options.shape, raw_dtype=options.dtype, byte_order=options.byte_order, raw_offset=options.offset,
    )
    return {"path": str(result.path), "shape": list(result.shape), "dtype": result.dtype,
            "mean": result.stats.mean, "std": result.stats.std, "reused": False}


def prepare_model(scan: Path, model: ModelOptions, model_dir: Path, *, overwrite: bool = False,
                  status: RunStatus | None = None, reporter: Reporter | None = None) -> dict[str, Any]:
    """The model bundle for ``scan``: ``{"bundle": path, "kind": "bundle" | "init" | "train", ...}``.

    Raises:
        OutputExistsError: ``model_dir`` holds a different model and ``overwrite`` is false.
    """
    from pipeline.io.bundle import init_bundle, load_bundle, save_bundle
    from pipeline.models import DEFAULT_ARCH

    reporter = _stage(status, reporter, "train")
    if model.bundle is not None:
        load_bundle(model.bundle)  # validate now, not on a worker
        return {"bundle": str(model.bundle), "kind": "bundle"}
    exists = (model_dir / "model.json").exists() and not overwrite
    if model.init is not None:
        init = model.init
        bundle = init_bundle(classes=init.classes, arch=init.arch or DEFAULT_ARCH, params=dict(init.params),
                             seed=init.seed)
        if not exists:
            save_bundle(bundle, model_dir, overwrite=overwrite)
        elif load_bundle(model_dir).fingerprint != bundle.fingerprint:
            raise OutputExistsError(
                f"{model_dir}: holds another model; pass overwrite: true to replace it or choose another output")
        return {"bundle": str(model_dir), "kind": "init", "fingerprint": bundle.fingerprint}
    opts = model.train
    if opts is None:  # ModelOptions guarantees one source; this is a defect, not bad input
        raise ConfigError("model: give exactly one of bundle, init, train")
    if exists:
        logger.info("train: %s already holds a model, reused (overwrite: true retrains)", model_dir)
        return {"bundle": str(model_dir), "kind": "train", "reused": True}
    from pipeline.train.loop import train

    kwargs: dict[str, Any] = {"arch": opts.arch} if opts.arch else {}
    result = train(
        scan, opts.annotations, model_dir, params=dict(opts.params) if opts.params else None,
        classes=list(opts.classes) if opts.classes else None, minutes=opts.minutes, epochs=opts.epochs,
        seed=opts.seed, device=opts.device, reporter=reporter, overwrite=overwrite, **kwargs,
    )
    return {"bundle": str(result.bundle_path), "kind": "train", "metrics": dict(result.metrics),
            "seconds": result.seconds, "reused": False}


def reusable_segmentation(output: Path, scan: Path, model: Path) -> dict[str, Any] | None:
    """The run record of ``output`` if it is finished with the same scan and model, else ``None``."""
    from pipeline.io.bundle import load_bundle
    from pipeline.io.store import open_image

    if not output.exists():
        return None
    try:
        seg = open_image(output, kind="segmentation")
    except InputError:
        return None  # unfinished: segment() resumes it
    ledger = seg.attrs.get("ledger", {})
    run = seg.attrs.get("run")
    same = ledger.get("model_fingerprint") == load_bundle(model).fingerprint and ledger.get("scan") == str(
        Path(scan).resolve())
    return {**run, "reused": True} if same and run else None


def segment_scan(scan: Path, model: Path, output: Path, options: SegmentOptions, cluster: ClusterOptions, *,
                 overwrite: bool = False, status: RunStatus | None = None,
                 reporter: Reporter | None = None) -> dict[str, Any]:
    """Blockwise segmentation on ``cluster`` (serial when its spec is ``None``); the run record."""
    from pipeline.compute.executors import SerialExecutor
    from pipeline.segment.run import segment

    reporter = _stage(status, reporter, "segment")
    if not overwrite and (reused := reusable_segmentation(output, scan, model)) is not None:
        logger.info("segment: %s is finished with the same scan and model, reused", output)
        return reused
    spec = cluster.spec()
    executor = SerialExecutor(retries=options.retries) if spec is None else None
    block: Any = options.block if options.block is None or isinstance(options.block, int) else tuple(options.block)
    result = segment(
        scan, model, output, block=block, chunks=options.chunks, cluster=spec, executor=executor,
        probabilities=options.probabilities, device=options.device, precision=options.precision, exact=options.exact,
        skip_constant=options.skip_constant, mask=options.mask, overwrite=overwrite, retries=options.retries,
        reporter=reporter, qc=False,  # QC is its own stage (retries, ground truth, its own summary)
    )
    if status is not None:
        status.update(dask_dashboard=None)
    return {**result.to_json(), "reused": False}


def check_segmentation(seg: Path, *, scan: Path | None = None, truth: Path | None = None,
                       out_dir: Path | None = None, suggest: int = 0, status: RunStatus | None = None,
                       reporter: Reporter | None = None) -> dict[str, Any]:
    """QC of a finished segmentation: ``{"json": path, "html": path | None, "data": qc.json content}``."""
    from pipeline.qc.run import run_qc

    reporter = _stage(status, reporter, "qc")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    result = run_qc(seg, scan=scan, truth=truth, out_dir=out_dir, suggest=suggest, reporter=reporter)
    report = result.report_path
    return {"json": str(result.json_path), "html": str(report) if report else None, "data": dict(result.data)}


def reusable_analysis(out: Path, seg: Path) -> dict[str, Any] | None:
    """The ``analysis.json`` content in ``out`` if it analysed ``seg`` as it is now, else ``None``."""
    from pipeline.analyse.run import segmentation_identity
    from pipeline.service.runstate import read_json

    data = read_json(out / "analysis.json")
    if not data or data.get("source_run") != segmentation_identity(seg):
        return None
    return data


def analyse_segmentation(seg: Path, options: AnalyseOptions, out: Path, *, report_dir: Path | None = None,
                         overwrite: bool = False, status: RunStatus | None = None,
                         reporter: Reporter | None = None) -> dict[str, Any]:
    """``pipeline.analyse`` of a finished segmentation into ``out``, then the Analysis section of
    the QC report in ``report_dir`` (when it holds one); ``{"json", "data", "reused"}``.

    Raises:
        OutputExistsError: ``out`` holds an analysis of another segmentation and not ``overwrite``.
    """
    from pipeline.analyse import analyse
    from pipeline.analyse.run import headline
    from pipeline.qc.run import refresh_report

    reporter = _stage(status, reporter, "analyse")
    data = None if overwrite else reusable_analysis(out, seg)
    reused = data is not None
    if data is None:
        result = analyse(
            seg, out, classes=list(options.classes) if options.classes else None, fibre=options.fibre,
            pore=options.pore, sigma=options.sigma, rho=options.rho, mesh_sigma=options.mesh_sigma,
            meshes=options.meshes, orientation_field=options.orientation_field, max_radius=options.max_radius,
            block=options.block, device=options.device, overwrite=overwrite, reporter=reporter,
        )
        data = result.data
    else:
        logger.info("analyse: %s already analyses %s, reused", out, seg)
    if report_dir is not None and (report_dir / "qc.json").is_file():
        refresh_report(report_dir, out / "analysis.json")
    if status is not None:
        status.update(analysis=headline(data))
    return {"json": str(out / "analysis.json"), "data": data, "reused": reused}


# ---------------------------------------------------------------------------------- results


def qc_parts(qc: dict[str, Any] | None) -> tuple[list[str], dict[str, Any]]:
    """(warnings, qc.json content) of a :func:`check_segmentation` result (empty without QC)."""
    data = dict((qc or {}).get("data") or {})
    return [str(w) for w in data.get("warnings", [])], data


def analysis_facts(analysed: dict[str, Any] | None) -> list[tuple[str, Any]]:
    """The headline facts of an :func:`analyse_segmentation` result, for summaries (none without one)."""
    if not analysed:
        return []
    from pipeline.analyse.run import headline

    h = headline(analysed["data"])
    facts: list[tuple[str, Any]] = [("objects", h["objects"])]
    for key, what in (("fibre", "fibre fraction"), ("pore", "porosity")):
        if h[key] is not None and h[key]["fraction"] is not None:
            facts.append((f"{what} ({h[key]['class']})", f"{100 * h[key]['fraction']:.3g} %"))
    return facts


def segment_facts(seg: dict[str, Any]) -> list[tuple[str, Any]]:
    """The headline facts of a segmentation run record, for summaries."""
    return [
        ("blocks", f"{seg.get('blocks_done', '?')}/{seg.get('blocks_total', '?')} "
                   f"({seg.get('blocks_resumed', 0)} resumed, {seg.get('blocks_skipped', 0)} skipped)"),
        ("segment seconds", seg.get("seconds", 0.0)),
        ("voxels/s", seg.get("voxels_per_second", 0.0)),
        ("reused", seg.get("reused", False)),
    ]
