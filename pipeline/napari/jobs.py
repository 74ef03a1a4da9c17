"""Background work for the widget: a Qt progress bridge, cancellation, and the model cache.

Training, segmentation, suggestions and previews run in napari worker threads
(:func:`napari.qt.threading.create_worker`); torch and zarr release the GIL in their kernels,
so the viewer keeps drawing. Library code reports through :class:`QtReporter`, whose signals
cross into the GUI thread (Qt queues signals emitted from another thread).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtpy.QtCore import QObject, Signal

from pipeline.core.errors import InputError, StudiosError
from pipeline.io.bundle import load_bundle
from pipeline.models.base import StridefreeModel


class Cancelled(StudiosError):
    """The user pressed Cancel; nothing was written."""

    exit_code = 130


class QtReporter(QObject):
    """A :class:`~pipeline.core.progress.Reporter` that emits Qt signals; raises :class:`Cancelled`.

    Signals: ``started(stage, total)``, ``advanced(n)``, ``metrics_changed(dict)``, ``done()``.
    Training also calls :meth:`metrics` with ``loss``/``acc`` per step and ``val acc``/``val mIoU``
    per epoch.
    """

    started = Signal(str, int)
    advanced = Signal(int)
    metrics_changed = Signal(dict)
    done = Signal()

    def __init__(self, cancel: threading.Event | None = None) -> None:
        super().__init__()
        self.cancel = cancel or threading.Event()

    def _check(self) -> None:
        if self.cancel.is_set():
            raise Cancelled("cancelled from the widget; nothing was written")

    def start(self, stage: str, total: int) -> None:
        self._check()
        self.started.emit(str(stage), int(total))

    def advance(self, n: int = 1, *, voxels: int = 0) -> None:
        self._check()
        self.advanced.emit(int(n))

    def metrics(self, values: dict[str, Any]) -> None:
        self.metrics_changed.emit({k: float(v) for k, v in values.items() if isinstance(v, int | float)})

    def finish(self) -> None:
        self.done.emit()


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A bundle built for inference.

    Attributes:
        path: bundle folder. stamp: modification time of its ``model.json`` when loaded.
        model: the network (eval mode, CPU). classes: class names. offset, scale: the
        bundle's normalisation of the scan (``(x - offset) * scale``).
    """

    path: Path
    stamp: float
    model: StridefreeModel
    classes: tuple[str, ...]
    offset: float
    scale: float


def bundle_stamp(path: str | os.PathLike[str] | None) -> float | None:
    """mtime of ``path/model.json``, or None when there is no bundle there (yet)."""
    if path is None:
        return None
    try:
        return (Path(path) / "model.json").stat().st_mtime
    except OSError:
        return None


def load_model(path: str | os.PathLike[str], stats: Any) -> LoadedModel:
    """Load the bundle at ``path`` and its normalisation for a scan with ``stats``."""
    stamp = bundle_stamp(path)
    if stamp is None:
        raise InputError(f"{path}: holds no model bundle; train one from the widget or give a bundle folder")
    bundle = load_bundle(path)
    model = bundle.build().eval()
    offset, scale = bundle.normalization.affine(stats)
    return LoadedModel(Path(path), stamp, model, tuple(bundle.classes), float(offset), float(scale))


def run_training(scan: str, annotations: str, model_dir: str, classes: tuple[str, ...], *, seconds: float,
                 reporter: QtReporter, threads: int | None = None) -> Any:
    """Train from the annotations image for a budget of ``seconds`` (worker-thread body)."""
    from pipeline.train.loop import train

    return train(scan, annotations, model_dir, classes=classes, minutes=seconds / 60.0, seed=0,
                 overwrite=True, reporter=reporter, threads=threads)


def run_segmentation(scan: str, model_dir: str, output: str, *, profile: str | None, reporter: QtReporter,
                     workers: int = 1) -> Any:
    """Blockwise segmentation on a local Dask cluster or the cluster of a site profile."""
    from pipeline.compute.cluster import ClusterSpec
    from pipeline.segment.run import segment

    if profile:
        from pipeline.compute.cluster import cluster_spec_from_file

        spec = cluster_spec_from_file(profile)
    else:
        spec = ClusterSpec(kind="local", workers=workers)
    return segment(scan, model_dir, output, cluster=spec, reporter=reporter, overwrite=True)


def run_suggest(scan: str, model_dir: str, annotations: str, n: int = 5) -> list[Any]:
    """``pipeline.train.suggest.suggest`` ranked slices (worker-thread body)."""
    from pipeline.train.suggest import suggest

    return list(suggest(scan, model_dir, annotations, n=n))
