"""Run profiles: one YAML file describes a whole ``process_scan`` run (``studios run CONFIG``).

A profile is parsed once, strictly, into frozen pydantic models (:func:`parse_run_config`; the
base, :class:`~pipeline.core.schema.Section`, is shared with the cluster and SLURM settings); unknown
keys, wrong types, missing required keys and missing input files are one-line
:class:`~pipeline.core.errors.ConfigError` messages naming the file and the key. The top-level keys
are exactly the parameters of the ``process_scan`` flow, so a profile, the flow's parameters
in the Prefect UI and a deployment's ``parameters:`` all read the same::

    name: cement-demo                     # optional; default: the source's file name
    source: bundled:cement_128x128x128.tif  # a path, or bundled:NAME (data shipped in the package)
    output: demo-output                   # folder: scan.zarr, seg.zarr, qc/, studios-run.json
    overwrite: false                      # true: recompute even finished outputs
    ingest:   {chunks: [64, 64, 64], voxel_size: [1, 1, 1], unit: micrometer, nonfinite: error}
    model:    {bundle: PATH} | {init: {classes: [..], seed: 0}} | {train: {annotations: PATH, ...}}
    segment:  {block: 128, probabilities: false, device: cpu, exact: false, retries: 2}
    cluster:  {kind: local, workers: 1, threads_per_worker: 1}   # also address/slurm/cuda/serial
    qc:       {enabled: true, truth: null, suggest: 0}
    analyse:  {fibre: fibre, pore: pore, meshes: true}   # optional: objects, orientation, pores
    watch:    {incoming: /data/incoming, interval: 120, settle_seconds: 120}   # studios serve only

Relative paths are relative to the current directory (as on the command line); profiles used
by deployments should use absolute paths. This module imports neither Prefect, Dask nor torch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.compute.cluster import ClusterSpec
from pipeline.core.errors import ConfigError
from pipeline.core.schema import (
    Bool,
    Float,
    FloatTriple,
    Int,
    Section,
    Str,
    Triple,
    load_yaml,
    path_or_none,
    validate,
)
from pipeline.io.sources import FORMAT_SUFFIXES, source_file, split_source, strip_suffix

BUNDLED_PREFIX = "bundled:"
CLUSTER_KINDS = ("local", "address", "slurm", "cuda", "serial")
COMPLETION_RULES = ("marker", "settled", "either")


class IngestOptions(Section):
    """``ingest:`` how the reconstruction becomes ``scan.zarr`` (see ``studios ingest --help``)."""

    SECTION = "ingest"

    chunks: Triple = (128, 128, 128)
    voxel_size: FloatTriple = (1.0, 1.0, 1.0)
    unit: Str = "micrometer"
    workers: Int = Field(2, ge=1)
    nonfinite: Literal["error", "zero"] = "error"
    shape: Triple | None = None  # raw binary files only
    dtype: Str | None = None
    byte_order: Literal["<", ">"] = "<"
    offset: Int = Field(0, ge=0)


class ModelInit(Section):
    """``model.init:`` a bundle with seeded random weights (trying the engine, the demo)."""

    SECTION = "model.init"

    classes: tuple[Str, ...] = ("background", "foreground")
    arch: Str | None = None
    params: Mapping[str, Any] = Field(default_factory=dict)
    seed: Int = 0


class TrainOptions(Section):
    """``model.train:`` train a model from sparse annotations of this scan (``studios train``)."""

    SECTION = "model.train"

    annotations: Path
    arch: Str | None = None
    params: Mapping[str, Any] | None = None
    classes: tuple[Str, ...] | None = None
    minutes: Float | None = None
    epochs: Int | None = None
    seed: Int = 0
    device: Str = "cpu"


class ModelOptions(Section):
    """``model:`` exactly one of ``bundle`` (an existing bundle), ``init`` or ``train``."""

    SECTION = "model"

    bundle: Path | None = None
    init: ModelInit | None = None
    train: TrainOptions | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelOptions:
        given = [k for k in ("bundle", "init", "train") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of bundle, init, train (got {', '.join(given) or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return "bundle" if self.bundle is not None else "init" if self.init is not None else "train"


class SegmentOptions(Section):
    """``segment:`` the blockwise stage (see ``studios segment --help``)."""

    SECTION = "segment"

    block: Int | Triple | None = None  # default 128 (on GPUs: sized to free memory)
    chunks: Triple | None = None
    probabilities: Bool = False
    device: Str | None = None  # default cuda on GPU clusters, else cpu
    precision: Literal["fp32", "auto", "bf16", "fp16"] = "fp32"  # auto: bf16 on CPUs with a bf16 unit, else fp32
    exact: Bool = False
    skip_constant: Bool = False
    mask: Path | None = None
    retries: Int = Field(2, ge=0)


class ClusterOptions(Section):
    """``cluster:`` where the blocks run: the keys of a site profile's ``cluster:`` section.

    The keys are those of :class:`~pipeline.compute.cluster.ClusterSpec` (``kind``, ``workers``,
    ``threads_per_worker``, ``address``, ``memory_limit``, ``slurm``, ``adapt``, ...), parsed
    once into the :class:`ClusterSpec` kept here. ``kind``: ``local`` (a LocalCluster started
    for the run), ``address`` (an existing scheduler), ``slurm`` (dask-jobqueue), ``cuda`` (one
    worker per GPU), or ``serial`` (blocks run one by one in the flow's own process; debugging
    and tiny scans; the other keys are checked as for ``local``).
    """

    SECTION = "cluster"
    FLAT = frozenset({"cluster_spec"})

    kind: Literal["local", "address", "slurm", "cuda", "serial"] = "local"
    cluster_spec: ClusterSpec = Field(default_factory=ClusterSpec)

    @model_validator(mode="before")
    @classmethod
    def _nest(cls, data: Any) -> Any:
        """The file writes the ClusterSpec keys beside ``kind``: nest them."""
        if not isinstance(data, Mapping) or "cluster_spec" in data:
            return data
        values = dict(data)
        kind = values.get("kind", "local")
        return {"kind": kind, "cluster_spec": {**values, "kind": "local" if kind == "serial" else kind}}

    @classmethod
    def parse(cls, section: Any, where: str) -> ClusterOptions:
        """Validate a ``cluster:`` mapping; errors read ``WHERE.key: problem``."""
        return validate(cls, section, where)

    @property
    def values(self) -> dict[str, Any]:
        """The keys the profile gave (besides ``kind``), JSON-able."""
        data = self.cluster_spec.model_dump(mode="json", exclude_unset=True)
        data.pop("kind", None)
        return data

    def spec(self) -> ClusterSpec | None:
        """The :class:`~pipeline.compute.cluster.ClusterSpec`, or ``None`` for ``serial``."""
        return None if self.kind == "serial" else self.cluster_spec

    def to_json(self) -> dict[str, Any]:
        return _drop_none({**self.values, "kind": self.kind})


class QCOptions(Section):
    """``qc:`` quality control after segmentation (``studios qc``); ``truth``: a label volume."""

    SECTION = "qc"

    enabled: Bool = True
    truth: Path | None = None
    suggest: Int = Field(0, ge=0)  # slices where to annotate next, in qc.json and the report


class AnalyseOptions(Section):
    """``analyse:`` quantify the segmentation after QC (``studios analyse``): objects, fibre
    orientation, pores, surfaces into ``OUTPUT/seg.analysis/`` and an Analysis section in the report.

    Absent (the default): no analysis. Class keys take names or labels (1..K); ``fibre`` and
    ``pore`` default to classes named fibre/fiber and pore/void/air.
    """

    SECTION = "analyse"

    enabled: Bool = True
    classes: tuple[Str | Int, ...] | None = None
    fibre: Str | Int | None = None
    pore: Str | Int | None = None
    sigma: Float = Field(1.0, gt=0)
    rho: Float = Field(3.0, gt=0)
    meshes: Bool = True
    mesh_sigma: Float = Field(1.0, ge=0)
    max_radius: Int = Field(16, ge=1)
    orientation_field: Bool = False
    block: Int | None = Field(None, ge=8)
    device: Str = "cpu"


class WatchOptions(Section):
    """``watch:`` scheduled beamline processing (``studios serve``): new scans in ``incoming``.

    A scan is complete when its marker exists (``<scan><marker>`` beside it, or ``DONE`` /
    ``<marker>`` inside a scan folder), or — with ``completion: settled`` or ``either`` — when
    its files (names, sizes, mtimes) did not change for ``settle_seconds`` across two looks.
    """

    SECTION = "watch"

    incoming: Path
    interval: Float | None = Field(None, gt=0)
    cron: Str | None = None
    settle_seconds: Float = Field(120.0, ge=0)
    completion: Literal["marker", "settled", "either"] = "either"
    marker: Str = ".complete"
    state_dir: Path | None = None
    max_scans: Int = Field(0, ge=0)

    @model_validator(mode="after")
    def _one_schedule(self) -> WatchOptions:
        if self.interval is not None and self.cron is not None:
            raise ValueError("give interval or cron, not both")
        return self


class RunConfig(Section):
    """A whole run: the parameters of the ``process_scan`` flow."""

    source: Str | None = None
    output: Path | None = None
    name: Str | None = None
    overwrite: Bool = False
    ingest: IngestOptions = Field(default_factory=IngestOptions)
    model: ModelOptions | None = None
    segment: SegmentOptions = Field(default_factory=SegmentOptions)
    cluster: ClusterOptions = Field(default_factory=ClusterOptions)
    qc: QCOptions = Field(default_factory=QCOptions)
    analyse: AnalyseOptions | None = None
    watch: WatchOptions | None = None

    @property
    def scan_name(self) -> str:
        if self.name:
            return self.name
        if self.source:
            return scan_name_for(self.source)
        return "scan"

    def to_parameters(self, *, with_watch: bool = False) -> dict[str, Any]:
        """JSON-able mapping (the flow's parameters); ``None`` values and ``watch`` left out."""
        data = self.model_dump(mode="json", exclude_none=True, exclude={"cluster"})
        data["cluster"] = self.cluster.to_json()
        if not with_watch:
            data.pop("watch", None)
        return data


def _drop_none(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _drop_none(v) for k, v in value.items() if v is not None}
    return value


def scan_name_for(source: str | os.PathLike[str]) -> str:
    """A scan's name from its path: file name without extension (``.h5:/dataset`` dropped)."""
    text = os.fspath(source)
    if text.startswith(BUNDLED_PREFIX):
        text = text[len(BUNDLED_PREFIX):]
    name = Path(split_source(text)[0].rstrip("/")).name
    return strip_suffix(name) or "scan"


def resolve_source(source: str, where: str = "source") -> str:
    """``bundled:NAME`` -> the packaged file's path; other paths made absolute."""
    if source.startswith(BUNDLED_PREFIX):
        name = source[len(BUNDLED_PREFIX):]
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise ConfigError(
                f"{where}: {source!r} must name one file of pipeline/data, e.g. bundled:cement_128x128x128.tif"
            )
        path = Path(str(resources.files("pipeline") / "data" / name))
        if not path.is_file():
            readable = {*FORMAT_SUFFIXES["tiff"], *FORMAT_SUFFIXES["hdf5"], *FORMAT_SUFFIXES["npy"]}
            available = sorted(p.name for p in path.parent.iterdir() if p.suffix.lower() in readable)
            raise ConfigError(f"{where}: no bundled file {name!r}; bundled: {', '.join(available)}")
        return str(path)
    file_part, dataset = split_source(source)
    if dataset is not None:
        return str(Path(file_part).expanduser().absolute()) + ":" + dataset
    return str(Path(source).expanduser().absolute())


def parse_run_config(
    data: Mapping[str, Any], where: str, *, require_source: bool = True, check_files: bool = True
) -> RunConfig:
    """Validate a profile mapping; paths become absolute, ``bundled:`` sources resolved.

    Args:
        data: the YAML mapping (or the flow's parameters).
        where: what to name in errors (the file, or ``"process_scan parameters"``).
        require_source: ``studios run`` needs ``source``/``output``/``model``; a watch profile
            (``studios serve``) gives ``watch`` instead of ``source``.
        check_files: check that every input file exists.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of sections, got {data!r}")
    cfg = validate(RunConfig, {k: v for k, v in data.items() if v is not None}, where, top=True)
    if require_source:
        for key in ("source", "output", "model"):
            if getattr(cfg, key) is None:
                hint = "; watched folders go to 'studios serve'" if key == "source" and cfg.watch else ""
                raise ConfigError(f"{where}: missing required key {key!r}{hint}")
    elif cfg.model is None:
        raise ConfigError(f"{where}: missing required key 'model'")
    if cfg.name is not None and not re.fullmatch(r"[\w.+-]{1,128}", cfg.name):
        raise ConfigError(f"{where}: name {cfg.name!r} may hold letters, digits, '.', '_', '+', '-' only")
    cfg = _absolute_paths(cfg, where)
    if check_files:
        _check_files(cfg, where)
    return cfg


def _absolute_paths(cfg: RunConfig, where: str) -> RunConfig:
    model = cfg.model
    if model is not None and model.bundle is not None:
        model = model.model_copy(update={"bundle": path_or_none(model.bundle)})
    if model is not None and model.train is not None:
        ann = str(model.train.annotations)
        annotations = (Path(resolve_source(ann, f"{where}: model.train.annotations"))
                       if ann.startswith(BUNDLED_PREFIX) else path_or_none(model.train.annotations))
        model = model.model_copy(update={"train": model.train.model_copy(update={"annotations": annotations})})
    watch = cfg.watch
    if watch is not None:
        watch = watch.model_copy(update={"incoming": path_or_none(watch.incoming),
                                         "state_dir": path_or_none(watch.state_dir)})
    return cfg.model_copy(update={
        "source": resolve_source(cfg.source, f"{where}: source") if cfg.source is not None else None,
        "output": path_or_none(cfg.output),
        "model": model,
        "segment": cfg.segment.model_copy(update={"mask": path_or_none(cfg.segment.mask)}),
        "qc": cfg.qc.model_copy(update={"truth": path_or_none(cfg.qc.truth)}),
        "watch": watch,
    })


def _check_files(cfg: RunConfig, where: str) -> None:
    checks: list[tuple[str, Path | None]] = [
        ("source", source_file(cfg.source) if cfg.source else None),
        ("segment.mask", cfg.segment.mask),
        ("qc.truth", cfg.qc.truth),
    ]
    if cfg.model is not None:
        checks.append(("model.bundle", cfg.model.bundle))
        checks.append(("model.train.annotations", cfg.model.train.annotations if cfg.model.train else None))
    for key, path in checks:
        if path is not None and not path.exists():
            raise ConfigError(f"{where}: {key}: {path} does not exist; check the path")
    if cfg.model is not None and cfg.model.bundle is not None and not (cfg.model.bundle / "model.json").is_file():
        raise ConfigError(
            f"{where}: model.bundle: {cfg.model.bundle} is not a model bundle (no model.json); "
            "create one with 'studios train' or 'studios model init'"
        )
    if cfg.output is not None and cfg.output.exists() and not cfg.output.is_dir():
        raise ConfigError(f"{where}: output: {cfg.output} exists and is not a folder; choose a folder")
    if cfg.output is not None and not cfg.output.parent.exists():
        raise ConfigError(f"{where}: output: parent folder {cfg.output.parent} does not exist; create it first")


def merge_sections(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``overrides``; mapping sections merge key by key (one level)."""
    out = dict(base)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and key != "model":
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def load_run_config(
    path: str | os.PathLike[str],
    *,
    overrides: Mapping[str, Any] | None = None,
    require_source: bool = True,
    check_files: bool = True,
) -> RunConfig:
    """Read and validate a profile; ``overrides`` (e.g. ``{"output": ...}``) win over the file."""
    data = load_yaml(path)
    if overrides:
        data = merge_sections(data, overrides)
    return parse_run_config(data, str(path), require_source=require_source, check_files=check_files)
