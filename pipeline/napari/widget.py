"""The dock widget: classes, train, live preview, next suggested slice, segment the volume.

The loop: paint a few strokes into the ``annotations`` layer (held in a chunk cache and
saved half a second after the last dab, only the touched chunks: :mod:`pipeline.napari.cache`,
:mod:`pipeline.napari.store`), press *Train* (background, progress, loss and validation figures,
*Cancel*), look at the ``preview`` of the slice on screen (updated when the slice changes or a
new model is written), press *Next* to jump to the slice the model is least sure about and draw
there, and when it looks right press *Segment* for the blockwise run on the whole volume; its
labels open as a layer and the QC report is one click away.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from qtpy.QtCore import QTimer, QUrl
from qtpy.QtGui import QDesktopServices
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from pipeline.core.errors import StudiosError
from pipeline.napari import jobs
from pipeline.napari.cache import ChunkCache
from pipeline.napari.classes import ClassTable
from pipeline.napari.live import LivePreview, PreviewTiming
from pipeline.napari.reader import label_colormap, labels_layer
from pipeline.napari.store import AnnotationStore, open_annotations

logger = logging.getLogger(__name__)
AXES = "zyx"
AUTOSAVE_MS = 500  # painted chunks are written this long after the last brush dab


def model_path_for(scan: str | os.PathLike[str]) -> Path:
    """Default model folder of a scan: ``scan.zarr`` -> ``scan.model``."""
    p = Path(scan)
    return p.with_name((p.name[:-5] if p.name.endswith(".zarr") else p.name) + ".model")


def segmentation_path_for(scan: str | os.PathLike[str]) -> Path:
    """Default segmentation of a scan: ``scan.zarr`` -> ``scan.seg.zarr``."""
    p = Path(scan)
    return p.with_name((p.name[:-5] if p.name.endswith(".zarr") else p.name) + ".seg.zarr")


class StudiosWidget(QWidget):
    """The studios loop for the scan open in ``napari_viewer`` (see the module docstring)."""

    def __init__(self, napari_viewer: Any, *, attach_open_scan: bool = True) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.scan: Path | None = None
        self.model_dir: Path | None = None
        self.store: AnnotationStore | None = None
        self.annotations_layer: Any = None
        self.live: LivePreview | None = None
        self.suggestions: list[Any] = []
        self.qc_report: Path | None = None
        self.segmentation: Path | None = None
        self.last_train: Any = None
        self.error: str | None = None
        self._cancel = threading.Event()
        self._workers: dict[str, Any] = {}
        self._next = 0
        self.cache: ChunkCache | None = None
        self._autosave = QTimer(self)
        self._autosave.setSingleShot(True)
        self._autosave.setInterval(AUTOSAVE_MS)
        self._autosave.timeout.connect(self.save_annotations)
        self._build()
        for layer in self.viewer.layers if attach_open_scan else ():
            if layer.metadata.get("studios_kind") == "scan":
                self.attach(layer.metadata["path"])
                break

    # ------------------------------------------------------------------ layout

    def _build(self) -> None:
        self.status = QLabel("open a studios scan (File > Open, or 'studios annotate SCAN.zarr')")
        self.status.setWordWrap(True)
        self.classes = ClassTable()
        self.classes.changed.connect(self._classes_changed)
        self.classes.selected.connect(self._select_label)

        self.budget = QDoubleSpinBox()
        self.budget.setRange(1.0, 3600.0)
        self.budget.setValue(30.0)
        self.budget.setSuffix(" s")
        self.train_button = QPushButton("Train")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.train_button.clicked.connect(self.train)
        self.cancel_button.clicked.connect(self.cancel)
        self.train_progress = QProgressBar()
        self.train_info = QLabel("no model yet")
        self.train_info.setWordWrap(True)

        self.preview_box = QCheckBox("live preview")
        self.preview_box.setChecked(True)
        self.exact_box = QCheckBox("exact")
        self.exact_box.setToolTip("bit-identical to the blockwise segmentation (oneDNN off: slower)")
        self.bf16_box = QCheckBox("bf16")
        self.bf16_box.setToolTip("bfloat16 autocast: about 2x faster on CPUs with AMX; labels may differ at near-ties")
        self.bf16_box.toggled.connect(self._preview_options)
        self.preview_box.toggled.connect(self._preview_options)
        self.exact_box.toggled.connect(self._preview_options)
        self.preview_info = QLabel("")

        self.suggest_button = QPushButton("Suggest")
        self.next_button = QPushButton("Next")
        self.suggest_button.clicked.connect(self.refresh_suggestions)
        self.next_button.clicked.connect(self.next_suggestion)
        self.suggest_list = QListWidget()
        self.suggest_list.setMaximumHeight(110)
        self.suggest_list.itemDoubleClicked.connect(lambda item: self.go_to(self.suggest_list.row(item)))

        self.where = QComboBox()
        self.where.addItems(["local cluster", "site profile"])
        self.profile = QLineEdit()
        self.profile.setPlaceholderText("site profile YAML (SLURM, GPU node)")
        self.segment_button = QPushButton("Segment volume")
        self.segment_button.clicked.connect(self.segment)
        self.segment_progress = QProgressBar()
        self.qc_button = QPushButton("Open QC report")
        self.qc_button.setEnabled(False)
        self.qc_button.clicked.connect(self.open_qc)

        layout = QVBoxLayout(self)
        layout.addWidget(self.status)
        layout.addWidget(_group("Classes (paint into 'annotations')", self.classes))
        train = QFormLayout()
        train.addRow("budget", self.budget)
        train.addRow(_row(self.train_button, self.cancel_button))
        train.addRow(self.train_progress)
        train.addRow(self.train_info)
        layout.addWidget(_group("Train", train))
        options = _row(self.preview_box, self.exact_box, self.bf16_box)
        layout.addWidget(_group("Preview", _vbox(options, self.preview_info)))
        layout.addWidget(_group("Suggestions", _vbox(_row(self.suggest_button, self.next_button), self.suggest_list)))
        layout.addWidget(_group("Segment", _vbox(_row(self.where, self.profile), self.segment_button,
                                                 self.segment_progress, self.qc_button)))
        layout.addStretch(1)

    # ------------------------------------------------------------------ session

    def attach(self, scan: str | os.PathLike[str], model: str | os.PathLike[str] | None = None,
               classes: tuple[str, ...] | None = None) -> None:
        """Use ``scan`` (already open as a layer, or opened now), its annotations and ``model``."""
        from pipeline.io.store import open_image

        self.scan = Path(scan).resolve()
        self.model_dir = Path(model).resolve() if model is not None else model_path_for(self.scan)
        image = open_image(self.scan, kind="scan")
        self._stats = image.stats
        if classes is None and jobs.bundle_stamp(self.model_dir) is not None:
            from pipeline.io.bundle import load_bundle

            classes = tuple(load_bundle(self.model_dir).classes)
        self.store = open_annotations(self.scan, classes=classes)
        scan_layer = self._layer_by_path(self.scan)
        if scan_layer is None:
            scan_layer = self.viewer.open(str(self.scan), plugin="studios")[0]
        self.annotations_layer = self._layer_by_path(self.store.path)
        if self.annotations_layer is None:
            _, kwargs, _ = labels_layer(self.store.path)
            kwargs["name"] = "annotations"
            self.cache = ChunkCache(self.store.array)
            self.annotations_layer = self.viewer.add_labels(self.cache, **kwargs)
            self.annotations_layer.events.paint.connect(self._painted)
            self.annotations_layer.events.labels_update.connect(self._painted)
            self.viewer.layers.events.removing.connect(lambda *_: self.save_annotations())
        self.annotations_layer.colormap = label_colormap(self.store.colors)
        self.annotations_layer.features = {"class": ["unlabelled", *self.store.classes]}
        self.annotations_layer.selected_label = 1
        self.classes.set_classes(self.store.classes, self.store.colors)
        self.live = LivePreview(self.viewer, scan_layer, image.array, self.store.colors)
        self.live.updated.connect(self._preview_tile)
        self.live.finished.connect(self._preview_done)
        self._preview_options()
        self.viewer.layers.selection.active = self.annotations_layer
        self.status.setText(f"scan {self.scan.name} {tuple(image.shape)}; annotations {self.store.path.name}; "
                            f"model {self.model_dir.name}")
        self._load_model()

    def _painted(self, *_: Any) -> None:
        self._autosave.start()

    def save_annotations(self) -> int:
        """Write the chunks painted since the last save; returns how many (also runs by itself)."""
        self._autosave.stop()
        return self.cache.flush() if self.cache is not None else 0

    def closeEvent(self, event: Any) -> None:  # noqa: N802 - Qt's name
        self.save_annotations()
        super().closeEvent(event)

    def _layer_by_path(self, path: Path) -> Any:
        for layer in self.viewer.layers:
            if layer.metadata.get("path") == str(Path(path).resolve()):
                return layer
        return None

    def _load_model(self) -> None:
        if self.live is None or jobs.bundle_stamp(self.model_dir) is None:
            return
        try:
            loaded = jobs.load_model(self.model_dir, self._stats)  # type: ignore[arg-type]
        except StudiosError as exc:
            self._fail(str(exc))
            return
        self.train_info.setText(self.train_info.text() if self.last_train else f"model {loaded.path.name}")
        self.live.set_model(loaded)

    def _fail(self, message: str) -> None:
        self.error = message
        self.status.setText(f"error: {message}")
        logger.error("%s", message)

    def _classes_changed(self, names: tuple[str, ...], colors: tuple[str, ...]) -> None:
        if self.store is None:
            return
        try:
            self.store = self.store.with_classes(names, colors)
        except StudiosError as exc:
            self._fail(str(exc))
            self.classes.set_classes(self.store.classes, self.store.colors)
            return
        self.annotations_layer.colormap = label_colormap(colors)
        self.annotations_layer.features = {"class": ["unlabelled", *names]}
        if self.live is not None:
            self.live.set_colors(colors)

    def _select_label(self, label: int) -> None:
        if self.annotations_layer is not None:
            self.annotations_layer.selected_label = label

    # ------------------------------------------------------------------ train

    def train(self) -> None:
        """Train on the annotations in a worker thread for the budget shown."""
        if self.store is None or "train" in self._workers:
            return
        from napari.qt.threading import create_worker

        self.save_annotations()
        self._cancel = threading.Event()
        reporter = jobs.QtReporter(self._cancel)
        reporter.started.connect(lambda stage, total: self.train_progress.setRange(0, max(total, 1)))
        reporter.advanced.connect(lambda n: self.train_progress.setValue(self.train_progress.value() + n))
        reporter.metrics_changed.connect(self._train_metrics)
        self._metrics: dict[str, float] = {}
        self.train_progress.setValue(0)
        worker = create_worker(jobs.run_training, str(self.scan), str(self.store.path), str(self.model_dir),
                               self.store.classes, seconds=float(self.budget.value()), reporter=reporter,
                               _start_thread=False, _ignore_errors=True)
        worker.returned.connect(self._trained)
        worker.errored.connect(lambda exc: self._job_failed("train", exc))
        worker.finished.connect(lambda: self._job_done("train"))
        self._workers["train"] = (worker, reporter)
        self.train_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.train_info.setText("training ...")
        worker.start()

    def cancel(self) -> None:
        self._cancel.set()

    def _train_metrics(self, values: dict[str, float]) -> None:
        self._metrics.update(values)
        self.train_info.setText("  ".join(f"{k} {v:.3f}" for k, v in self._metrics.items()))

    def _trained(self, result: Any) -> None:
        self.last_train = result
        m = result.metrics
        val = (f"validation accuracy {m['val_accuracy']:.3f}, mean IoU {m['val_mean_iou']:.3f}"
               if "val_accuracy" in m else "no validation (too few labelled tiles)")
        self.train_info.setText(f"{result.steps} steps in {result.seconds:.1f}s, loss {m.get('loss_last', 0):.3f}; "
                                f"{val}")
        self.train_progress.setValue(self.train_progress.maximum())
        self._load_model()

    def _job_failed(self, name: str, exc: BaseException) -> None:
        if isinstance(exc, jobs.Cancelled):
            (self.train_info if name == "train" else self.status).setText(f"{name}: cancelled, nothing written")
            return
        self._fail(f"{name}: {exc}")

    def _job_done(self, name: str) -> None:
        self._workers.pop(name, None)
        self.train_button.setEnabled("train" not in self._workers)
        self.cancel_button.setEnabled("train" in self._workers or "segment" in self._workers)
        self.segment_button.setEnabled("segment" not in self._workers)
        self.suggest_button.setEnabled("suggest" not in self._workers)

    # ------------------------------------------------------------------ preview

    def _preview_options(self, *_: Any) -> None:
        if self.live is None:
            return
        self.live.enabled = self.preview_box.isChecked()
        self.live.exact = self.exact_box.isChecked()
        self.live.precision = "bf16" if self.bf16_box.isChecked() else "fp32"
        self.live.request()

    def _preview_tile(self, axis: int, index: int, tiles: int) -> None:
        self.preview_info.setText(f"{AXES[axis]}={index}: {tiles} tile{'s' * (tiles != 1)} ...")

    def _preview_done(self, timing: PreviewTiming) -> None:
        self.preview_info.setText(f"{AXES[timing.axis]}={timing.index}: first tile {timing.first_s:.2f}s, "
                                  f"slice {timing.total_s:.2f}s ({timing.tiles} tiles)")

    # ------------------------------------------------------------------ suggestions

    def refresh_suggestions(self) -> None:
        """Rank slices with ``studios suggest`` (worker thread) and list them."""
        if self.store is None or "suggest" in self._workers or jobs.bundle_stamp(self.model_dir) is None:
            if jobs.bundle_stamp(self.model_dir) is None:
                self.status.setText("suggestions need a model: train first")
            return
        from napari.qt.threading import create_worker

        self.save_annotations()
        worker = create_worker(jobs.run_suggest, str(self.scan), str(self.model_dir), str(self.store.path),
                               _start_thread=False, _ignore_errors=True)
        worker.returned.connect(self.set_suggestions)
        worker.errored.connect(lambda exc: self._job_failed("suggest", exc))
        worker.finished.connect(lambda: self._job_done("suggest"))
        self._workers["suggest"] = (worker, None)
        self.suggest_button.setEnabled(False)
        worker.start()

    def set_suggestions(self, suggestions: list[Any]) -> None:
        """Show ``suggestions`` (``Suggestion(axis, index, score, box, reason)``, best first)."""
        self.suggestions = list(suggestions)
        self._next = 0
        self.suggest_list.clear()
        for s in self.suggestions:
            self.suggest_list.addItem(f"{s.axis}={s.index}  score {s.score:.3f}  {s.reason}")

    def next_suggestion(self) -> None:
        """Jump to the next suggested slice (the first after a refresh) and mark where to draw."""
        if not self.suggestions:
            self.refresh_suggestions()
            return
        self.go_to(self._next % len(self.suggestions))
        self._next += 1

    def go_to(self, row: int) -> None:
        """Show suggestion ``row``: its slice on screen, a rectangle around its box (or the slice)."""
        s = self.suggestions[row]
        axis = AXES.index(str(s.axis))
        shape = tuple(int(n) for n in self.store.array.shape)  # type: ignore[union-attr]
        voxel = tuple(float(v) for v in self.annotations_layer.scale[-3:])
        self.viewer.dims.order = (axis, *(d for d in range(3) if d != axis))
        self.viewer.dims.set_point(axis, int(s.index) * voxel[axis])
        a, b = (d for d in range(3) if d != axis)
        if s.box is not None:
            (ra, rb), (ea, eb) = (s.box.offset[a], s.box.offset[b]), (s.box.end[a], s.box.end[b])
        else:
            ra, rb, ea, eb = 0, 0, shape[a], shape[b]
        corners = []
        for ca, cb in ((ra, rb), (ra, eb), (ea, eb), (ea, rb)):
            p = [0.0, 0.0, 0.0]
            p[axis], p[a], p[b] = float(s.index), float(ca) - 0.5, float(cb) - 0.5
            corners.append(p)
        if "suggestion" in self.viewer.layers:
            self.viewer.layers.remove("suggestion")
        self.viewer.add_shapes([corners], shape_type="rectangle", name="suggestion", scale=voxel, edge_width=2,
                               edge_color="yellow", face_color="transparent")
        self.viewer.layers.selection.active = self.annotations_layer
        self.suggest_list.setCurrentRow(row)
        self.status.setText(f"draw on {s.axis}={s.index}: {s.reason}")

    # ------------------------------------------------------------------ segment

    def segment(self) -> None:
        """Blockwise segmentation of the whole scan in the background; opens the labels when done."""
        if self.scan is None or "segment" in self._workers:
            return
        if jobs.bundle_stamp(self.model_dir) is None:
            self.status.setText("segmentation needs a model: train first")
            return
        from napari.qt.threading import create_worker

        profile = self.profile.text().strip() if self.where.currentIndex() == 1 else None
        self._cancel = threading.Event()
        reporter = jobs.QtReporter(self._cancel)
        reporter.started.connect(lambda stage, total: self.segment_progress.setRange(0, max(total, 1)))
        reporter.advanced.connect(lambda n: self.segment_progress.setValue(self.segment_progress.value() + n))
        self.segment_progress.setValue(0)
        self.segmentation = segmentation_path_for(self.scan)
        worker = create_worker(jobs.run_segmentation, str(self.scan), str(self.model_dir), str(self.segmentation),
                               profile=profile or None, reporter=reporter, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(self._segmented)
        worker.errored.connect(lambda exc: self._job_failed("segment", exc))
        worker.finished.connect(lambda: self._job_done("segment"))
        self._workers["segment"] = (worker, reporter)
        self.segment_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.status.setText(f"segmenting into {self.segmentation.name} ...")
        worker.start()

    def _segmented(self, result: Any) -> None:
        name = Path(str(self.segmentation)).name
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        data, kwargs, _ = labels_layer(str(self.segmentation))
        self.viewer.add_labels(data, **kwargs)
        self.qc_report = Path(result.qc) if result.qc else None
        self.qc_button.setEnabled(self.qc_report is not None and self.qc_report.is_file())
        self.segment_progress.setValue(self.segment_progress.maximum())
        self.status.setText(f"segmented {result.blocks_done} blocks in {result.seconds:.1f}s: "
                            + ", ".join(f"{k} {100 * v:.1f}%" for k, v in result.class_fractions.items()))

    def open_qc(self) -> bool:
        """Open the QC report of the last segmentation in the desktop's browser."""
        if self.qc_report is None:
            return False
        return bool(QDesktopServices.openUrl(QUrl.fromLocalFile(str(self.qc_report))))


def _group(title: str, content: Any) -> QGroupBox:
    box = QGroupBox(title)
    if isinstance(content, QWidget):
        inner = QVBoxLayout(box)
        inner.setContentsMargins(4, 4, 4, 4)
        inner.addWidget(content)
    else:
        box.setLayout(content)
    return box


def _row(*widgets: QWidget) -> QWidget:
    w = QWidget()
    lay = QHBoxLayout(w)
    lay.setContentsMargins(0, 0, 0, 0)
    for x in widgets:
        lay.addWidget(x)
    return w


def _vbox(*widgets: QWidget) -> QVBoxLayout:
    lay = QVBoxLayout()
    for x in widgets:
        lay.addWidget(x)
    return lay
