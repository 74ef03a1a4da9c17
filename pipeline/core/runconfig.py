"""Run profiles: one YAML file describes a whole ``process_scan`` run (``studios run CONFIG``).

A profile is parsed once, strictly, into frozen dataclasses (:func:`parse_run_config`); unknown
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
    qc:       {enabled: true, truth: null}
    watch:    {incoming: /data/incoming, interval: 120, settle_seconds: 120}   # studios serve only

Relative paths are relative to the current directory (as on the command line); profiles used
by deployments should use absolute paths. This module imports neither Prefect nor Dask.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pipeline.core.config import load_yaml, parse_section
from pipeline.core.errors import ConfigError

BUNDLED_PREFIX = "bundled:"
CLUSTER_KINDS = ("local", "address", "slurm", "cuda", "serial")
COMPLETION_RULES = ("marker", "settled", "either")
_HDF5_SUFFIXES = (".h5", ".hdf5", ".nxs", ".hdf")


@dataclass(frozen=True)
class IngestOptions:
    """``ingest:`` how the reconstruction becomes ``scan.zarr`` (see ``studios ingest --help``)."""

    chunks: tuple[int, int, int] = (128, 128, 128)
    voxel_size: tuple[float, float, float] = (1.0, 1.0, 1.0)
    unit: str = "micrometer"
    workers: int = 2
    nonfinite: str = "error"
    shape: tuple[int, int, int] | None = None  # raw binary files only
    dtype: str | None = None
    byte_order: str = "<"
    offset: int = 0

    def __post_init__(self) -> None:
        if self.nonfinite not in ("error", "zero"):
            raise ValueError(f"nonfinite {self.nonfinite!r} is unknown; use 'error' or 'zero'")
        if self.byte_order not in ("<", ">"):
            raise ValueError(f"byte_order {self.byte_order!r} is unknown; use '<' or '>'")


@dataclass(frozen=True)
class ModelInit:
    """``model.init:`` a bundle with seeded random weights (trying the engine, the demo)."""

    classes: tuple[str, ...] = ("background", "foreground")
    arch: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0


@dataclass(frozen=True)
class TrainOptions:
    """``model.train:`` train a model from sparse annotations of this scan (``studios train``)."""

    annotations: Path
    arch: str | None = None
    params: Mapping[str, Any] | None = None
    classes: tuple[str, ...] | None = None
    minutes: float | None = None
    epochs: int | None = None
    seed: int = 0
    device: str = "cpu"


@dataclass(frozen=True)
class ModelOptions:
    """``model:`` exactly one of ``bundle`` (an existing bundle), ``init`` or ``train``."""

    bundle: Path | None = None
    init: ModelInit | None = None
    train: TrainOptions | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("bundle", "init", "train") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of bundle, init, train (got {', '.join(given) or 'none'})")

    @property
    def kind(self) -> str:
        return "bundle" if self.bundle is not None else "init" if self.init is not None else "train"


@dataclass(frozen=True)
class SegmentOptions:
    """``segment:`` the blockwise stage (see ``studios segment --help``)."""

    block: int | tuple[int, int, int] | None = None  # default 128 (on GPUs: sized to free memory)
    chunks: tuple[int, int, int] | None = None
    probabilities: bool = False
    device: str | None = None  # default cuda on GPU clusters, else cpu
    precision: str = "fp32"
    exact: bool = False
    skip_constant: bool = False
    mask: Path | None = None
    retries: int = 2


@dataclass(frozen=True)
class ClusterOptions:
    """``cluster:`` where the blocks run: the keys of a site profile's ``cluster:`` section.

    The keys are those of :class:`~pipeline.compute.cluster.ClusterSpec` (``kind``, ``workers``,
    ``threads_per_worker``, ``address``, ``memory_limit``, ``slurm``, ``adapt``, ...), checked by
    it. ``kind``: ``local`` (a LocalCluster started for the run), ``address`` (an existing
    scheduler), ``slurm`` (dask-jobqueue), ``cuda`` (one worker per GPU), or ``serial`` (blocks
    run one by one in the flow's own process; debugging and tiny scans).
    """

    kind: str = "local"
    values: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, section: Any, where: str) -> ClusterOptions:
        from pipeline.compute.cluster import ClusterSpec

        if section is None:
            section = {}
        if not isinstance(section, Mapping):
            raise ConfigError(f"{where}: expected a mapping of keys, got {section!r}")
        values = dict(section)
        kind = values.get("kind", "local")
        if kind not in CLUSTER_KINDS:
            raise ConfigError(f"{where}.kind: {kind!r} is unknown; use one of {', '.join(CLUSTER_KINDS)}")
        check = {**values, "kind": "local"} if kind == "serial" else values
        try:
            parse_section(check, ClusterSpec, where)
        except ConfigError as exc:  # ClusterSpec's own messages do not name the file
            msg = str(exc)
            raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None
        values["kind"] = kind
        return cls(kind=kind, values=values)

    def spec(self) -> Any:
        """The :class:`~pipeline.compute.cluster.ClusterSpec`, or ``None`` for ``serial``."""
        if self.kind == "serial":
            return None
        from pipeline.compute.cluster import ClusterSpec

        return parse_section(dict(self.values), ClusterSpec, "cluster")

    def to_json(self) -> dict[str, Any]:
        return _jsonable({**self.values, "kind": self.kind})


@dataclass(frozen=True)
class QCOptions:
    """``qc:`` quality control after segmentation (``studios qc``); ``truth``: a label volume."""

    enabled: bool = True
    truth: Path | None = None


@dataclass(frozen=True)
class WatchOptions:
    """``watch:`` scheduled beamline processing (``studios serve``): new scans in ``incoming``.

    A scan is complete when its marker exists (``<scan><marker>`` beside it, or ``DONE`` /
    ``<marker>`` inside a scan folder), or — with ``completion: settled`` or ``either`` — when
    its files (names, sizes, mtimes) did not change for ``settle_seconds`` across two looks.
    """

    incoming: Path
    interval: float | None = None
    cron: str | None = None
    settle_seconds: float = 120.0
    completion: str = "either"
    marker: str = ".complete"
    state_dir: Path | None = None
    max_scans: int = 0

    def __post_init__(self) -> None:
        if self.completion not in COMPLETION_RULES:
            raise ValueError(f"completion {self.completion!r} is unknown; use one of {', '.join(COMPLETION_RULES)}")
        if self.interval is not None and self.cron is not None:
            raise ValueError("give interval or cron, not both")
        if self.interval is not None and self.interval <= 0:
            raise ValueError("interval must be > 0 seconds")
        if self.settle_seconds < 0:
            raise ValueError("settle_seconds must be >= 0")


@dataclass(frozen=True)
class RunConfig:
    """A whole run: the parameters of the ``process_scan`` flow."""

    source: str | None = None
    output: Path | None = None
    name: str | None = None
    overwrite: bool = False
    ingest: IngestOptions = field(default_factory=IngestOptions)
    model: ModelOptions | None = None
    segment: SegmentOptions = field(default_factory=SegmentOptions)
    cluster: ClusterOptions = field(default_factory=ClusterOptions)
    qc: QCOptions = field(default_factory=QCOptions)
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
        data = _jsonable(dataclasses.asdict(self))
        data["cluster"] = self.cluster.to_json()
        if not with_watch:
            data.pop("watch", None)
        return {k: v for k, v in data.items() if v is not None}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def scan_name_for(source: str | os.PathLike[str]) -> str:
    """A scan's name from its path: file name without extension (``.h5:/dataset`` dropped)."""
    text = os.fspath(source)
    if text.startswith(BUNDLED_PREFIX):
        text = text[len(BUNDLED_PREFIX):]
    for suffix in _HDF5_SUFFIXES:
        if suffix + ":" in text:
            text = text.split(suffix + ":", 1)[0] + suffix
    name = Path(text.rstrip("/")).name
    for ext in (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".zarr", ".npy", ".raw", *_HDF5_SUFFIXES):
        if name.lower().endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return name or "scan"


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
            available = sorted(p.name for p in path.parent.iterdir() if p.suffix in (".tif", ".tiff", ".h5", ".npy"))
            raise ConfigError(f"{where}: no bundled file {name!r}; bundled: {', '.join(available)}")
        return str(path)
    for suffix in _HDF5_SUFFIXES:
        marker = suffix + ":"
        if marker in source:
            file_part, dataset = source.split(marker, 1)
            return str(Path(file_part + suffix).absolute()) + ":" + dataset
    return str(Path(source).expanduser().absolute())


def _source_file(source: str) -> Path:
    for suffix in _HDF5_SUFFIXES:
        if suffix + ":" in source:
            return Path(source.split(suffix + ":", 1)[0] + suffix)
    return Path(source)


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
    cfg = _parse_top(data, where)
    if require_source:
        for key in ("source", "output", "model"):
            if getattr(cfg, key) is None:
                hint = "; watched folders go to 'studios serve'" if key == "source" and cfg.watch else ""
                raise ConfigError(f"{where}: missing required key {key!r}{hint}")
    elif cfg.model is None:
        raise ConfigError(f"{where}: missing required key 'model'")
    changes: dict[str, Any] = {}
    if cfg.source is not None:
        changes["source"] = resolve_source(cfg.source, f"{where}: source")
    if cfg.output is not None:
        changes["output"] = cfg.output.expanduser().absolute()
    if cfg.name is not None and not re.fullmatch(r"[\w.+-]{1,128}", cfg.name):
        raise ConfigError(f"{where}: name {cfg.name!r} may hold letters, digits, '.', '_', '+', '-' only")
    cfg = dataclasses.replace(cfg, **changes)
    cfg = _absolute_paths(cfg)
    if check_files:
        _check_files(cfg, where)
    return cfg


_SCALARS: dict[str, tuple[type, str]] = {
    "source": (str, "a path or bundled:NAME"),
    "output": (str, "a folder path"),
    "name": (str, "a string"),
    "overwrite": (bool, "true/false"),
}
_SECTIONS: dict[str, type] = {
    "ingest": IngestOptions,
    "model": ModelOptions,
    "segment": SegmentOptions,
    "cluster": ClusterOptions,
    "qc": QCOptions,
    "watch": WatchOptions,
}


def _parse_top(data: Mapping[str, Any], where: str) -> RunConfig:
    """Errors read ``FILE: section.key: problem``."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of sections, got {data!r}")
    allowed = [f.name for f in dataclasses.fields(RunConfig)]
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if value is None:
            continue
        if key in _SCALARS:
            tp, what = _SCALARS[key]
            if not isinstance(value, tp) or (tp is str and isinstance(value, bool)):
                raise ConfigError(f"{where}: {key}: expected {what}, got {value!r}")
            kwargs[key] = Path(str(value)) if key == "output" else value
        elif key == "cluster":
            kwargs[key] = ClusterOptions.parse(value, f"{where}: cluster")
        else:
            kwargs[key] = parse_section(value, _SECTIONS[key], f"{where}: {key}")
    return RunConfig(**kwargs)


def _absolute_paths(cfg: RunConfig) -> RunConfig:
    model = cfg.model
    if model is not None and model.bundle is not None:
        model = dataclasses.replace(model, bundle=model.bundle.expanduser().absolute())
    if model is not None and model.train is not None:
        ann = str(model.train.annotations)
        annotations = (
            Path(resolve_source(ann, "model.train.annotations"))
            if ann.startswith(BUNDLED_PREFIX)
            else model.train.annotations.expanduser().absolute()
        )
        model = dataclasses.replace(model, train=dataclasses.replace(model.train, annotations=annotations))
    segment = cfg.segment
    if segment.mask is not None:
        segment = dataclasses.replace(segment, mask=segment.mask.expanduser().absolute())
    qc = cfg.qc
    if qc.truth is not None:
        qc = dataclasses.replace(qc, truth=qc.truth.expanduser().absolute())
    watch = cfg.watch
    if watch is not None:
        watch = dataclasses.replace(
            watch, incoming=watch.incoming.expanduser().absolute(),
            state_dir=watch.state_dir.expanduser().absolute() if watch.state_dir else None,
        )
    return dataclasses.replace(cfg, model=model, segment=segment, qc=qc, watch=watch)


def _check_files(cfg: RunConfig, where: str) -> None:
    checks: list[tuple[str, Path | None]] = [
        ("source", _source_file(cfg.source) if cfg.source else None),
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
