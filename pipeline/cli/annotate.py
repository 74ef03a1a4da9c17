"""``studios annotate``: napari with a scan, its annotations and the loop widget.

::

    studios annotate SCAN.zarr [MODEL] [--classes void cement]

Annotations are kept beside the scan in ``SCAN.annotations.zarr`` (saved as you paint);
training from the widget writes the bundle to MODEL (default ``SCAN.model``). Needs the
``napari`` extra.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli.main import command
from pipeline.core.errors import ConfigError


@command("annotate")
def _annotate_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "annotate", help="annotate, train, preview and segment in napari",
        description="Start napari with the scan (multiscale, read lazily), its annotations (SCAN.annotations.zarr, "
        "created on first use, saved as you paint) and the studios widget: train in the background, live preview "
        "of the slice on screen, next suggested slice, segment the volume. Needs: pip install -e '.[napari]'.",
    )
    p.add_argument("scan", type=Path, metavar="SCAN", help="an ingested scan (.zarr)")
    p.add_argument("model", type=Path, nargs="?", metavar="MODEL",
                   help="model bundle folder to preview with and train into (default SCAN.model beside the scan)")
    p.add_argument("--classes", nargs="+", metavar="NAME", help="class names for a new annotations image")
    p.add_argument("--screenshot", type=Path, metavar="PNG",
                   help="save a screenshot of the window once the preview is drawn, then quit (scripts, docs)")
    p.set_defaults(handler=_annotate)


def _annotate(args: argparse.Namespace) -> int:
    from pipeline.io.store import open_image

    open_image(args.scan, kind="scan")  # check the scan before starting a GUI
    try:
        import napari
    except ImportError:
        raise ConfigError("napari is not installed; install the extra: pip install -e '.[napari]'") from None
    from pipeline.napari.session import open_session

    viewer = napari.Viewer(title=f"studios - {args.scan.name}")
    widget = open_session(viewer, args.scan, args.model, classes=args.classes)
    if args.screenshot is not None:
        _screenshot_when_ready(viewer, widget, args.screenshot)
    napari.run()
    return 0


def _screenshot_when_ready(viewer: object, widget: object, path: Path) -> None:
    """Save a window screenshot after the first complete preview (or after 60 s), then close."""
    from qtpy.QtCore import QTimer

    done: list[bool] = []

    def shoot(*_: object) -> None:
        if done:
            return
        done.append(True)
        viewer.screenshot(str(path), canvas_only=False)  # type: ignore[attr-defined]
        viewer.close()  # type: ignore[attr-defined]

    live = getattr(widget, "live", None)
    if live is not None and live.model is not None:
        live.finished.connect(lambda _t: QTimer.singleShot(300, shoot))
        QTimer.singleShot(60_000, shoot)
    else:
        QTimer.singleShot(1500, shoot)
