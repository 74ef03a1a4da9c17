"""Open a scan, its annotations and the loop widget in a napari viewer (``studios annotate``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from pipeline.napari.widget import StudiosWidget

WIDGET_NAME = "studios loop"


def open_session(
    viewer: Any,
    scan: str | os.PathLike[str],
    model: str | os.PathLike[str] | None = None,
    *,
    classes: Sequence[str] | None = None,
) -> StudiosWidget:
    """Open ``scan`` through the plugin's reader, add its annotations and dock the widget.

    Args:
        viewer: a ``napari.Viewer``.
        scan: an ingested scan (``.zarr``).
        model: bundle folder to preview with and to train into (default ``SCAN.model`` beside
            the scan; it need not exist yet).
        classes: class names for a new annotations image (default: the model's, the stored
            ones, or ``class1 class2``).

    Returns:
        The docked :class:`StudiosWidget`.
    """
    from pipeline.io.store import open_image

    open_image(scan, kind="scan")  # a one-line error for anything but an ingested scan
    viewer.open(os.fspath(scan), plugin="studios")
    widget = StudiosWidget(viewer, attach_open_scan=False)
    widget.attach(scan, model, tuple(classes) if classes else None)
    viewer.window.add_dock_widget(widget, name=WIDGET_NAME, area="right")
    viewer.reset_view()
    return widget
