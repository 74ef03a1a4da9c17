"""The napari plugin in a real napari (PyQt6) under Xvfb with Mesa (pytest-xvfb, pytest-qt).

One session walks the loop on the bundled cement scan: open through the plugin's reader, paint
strokes on a z- and a y-slice, train with a tiny budget from the widget, the preview appears and
equals the blockwise segmentation run from the widget, Next moves to the slice ``suggest`` ranks
first, a screenshot shows the preview, and the annotations survive a restart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("napari", reason="the napari extra is not installed: pip install -e '.[napari]'")

from pipeline.demo import bundled_scan  # noqa: E402
from pipeline.ingest.run import ingest  # noqa: E402
from pipeline.napari.session import WIDGET_NAME, open_session  # noqa: E402
from pipeline.napari.store import CHUNKS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def scan(tmp_path: Path) -> Path:
    path = tmp_path / "cement.zarr"
    ingest(bundled_scan(), path, chunks=(64, 64, 64))
    return path


def _scribble(z: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(Path(bundled_scan()).parent / f"cement_scribbles_z{z:03d}.png"))


def _paint_strokes(layer: Any, viewer: Any, z: int) -> None:
    """Paint the bundled scribbles of slice z with the brush (every other stroke pixel, brush 3)."""
    viewer.dims.order = (0, 1, 2)
    viewer.dims.set_point(0, z)
    layer.brush_size = 3
    plane = _scribble(z)
    ys, xs = np.nonzero(plane)
    for y, x in list(zip(ys, xs, strict=True))[::2]:
        layer.selected_label = int(plane[y, x])
        layer.paint((z, y, x), int(plane[y, x]), refresh=False)
    layer.refresh()


def _wait_preview(qtbot: Any, widget: Any, axis: int, index: int, timeout: int = 120_000) -> None:
    def done() -> None:
        last = widget.live.last
        assert last is not None and (last.axis, last.index) == (axis, index) and not widget.live.busy

    qtbot.waitUntil(done, timeout=timeout)


def test_loop_in_a_real_viewer(make_napari_viewer: Any, qtbot: Any, scan: Path, tmp_path: Path) -> None:
    viewer = make_napari_viewer(show=True)
    widget = open_session(viewer, scan, classes=("void", "cement"))
    assert WIDGET_NAME in viewer.window.dock_widgets
    image = viewer.layers["cement.zarr"]
    assert image.multiscale and image.data[0].shape == (128, 128, 128)
    ann = viewer.layers["annotations"]
    assert ann.data.shape == (128, 128, 128) and ann.features["class"].tolist() == ["unlabelled", "void", "cement"]

    # paint on z=64 with the brush, and a stroke on a y-slice (another axis)
    t_stroke = time.perf_counter()
    _paint_strokes(ann, viewer, 64)
    viewer.dims.order = (1, 0, 2)
    viewer.dims.set_point(1, 100)
    ann.brush_size = 1
    for x in range(20, 60):
        ann.paint((30, 100, x), 2, refresh=False)
    viewer.dims.order = (0, 1, 2)
    viewer.dims.set_point(0, 64)
    assert widget.cache.dirty > 0  # painted, not yet saved ...
    qtbot.waitUntil(lambda: widget.cache.dirty == 0, timeout=10_000)  # ... saved by itself
    stored = widget.store.stored_chunks()
    painted = zip(*np.nonzero(ann.data[...]), strict=True)
    touched = {tuple(c // n for c, n in zip(p, CHUNKS, strict=True)) for p in painted}
    assert stored == sorted("c/" + "/".join(map(str, t)) for t in touched) and 0 < len(stored) < 8
    assert int(np.asarray(ann.data[30, 100, 40])) == 2 == int(np.asarray(widget.store.array[30, 100, 40]))

    # train with a tiny budget in the background; the viewer keeps processing events meanwhile
    widget.budget.setValue(10.0)
    metrics: list[dict[str, float]] = []
    widget.train_button.click()
    widget._workers["train"][1].metrics_changed.connect(metrics.append)
    assert not widget.train_button.isEnabled() and widget.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: widget.last_train is not None, timeout=180_000)
    assert widget.train_progress.value() == widget.train_progress.maximum() > 0
    assert any("loss" in m for m in metrics) and "steps in" in widget.train_info.text()
    assert (widget.model_dir / "model.json").is_file()

    # the preview of the slice on screen appears (tile by tile) in layers on that slice
    _wait_preview(qtbot, widget, 0, 64)
    first_preview = time.perf_counter() - t_stroke
    preview = viewer.layers["preview"]
    assert preview.data.shape == (1, 128, 128) and tuple(preview.translate) == (64.0, 0.0, 0.0)
    assert preview.data.min() >= 1 and set(np.unique(preview.data)) <= {1, 2}  # every voxel computed
    (tmp_path / "timing.json").write_text(json.dumps({"stroke_to_preview_s": first_preview,
                                                       "preview": widget.live.last.__dict__}))

    # bf16 preview: computed, every voxel labelled (not compared: autocast differs from fp32)
    widget.bf16_box.setChecked(True)
    _wait_preview_tiles = widget.live.last
    qtbot.waitUntil(lambda: widget.live.last is not _wait_preview_tiles and not widget.live.busy, timeout=120_000)
    assert preview.data.min() >= 1
    widget.bf16_box.setChecked(False)
    # the slice changes -> the preview follows; exact mode on
    widget.exact_box.setChecked(True)
    viewer.dims.set_point(0, 40)
    _wait_preview(qtbot, widget, 0, 40)
    exact_labels = np.array(preview.data[0])

    # segment the volume from the widget on a local Dask cluster; opened as Labels; QC report
    widget.segment_button.click()
    qtbot.waitUntil(lambda: widget.qc_report is not None or widget.error is not None, timeout=300_000)
    assert widget.error is None
    seg = viewer.layers["cement.seg.zarr"]
    assert seg.multiscale and seg.data[0].shape == (128, 128, 128)
    assert widget.qc_report.is_file() and widget.qc_button.isEnabled()
    # preview (exact) = blockwise segmentation on that slice, where the classes are not tied
    # within the default-mode float rounding of the segmentation run
    margin = 1.0 - np.asarray(viewer.layers["uncertainty"].data[0])
    seg_slice = np.asarray(seg.data[0][40])
    assert np.array_equal(exact_labels[margin > 1e-5], seg_slice[margin > 1e-5])
    assert (margin > 1e-5).mean() > 0.99

    # Next: the slice suggest() ranks first, marked; the list is shown
    widget.next_button.click()  # no suggestions yet: computes them in the background
    qtbot.waitUntil(lambda: widget.suggest_list.count() > 0, timeout=180_000)
    first = widget.suggestions[0]
    widget.next_button.click()
    axis = "zyx".index(first.axis)
    assert viewer.dims.order[0] == axis and round(viewer.dims.point[axis]) == first.index
    assert "suggestion" in viewer.layers and widget.suggest_list.currentRow() == 0
    _wait_preview(qtbot, widget, axis, first.index)

    # a screenshot of the window with the widget is non-empty and shows the preview
    viewer.dims.order = (0, 1, 2)
    viewer.dims.set_point(0, 64)
    _wait_preview(qtbot, widget, 0, 64)
    seg.visible = False
    viewer.layers["suggestion"].visible = False
    shot = viewer.screenshot(canvas_only=False, flash=False)
    assert shot.shape[0] > 400 and shot.shape[1] > 600 and shot[..., :3].std() > 10
    with_preview = viewer.screenshot(canvas_only=True, flash=False)
    preview.visible = False
    without = viewer.screenshot(canvas_only=True, flash=False)
    assert np.abs(with_preview.astype(int) - without.astype(int)).mean() > 5


def test_cancel_training_writes_nothing(make_napari_viewer: Any, qtbot: Any, scan: Path) -> None:
    viewer = make_napari_viewer(show=True)
    widget = open_session(viewer, scan, classes=("void", "cement"))
    widget.annotations_layer.data[64] = _scribble(64)
    widget.budget.setValue(120.0)
    widget.train_button.click()
    qtbot.waitUntil(lambda: widget.train_progress.value() > 0, timeout=120_000)
    widget.cancel_button.click()
    qtbot.waitUntil(lambda: "train" not in widget._workers, timeout=60_000)
    assert "cancelled" in widget.train_info.text() and widget.last_train is None
    assert not (widget.model_dir / "model.json").exists()


def test_annotations_survive_a_restart(make_napari_viewer: Any, qtbot: Any, scan: Path) -> None:
    viewer = make_napari_viewer(show=True)
    widget = open_session(viewer, scan, classes=("void", "cement"))
    ann = viewer.layers["annotations"]
    ann.brush_size = 5
    ann.paint((10, 50, 50), 2)
    widget.classes.set_color(1, "#00ff00")
    painted = np.asarray(ann.data[10])
    qtbot.waitUntil(lambda: widget.cache.dirty == 0, timeout=10_000)  # the autosave
    viewer.close()
    again = make_napari_viewer(show=True)
    widget2 = open_session(again, scan)
    ann2 = again.layers["annotations"]
    assert np.array_equal(np.asarray(ann2.data[10]), painted) and painted.sum() > 0
    assert widget2.store.classes == ("void", "cement") and widget2.store.colors[1] == "#00ff00"
    # a segmentation opened through the reader is Labels with its class names (none here: none run)
    assert again.layers["cement.zarr"].data[0].shape == (128, 128, 128)


def test_studios_annotate_cli(scan: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    bad = subprocess.run([sys.executable, "-m", "pipeline.cli", "annotate", str(tmp_path / "nope.zarr")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "nope.zarr" in bad.stderr
    png = tmp_path / "window.png"
    ok = subprocess.run([sys.executable, "-m", "pipeline.cli", "annotate", str(scan), "--classes", "void", "cement",
                         "--screenshot", str(png)], capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    from PIL import Image

    with Image.open(png) as img:
        assert img.size[0] > 600 and np.asarray(img).std() > 10
    assert (tmp_path / "cement.annotations.zarr" / "zarr.json").is_file()
