"""OME-Zarr 0.5 label-image metadata for segmentations and instance images.

A segmentation written by studios is an OME-Zarr *label image*: beside its ``multiscales`` the
group's ``ome`` attributes carry ``image-label`` (spec 0.5, "labels")::

    "image-label": {
      "colors":     [{"label-value": 1, "rgba": [31, 119, 180, 255]}, ...],
      "properties": [{"label-value": 1, "class": "fibre"}, ...],
      "source":     {"image": "../scan.zarr"}
    }

``source.image`` is the path of the scan relative to the label group (viewers open the scan
under the labels). The scan lists the segmentation in its ``labels/`` group
(``scan.zarr/labels/zarr.json``: ``{"ome": {"version": "0.5", "labels": ["../../seg.zarr"]}}``)
so that readers that start at the scan (ome-zarr-py, napari-ome-zarr) find it. When the
segmentation sits inside ``scan.zarr/labels/NAME`` the entry is just ``NAME``, as in the spec;
otherwise it is the relative path from ``scan.zarr/labels`` (a link: ome-zarr-py resolves it on
local and HTTP stores; the segmentation is not copied).

Neuroglancer does not read ``image-label``; :func:`segment_properties` writes the class names
as a precomputed ``segment_properties`` ``info`` file instead.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zarr

from pipeline.io.store import OME_VERSION

logger = logging.getLogger(__name__)

#: Class colours (RGBA 0-255), label 1 first: the colour-blind-safe Okabe-Ito palette.
PALETTE: tuple[tuple[int, int, int, int], ...] = (
    (0, 114, 178, 255), (230, 159, 0, 255), (0, 158, 115, 255), (204, 121, 167, 255),
    (86, 180, 233, 255), (213, 94, 0, 255), (240, 228, 66, 255), (120, 120, 120, 255),
)


def class_color(label: int) -> tuple[int, int, int, int]:
    """RGBA colour of class ``label`` (1..K); the palette repeats after 8 classes."""
    return PALETTE[(label - 1) % len(PALETTE)]


def image_label(
    classes: Sequence[str], *, source: str | None = None, extra: Sequence[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The ``image-label`` dict for labels ``1..len(classes)`` named ``classes``.

    Args:
        classes: class names for labels 1..K (0 is background / not computed: no entry).
        source: path of the intensity image relative to the label group (``None``: omitted).
        extra: further per-label properties merged by ``label-value`` (e.g. voxel counts).
    """
    props: list[dict[str, Any]] = [{"label-value": k, "class": str(name)} for k, name in enumerate(classes, start=1)]
    for item in extra or ():
        for p in props:
            if p["label-value"] == item.get("label-value"):
                p.update(item)
    out: dict[str, Any] = {
        "colors": [{"label-value": k, "rgba": list(class_color(k))} for k in range(1, len(classes) + 1)],
        "properties": props,
    }
    if source is not None:
        out["source"] = {"image": source}
    return out


def relative_source(label_dir: Path, image_dir: Path) -> str:
    """``image_dir`` relative to ``label_dir`` (POSIX separators, as OME-Zarr paths are; neither need exist)."""
    return Path(os.path.relpath(Path(image_dir).resolve(), Path(label_dir).resolve())).as_posix()


def set_label_metadata(group: zarr.Group, path: Path, classes: Sequence[str], *, scan: Path | None) -> None:
    """Add ``image-label`` to the ``ome`` attributes of label group ``group`` (at ``path``).

    The ``multiscales`` must already be there. ``scan``: the source image (``None``: no source).
    """
    ome: dict[str, Any] = dict(group.attrs.get("ome", {}))  # type: ignore[arg-type]
    source = relative_source(path, scan) if scan is not None else None
    ome["image-label"] = image_label(classes, source=source)
    group.attrs["ome"] = ome


def list_in_scan(scan: Path, label: Path) -> str | None:
    """List the label image ``label`` in ``scan/labels`` (created if missing); returns the entry.

    Idempotent. A scan that cannot be written (read-only) is left alone with a warning: the
    label image is still complete and names its source.
    """
    labels_dir = scan / "labels"
    entry = relative_source(labels_dir, label)
    try:
        root = zarr.open_group(str(scan), mode="r+")
        if "labels" in root:
            group = root["labels"]
            if not isinstance(group, zarr.Group):
                logger.warning("%s: 'labels' is not a group; %s not listed", scan, label)
                return None
        else:
            group = root.create_group("labels")
        ome: dict[str, Any] = dict(group.attrs.get("ome", {}))  # type: ignore[arg-type]
        names = [n for n in ome.get("labels", []) if n != entry]
        ome.update(version=OME_VERSION, labels=[*names, entry])
        group.attrs["ome"] = ome
    except (OSError, PermissionError) as exc:
        logger.warning("%s: cannot list the label image %s in its labels/ group (%s)", scan, label, exc)
        return None
    return entry


def mark_segmentation(group: zarr.Group, path: Path, classes: Sequence[str]) -> None:
    """Make the finished segmentation ``group`` (at ``path``) a label image of its scan.

    The scan is the one recorded in ``studios.ledger.scan``; it gets the ``labels/`` entry when
    it exists. Called once the ``multiscales`` are written.
    """
    studios: Any = group.attrs.get("studios", {})
    recorded = studios.get("ledger", {}).get("scan")
    scan = Path(str(recorded)) if recorded and Path(str(recorded)).is_dir() else None
    set_label_metadata(group, path, classes, scan=scan)
    if scan is not None:
        list_in_scan(scan, path)


def segment_properties(directory: Path, names: dict[int, str]) -> Path:
    """Write a neuroglancer precomputed ``segment_properties/info`` naming each segment id.

    Args:
        directory: the folder to create (``.../segment_properties``).
        names: segment id -> label shown by neuroglancer.
    Returns:
        The ``info`` file written.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ids = sorted(names)
    info = {
        "@type": "neuroglancer_segment_properties",
        "inline": {
            "ids": [str(i) for i in ids],
            "properties": [{"id": "label", "type": "label", "values": [names[i] for i in ids]}],
        },
    }
    path = directory / "info"
    path.write_text(json.dumps(info, indent=1))
    return path


__all__ = ["PALETTE", "class_color", "image_label", "list_in_scan", "mark_segmentation", "relative_source",
           "segment_properties", "set_label_metadata"]
