"""The live preview in the viewer: follows the slice on screen and the model on disk.

For the slice shown (the first axis of ``viewer.dims.order`` and its current index) a worker
thread predicts the slice tile by tile (:func:`pipeline.napari.preview.preview_slice`, nearest
the view centre first) and each tile is drawn as it arrives in two layers that sit exactly on
that slice: ``preview`` (Labels, the class colours) and ``uncertainty`` (Image, 1 - top-2 margin).
A new request (slice change, new model) stops the running one after its current tile.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from qtpy.QtCore import QObject, QTimer, Signal

from pipeline.napari.jobs import LoadedModel
from pipeline.napari.preview import DEFAULT_TILE, PreviewTile, plane_slices, preview_slice
from pipeline.napari.reader import label_colormap

logger = logging.getLogger(__name__)
DEBOUNCE_MS = 120


@dataclass(frozen=True)
class PreviewTiming:
    """One finished preview: slice, tiles, seconds to the first tile and to the whole slice."""

    axis: int
    index: int
    tiles: int
    first_s: float
    total_s: float


class LivePreview(QObject):
    """Keeps ``preview``/``uncertainty`` layers in step with the viewer's slice and a model.

    Signals: ``updated(axis, index, tiles_done)`` after each tile, ``finished(PreviewTiming)``.
    """

    updated = Signal(int, int, int)
    finished = Signal(object)

    def __init__(self, viewer: Any, scan_layer: Any, scan_array: Any, colors: tuple[str, ...]) -> None:
        super().__init__()
        self.viewer = viewer
        self.scan_layer = scan_layer
        self.scan = scan_array
        self.shape = tuple(int(s) for s in scan_array.shape)
        self.voxel = tuple(float(s) for s in scan_layer.scale[-3:])
        self.colors = colors
        self.model: LoadedModel | None = None
        self.enabled = True
        self.exact = False
        self.precision = "fp32"  # "bf16": autocast, faster on CPUs with AMX; not equal to an fp32 run
        self.tile = DEFAULT_TILE
        self.last: PreviewTiming | None = None
        self._worker: Any = None
        self._pending = False
        self._slice: tuple[int, int] | None = None
        self._t0 = 0.0
        self._first: float | None = None
        self._tiles = 0
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(DEBOUNCE_MS)
        self._timer.timeout.connect(self.request)
        viewer.dims.events.current_step.connect(self._schedule)
        viewer.dims.events.order.connect(self._schedule)
        self.labels_layer: Any = None
        self.uncertainty_layer: Any = None

    # ------------------------------------------------------------------ state

    def current_slice(self) -> tuple[int, int]:
        """(axis, index) of the slice on screen, in scan voxels."""
        axis = int(self.viewer.dims.order[0])
        point = self.scan_layer.world_to_data(self.viewer.dims.point)
        index = int(np.clip(round(float(point[axis])), 0, self.shape[axis] - 1))
        return axis, index

    def set_model(self, model: LoadedModel | None) -> None:
        self.model = model
        self.request()

    def set_colors(self, colors: tuple[str, ...]) -> None:
        self.colors = colors
        if self.labels_layer is not None:
            self.labels_layer.colormap = label_colormap(colors)

    @property
    def busy(self) -> bool:
        return self._worker is not None

    def _schedule(self, *_: Any) -> None:
        self._timer.start()

    # ------------------------------------------------------------------ work

    def request(self) -> None:
        """Predict the slice on screen (after the running preview stops)."""
        if not self.enabled or self.model is None:
            return
        if self.scan_layer not in self.viewer.layers:  # the scan was closed (or the viewer is closing)
            self.enabled = False
            return
        if self._worker is not None:
            self._pending = True
            self._worker.quit()
            return
        from napari.qt.threading import create_worker

        axis, index = self.current_slice()
        self._prepare_layers(axis, index)
        a, b = (d for d in range(3) if d != axis)
        camera = getattr(getattr(self.viewer, "scene", None), "camera", None) or self.viewer.camera
        centre = self.scan_layer.world_to_data(camera.center)
        focus = (float(centre[a]), float(centre[b])) if len(centre) == 3 else None
        model = self.model
        self._slice, self._t0, self._first, self._tiles = (axis, index), time.perf_counter(), None, 0
        self._pending = False
        worker = create_worker(preview_slice, model.model, self.scan, axis, index, offset=model.offset,
                               scale=model.scale, tile=self.tile, focus=focus, exact=self.exact,
                               precision="fp32" if self.exact else self.precision,
                               _start_thread=False, _ignore_errors=True)
        worker.yielded.connect(self._on_tile)
        worker.finished.connect(self._on_done)
        worker.errored.connect(self._on_error)
        self._worker = worker
        worker.start()

    def _prepare_layers(self, axis: int, index: int) -> None:
        plane = [s if d != axis else 1 for d, s in enumerate(self.shape)]
        translate = [0.0, 0.0, 0.0]
        translate[axis] = index * self.voxel[axis]
        labels = np.zeros(plane, np.uint8)
        unc = np.zeros(plane, np.float32)
        if self.labels_layer is None or self.labels_layer not in self.viewer.layers:
            self.uncertainty_layer = self.viewer.add_image(
                unc, name="uncertainty", scale=self.voxel, translate=translate, colormap="inferno",
                contrast_limits=(0.0, 1.0), blending="additive", visible=False)
            self.labels_layer = self.viewer.add_labels(
                labels, name="preview", scale=self.voxel, translate=translate, opacity=0.45,
                colormap=label_colormap(self.colors), blending="translucent_no_depth")
            self._keep_annotations_on_top()
        else:
            self.labels_layer.data, self.labels_layer.translate = labels, translate
            self.uncertainty_layer.data, self.uncertainty_layer.translate = unc, translate

    def _keep_annotations_on_top(self) -> None:
        """Strokes stay visible above the preview, and painting stays on the annotations layer."""
        layers = self.viewer.layers
        for i, layer in enumerate(layers):
            if layer.metadata.get("studios_kind") == "annotations":
                layers.move(i, len(layers))
                layers.selection.active = layer
                break

    def _on_tile(self, tile: PreviewTile) -> None:
        if self._slice is None:
            return
        axis, _ = self._slice
        sa, sb = plane_slices(tile.block, axis)
        index: list[Any] = [slice(None), slice(None), slice(None)]
        a, b = (d for d in range(3) if d != axis)
        index[axis], index[a], index[b] = 0, sa, sb
        self.labels_layer.data[tuple(index)] = np.squeeze(tile.labels, axis=axis)
        self.uncertainty_layer.data[tuple(index)] = np.squeeze(tile.uncertainty, axis=axis)
        self.labels_layer.refresh()
        self.uncertainty_layer.refresh()
        self._tiles += 1
        if self._first is None:
            self._first = time.perf_counter() - self._t0
        self.updated.emit(axis, self._slice[1], self._tiles)

    def _on_done(self) -> None:
        self._worker = None
        if self._slice is not None and self._first is not None:
            total = time.perf_counter() - self._t0
            self.last = PreviewTiming(self._slice[0], self._slice[1], self._tiles, self._first, total)
            self.finished.emit(self.last)
        if self._pending:
            self.request()

    def _on_error(self, exc: BaseException) -> None:
        logger.error("preview failed: %s", exc)
