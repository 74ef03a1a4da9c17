"""The report's figures: PNGs drawn with matplotlib (Agg, no pyplot state) as ``data:`` URIs.

Every function returns the figure as a string ``data:image/png;base64,...`` ready for an
``<img src>``, so the report stays one self-contained file. Planes of large volumes are read
from the coarsest pyramid level that still gives about :data:`MAX_PX` pixels on a side.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from pipeline.core.geometry import AXES
from pipeline.io.store import Image

MAX_PX = 384


def figure(
    width: float, height: float, margins: tuple[float, float, float, float], *, wspace: float = 0.3,
    hspace: float = 0.45
) -> Any:
    """A pyplot-free Agg figure with fixed ``margins`` (left, right, bottom, top in inches).

    Fixed margins instead of constrained layout: QC runs after every segmentation, and the
    layout engine doubles the rendering time.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=80)
    left, right, bottom, top = margins
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        wspace=wspace, hspace=hspace)
    return fig


def png_uri(fig: Any) -> str:
    """``fig`` as a PNG ``data:`` URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def colors(k: int) -> np.ndarray:
    """(k, 4) float64 RGBA: the tab10 colours, repeating."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return np.array([cmap(i % 10) for i in range(k)], dtype=np.float64)


def levels(group: zarr.Group) -> list[zarr.Array]:
    """The pyramid ``0``, ``1``, ... of an image group (level 0 first)."""
    out: list[zarr.Array] = []
    while True:
        try:
            arr = group[str(len(out))]
        except KeyError:
            return out
        if not isinstance(arr, zarr.Array):
            return out
        out.append(arr)


def plane_reader(pyramids: Sequence[Sequence[zarr.Array]], shape: Sequence[int]) -> tuple[int, int]:
    """(level, step) so that a plane is at most about MAX_PX pixels on a side."""
    available = min(len(lv) for lv in pyramids)
    level = 0
    while level + 1 < available and max(-(-s // 2**level) for s in shape) > MAX_PX:
        level += 1
    size = max(-(-s // 2**level) for s in shape)
    return level, max(1, math.ceil(size / MAX_PX))


def plane(arr: zarr.Array, axis: int, index: int, step: int) -> np.ndarray:
    """The plane ``index`` across ``axis`` of a (..., Z, Y, X) array, every ``step``-th pixel."""
    sl: list[Any] = [slice(None, None, step)] * 3
    sl[axis] = min(index, arr.shape[-3 + axis] - 1)
    return np.asarray(arr[(..., *sl)])


def aspect(voxel: Sequence[float], axis: int) -> float:
    """Pixel aspect ratio of a plane across ``axis`` for anisotropic voxels."""
    rows, cols = [i for i in range(3) if i != axis]
    return float(voxel[rows]) / float(voxel[cols])


@dataclass(frozen=True)
class Slices:
    """The orthogonal-slices figure and how it was read (pyramid ``level``, every ``step``-th voxel)."""

    uri: str
    level: int
    step: int
    with_scan: bool


def slices(data: Mapping[str, Any], labels: zarr.Group, scan: Image | None, classes: Sequence[str]) -> Slices:
    """Middle slices along each axis: the scan (when given) and the labels overlaid."""
    shape = data["volume"]["shape"]
    voxel = data["volume"]["voxel_size"]
    label_levels = levels(labels)
    scan_levels = levels(zarr.open_group(str(scan.path), mode="r")) if scan is not None else []
    level, step = plane_reader([label_levels] + ([scan_levels] if scan_levels else []), shape)
    palette = colors(len(classes))
    rows = 2 if scan_levels else 1
    fig = figure(12, 4.0 * rows + 0.5, (0.1, 0.1, 0.5, 0.3), wspace=0.05, hspace=0.15)
    axes = fig.subplots(rows, 3, squeeze=False)
    vmin = vmax = None
    if scan is not None:
        pct = scan.attrs.get("stats", {}).get("percentiles", {})
        vmin, vmax = pct.get("0.5"), pct.get("99.5")
    for a in range(3):
        index = shape[a] // 2
        lab = plane(label_levels[level], a, index // 2**level, step)
        overlay = np.zeros((*lab.shape, 4))
        for c in range(len(classes)):
            overlay[lab == c + 1] = (*palette[c][:3], 0.45)
        top = axes[0][a]
        if scan_levels:
            raw = plane(scan_levels[level], a, index // 2**level, step).astype(np.float32)
            for ax in (axes[0][a], axes[1][a]):
                ax.imshow(raw, cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect(voxel, a), interpolation="nearest")
            top.set_title(f"scan, {AXES[a]} = {index}")
            axes[1][a].imshow(overlay, aspect=aspect(voxel, a), interpolation="nearest")
            axes[1][a].set_title(f"segmentation overlaid, {AXES[a]} = {index}")
        else:
            top.imshow(overlay, aspect=aspect(voxel, a), interpolation="nearest")
            top.set_title(f"segmentation, {AXES[a]} = {index}")
        for r in range(rows):
            axes[r][a].set_xticks([])
            axes[r][a].set_yticks([])
    from matplotlib.patches import Patch

    handles = [Patch(color=palette[c], label=f"{c + 1} {name}") for c, name in enumerate(classes)]
    fig.legend(handles=handles, loc="lower center", ncols=min(len(classes), 8), frameon=False)
    return Slices(png_uri(fig), level, step, bool(scan_levels))


def fractions(classes: Sequence[Mapping[str, Any]]) -> str:
    """Horizontal bars: % of computed voxels per class."""
    fig = figure(7, 1.2 + 0.4 * len(classes), (1.6, 0.2, 0.6, 0.1))
    ax = fig.subplots()
    values = [100 * (c["fraction"] or 0.0) for c in classes]
    ax.barh([f"{c['label']} {c['name']}" for c in classes], values, color=colors(len(classes)))
    ax.invert_yaxis()
    ax.set_xlabel("% of computed voxels")
    return png_uri(fig)


def profiles(data: Mapping[str, Any], classes: Sequence[str]) -> str:
    """Class fractions (and, when known, mean confidence) slice by slice along each axis."""
    profs = data["profiles"]
    has_conf = any(v is not None for a in AXES for v in profs[a]["confidence"])
    rows = 2 if has_conf else 1
    fig = figure(12, 3.2 * rows, (0.8, 0.2, 0.6, 0.2))
    axes = fig.subplots(rows, 3, squeeze=False)
    palette = colors(len(classes))
    for a, axis in enumerate(AXES):
        ax = axes[0][a]
        for c, name in enumerate(classes):
            y = np.array([np.nan if v is None else v for v in profs[axis]["fractions"][name]], dtype=float)
            ax.plot(np.arange(len(y)), y, color=palette[c], label=name, lw=1.2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(f"{axis} (slice)")
        ax.set_ylabel("class fraction")
        if a == 0 and classes:
            ax.legend(fontsize=8)
        if has_conf:
            cax = axes[1][a]
            conf = np.array([np.nan if v is None else v for v in profs[axis]["confidence"]], dtype=float)
            cax.plot(np.arange(len(conf)), conf, color="#444", lw=1.2)
            cax.axhline(data["confidence"]["threshold"], color="#cf222e", lw=0.8, ls="--")
            cax.set_ylim(0, 1.02)
            cax.set_xlabel(f"{axis} (slice)")
            cax.set_ylabel("mean max probability")
    return png_uri(fig)


def intensity(hist: Mapping[str, Any], classes: Sequence[str]) -> str:
    """Normalised intensity histogram of each class (``intensity_histograms`` of qc.json)."""
    edges = np.asarray(hist["edges"], dtype=float)
    centres = (edges[:-1] + edges[1:]) / 2
    fig = figure(9, 3.4, (0.9, 0.2, 0.6, 0.2))
    ax = fig.subplots()
    palette = colors(len(classes))
    drawn = 0
    for c, name in enumerate(classes):
        counts = np.asarray(hist["counts"][name], dtype=float)
        if counts.sum() > 0:
            ax.step(centres, counts / counts.sum(), where="mid", color=palette[c], label=name)
            drawn += 1
    ax.set_xlabel("scan intensity (0.1-99.9 percentile range; outliers in the end bins)")
    ax.set_ylabel("fraction of the class")
    if drawn:
        ax.legend(fontsize=8)
    return png_uri(fig)


def confidence_histogram(conf: Mapping[str, Any]) -> str:
    """Histogram of the max class probability, with the threshold dashed."""
    fig = figure(6, 2.8, (0.9, 0.2, 0.6, 0.2))
    ax = fig.subplots()
    edges = np.asarray(conf["histogram"]["edges"], dtype=float)
    counts = np.asarray(conf["histogram"]["counts"], dtype=float)
    total = counts.sum()
    ax.bar(edges[:-1], counts / total if total else counts, width=np.diff(edges), align="edge", color="#57606a",
           edgecolor="white")
    ax.axvline(conf["threshold"], color="#cf222e", ls="--", lw=1)
    ax.set_xlabel("max class probability")
    ax.set_ylabel("fraction of voxels")
    return png_uri(fig)


def confidence_maps(data: Mapping[str, Any], probabilities: zarr.Array) -> str:
    """Max probability on the middle slices; ``probabilities``: (K, Z, Y, X) uint8."""
    shape = data["volume"]["shape"]
    _, step = plane_reader([[probabilities]], shape)
    k = probabilities.shape[0]
    fig = figure(12, 3.8, (0.1, 0.1, 0.1, 0.35), wspace=0.05)
    axes = fig.subplots(1, 3)
    image = None
    for a in range(3):
        q = plane(probabilities, a, shape[a] // 2, step)
        image = axes[a].imshow(q.max(axis=0) / 255.0, cmap="magma", vmin=1.0 / k, vmax=1.0,
                               aspect=aspect(data["volume"]["voxel_size"], a), interpolation="nearest")
        axes[a].set_title(f"confidence, {AXES[a]} = {shape[a] // 2}")
        axes[a].set_xticks([])
        axes[a].set_yticks([])
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.8, label="max probability")
    return png_uri(fig)


def components(shown: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """Component-volume histograms (log2 bins), one panel per class in ``shown``."""
    fig = figure(min(12, 4 * len(shown)), 3.0, (0.8, 0.2, 0.7, 0.35))
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    for ax, (name, c) in zip(axes, shown, strict=True):
        counts = c["histogram"]["counts"]
        ax.bar(np.arange(len(counts)), counts, color="#57606a")
        ax.set_xticks(np.arange(len(counts)))
        ax.set_xticklabels([f"2^{i}" if i % 2 == 0 else "" for i in range(len(counts))], fontsize=7)
        ax.set_xlabel("component volume (voxels, log2 bins)")
        ax.set_ylabel("components")
        ax.set_title(name)
    return png_uri(fig)


def confusion(truth: Mapping[str, Any]) -> str:
    """The confusion matrix against ground truth, rows normalised (counts written when K <= 10)."""
    matrix = np.asarray(truth["confusion"]["matrix"], dtype=float)
    names = [c["name"] for c in truth["per_class"]]
    k = len(names)
    fig = figure(4.2 + 0.6 * k, 2.0 + 0.55 * k, (1.2, 0.9, 1.1, 0.2))
    ax = fig.subplots()
    norm = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k))
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_yticks(range(k))
    ax.set_yticklabels(names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("truth")
    if k <= 10:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{int(matrix[i, j]):,}", ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, label="fraction of the truth row")
    return png_uri(fig)
