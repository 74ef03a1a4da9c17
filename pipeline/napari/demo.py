"""The annotate loop on the bundled cement scan, timed, ending in a screenshot (docs/annotate.png).

::

    xvfb-run -a -s "-screen 0 1600x1000x24" python -m pipeline.napari.demo OUT_DIR [--budget 20]

Ingests the bundled cement CT, opens it with ``open_session``, paints the bundled scribbles of
z = 24, 64, 104 with the brush into the ``annotations`` layer, presses *Train*, waits for the
preview of z = 64, saves ``OUT_DIR/annotate.png`` and prints the timings as JSON (seconds from the
first stroke to the first preview tile, training, preview of the slice).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    import napari
    from PIL import Image
    from qtpy.QtWidgets import QApplication

    from pipeline.demo import bundled_scan
    from pipeline.ingest.run import ingest
    from pipeline.napari.session import open_session

    parser = argparse.ArgumentParser(prog="python -m pipeline.napari.demo")
    parser.add_argument("out", type=Path)
    parser.add_argument("--budget", type=float, default=20.0, help="training budget in seconds")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    scan = args.out / "cement.zarr"
    ingest(bundled_scan(), scan, chunks=(64, 64, 64), overwrite=True)
    for old in (args.out / "cement.annotations.zarr", args.out / "cement.model"):
        if old.exists():
            import shutil

            shutil.rmtree(old)
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1560, 940)
    widget = open_session(viewer, scan, classes=("void", "cement"))
    app = QApplication.instance()
    ann = viewer.layers["annotations"]
    ann.brush_size = 3
    t0 = time.perf_counter()
    for z in (24, 104, 64):
        plane = np.asarray(Image.open(Path(bundled_scan()).parent / f"cement_scribbles_z{z:03d}.png"))
        viewer.dims.set_point(0, z)
        ys, xs = np.nonzero(plane)
        for y, x in list(zip(ys, xs, strict=True))[::2]:
            ann.paint((z, y, x), int(plane[y, x]), refresh=False)
        ann.refresh()
    painted = time.perf_counter() - t0
    widget.budget.setValue(args.budget)
    widget.train_button.click()

    def wait(condition: object, limit: float) -> None:
        end = time.perf_counter() + limit
        while not condition() and time.perf_counter() < end:  # type: ignore[operator]
            app.processEvents()  # type: ignore[union-attr]
            time.sleep(0.01)

    wait(lambda: widget.last_train is not None, 600)
    trained = time.perf_counter() - t0
    wait(lambda: widget.live.labels_layer is not None and widget.live._tiles > 0, 600)  # type: ignore[union-attr]
    first_preview = time.perf_counter() - t0
    wait(lambda: widget.live.last is not None and not widget.live.busy, 600)  # type: ignore[union-attr]
    viewer.layers["annotations"].opacity = 0.9
    for _ in range(20):
        app.processEvents()  # type: ignore[union-attr]
        time.sleep(0.02)
    viewer.screenshot(str(args.out / "annotate.png"), canvas_only=False, flash=False)
    last = widget.live.last  # type: ignore[union-attr]
    print(json.dumps({
        "paint_s": round(painted, 2), "stroke_to_model_s": round(trained, 2),
        "stroke_to_first_preview_s": round(first_preview, 2), "train_steps": widget.last_train.steps,
        "val_mean_iou": widget.last_train.metrics.get("val_mean_iou"),
        "preview_first_tile_s": round(last.first_s, 3) if last else None,
        "preview_slice_s": round(last.total_s, 3) if last else None,
    }))
    viewer.close()


if __name__ == "__main__":
    main()
