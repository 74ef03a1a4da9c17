"""The report's Analysis section: what ``studios analyse`` found, read from its ``analysis.json``.

QC does not compute these figures; it shows them. :func:`find_analysis` gives the
``analysis.json`` that belongs to a segmentation (the one named, or ``SEG.analysis/`` beside
``SEG.zarr``, the default output of ``studios analyse``); an analysis of another segmentation,
or of an earlier output overwritten since, is refused (named) or, when only found by its
place, left out of the report with a log line. Keys of ``analysis.json``: ``docs/analysis.md``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import InputError
from pipeline.qc import figures
from pipeline.qc.formats import num as _num
from pipeline.qc.formats import pct as _pct

logger = logging.getLogger(__name__)

#: The place ``studios analyse`` writes to by default, relative to ``SEG.zarr``.
DEFAULT_SUFFIX = ".analysis"


def default_analysis(seg: str | os.PathLike[str]) -> Path:
    """``SEG.analysis/analysis.json`` beside ``SEG.zarr``."""
    p = Path(seg)
    return p.with_name(p.stem + DEFAULT_SUFFIX) / "analysis.json"


def read_analysis(path: str | os.PathLike[str], seg: str | os.PathLike[str]) -> dict[str, Any]:
    """The content of ``path`` (``analysis.json`` or the folder holding it), checked to belong to ``seg``.

    Raises:
        InputError: no ``analysis.json`` there, not readable, or the analysis of another
            segmentation (or of an earlier run of this one).
    """
    p = Path(path)
    p = p / "analysis.json" if p.is_dir() else p
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise InputError(f"{p}: no analysis.json; run 'studios analyse {seg}' first") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{p}: not a readable analysis.json ({exc}); rerun 'studios analyse'") from None
    if not isinstance(data, dict) or data.get("version") != 1 or "phases" not in data:
        raise InputError(f"{p}: is not an analysis.json of studios analyse (version 1); rerun 'studios analyse'")
    from pipeline.analyse.run import segmentation_identity

    mine = segmentation_identity(seg)
    theirs = data.get("source_run") or {"segmentation": data.get("segmentation")}
    if theirs != mine:
        raise InputError(f"{p}: analyses {theirs.get('segmentation')} (finished {theirs.get('finished')}), "
                         f"not {mine['segmentation']} as it is now; rerun 'studios analyse --overwrite'")
    return data


def find_analysis(seg: str | os.PathLike[str], given: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """The analysis to show for ``seg``: ``given`` (must match), else the default place if it matches."""
    if given is not None:
        return read_analysis(given, seg)
    place = default_analysis(seg)
    if not place.is_file():
        return None
    try:
        return read_analysis(place, seg)
    except InputError as exc:
        logger.warning("report without an Analysis section: %s", exc)
        return None


def summary(data: Mapping[str, Any], path: str) -> dict[str, Any]:
    """What ``qc.json`` records of the analysis it showed (``qc.json`` key ``analysis``)."""
    from pipeline.analyse.run import headline

    return {"json": path, **headline(dict(data))}


# ----------------------------------------------------------------------------- the section


def section(data: Mapping[str, Any]) -> dict[str, Any]:
    """The context of the ``analysis`` macro in ``templates/sections.html``."""
    phases = data["phases"]["classes"]
    rows = [(f"{c['label']} {name}", _num(c["voxels"]), _pct(c["fraction"]), _num(c["volume"]))
            for name, c in phases.items()]
    objects = data.get("objects") or {}
    obj_rows = [(f"{c['label']} {name}", _num(c["count"]), _num(c["touching_border"]),
                 _num(c["mean_equivalent_diameter"]), _num(c["max_voxels"]))
                for name, c in (objects.get("classes") or {}).items()]
    ori = data.get("orientation")
    ori_rows: list[tuple[str, str]] = []
    if ori and ori.get("voxels"):
        ori_rows = [("class", str(ori["class"])), ("fibre voxels", _num(ori["voxels"])),
                    ("main direction (z, y, x)", ", ".join(f"{v:.3f}" for v in ori["main_direction"])),
                    ("tensor eigenvalues", ", ".join(f"{v:.3f}" for v in ori["eigenvalues"])),
                    ("orientation tensor A (z, y, x)",
                     "; ".join(" ".join(f"{v:.3f}" for v in r) for r in ori["tensor"])),
                    ("scales sigma / rho (voxels)", f"{ori['sigma']:g} / {ori['rho']:g} (halo {ori['halo']})")]
    pores = data.get("pores")
    pore_rows: list[tuple[str, str]] = []
    if pores:
        sd, lt = pores.get("size_distribution") or {}, pores["local_thickness"]
        q = sd.get("quantiles") or {}
        pore_rows = [("class", str(pores["class"])), ("porosity", _pct(phases[pores["class"]]["fraction"])),
                     ("pore objects", _num(sd.get("count"))),
                     ("equivalent diameter d10 / d50 / d90",
                      " / ".join(_num(q.get(k), 3) for k in ("d10", "d50", "d90"))),
                     ("mean local thickness (voxels)", _num(lt["mean"], 3)
                      + (f" (capped at {2 * lt['radius_cap']})" if lt["capped"] else ""))]
    surf = data.get("surfaces") or {}
    mesh_rows = [(f"{c['label']} {name}", _num(c["faces"]), _num(c["area"]), "yes" if c.get("closed") else "no")
                 for name, c in (surf.get("classes") or {}).items()]
    return {
        "rows": rows, "objects": obj_rows, "object_count": _num(objects.get("count")),
        "orientation": ori_rows, "orientation_image": orientation_figure(ori) if ori and ori_rows else None,
        "pores": pore_rows, "pores_image": pores_figure(pores) if pores else None,
        "profiles_image": profiles_figure(phases, _shown(data)),
        "meshes": mesh_rows,
        "seconds": ", ".join(f"{k} {_num(v, 3)}" for k, v in (data.get("seconds") or {}).items()),
    }


def _shown(data: Mapping[str, Any]) -> list[str]:
    """Classes whose profiles the section plots: the fibre and pore classes, else all but the largest."""
    chosen = [s["class"] for s in (data.get("orientation"), data.get("pores")) if isinstance(s, Mapping)]
    if chosen:
        return list(dict.fromkeys(chosen))
    phases = data["phases"]["classes"]
    return sorted(phases, key=lambda n: -(phases[n]["voxels"]))[1:] or list(phases)


def orientation_figure(ori: Mapping[str, Any]) -> str:
    """Polar (from z) and azimuth (in the y-x plane) histograms of the fibre directions."""
    fig = figures.figure(10, 2.8, (0.8, 0.2, 0.6, 0.35), wspace=0.3)
    axes = fig.subplots(1, 2)
    for ax, key, label in ((axes[0], "polar", "polar angle from z (deg)"),
                           (axes[1], "azimuth", "azimuth in the y-x plane, from x (deg)")):
        edges = np.asarray(ori[key]["edges_deg"], dtype=float)
        counts = np.asarray(ori[key]["counts"], dtype=float)
        share = counts / max(counts.sum(), 1.0)
        ax.bar(edges[:-1], 100 * share, width=np.diff(edges), align="edge", color="#0072b2", edgecolor="white")
        ax.set_xlabel(label)
        ax.set_ylabel("% of fibre voxels")
        ax.set_xlim(edges[0], edges[-1])
    fig.suptitle(f"fibre orientation ({ori['class']})", fontsize=10)
    return figures.png_uri(fig)


def pores_figure(pores: Mapping[str, Any]) -> str:
    """Pore size distribution (number and volume weighted) and local thickness histogram."""
    fig = figures.figure(10, 2.8, (0.8, 0.2, 0.6, 0.35), wspace=0.3)
    axes = fig.subplots(1, 2)
    sd = pores.get("size_distribution") or {}
    ax = axes[0]
    if sd.get("count"):
        edges = np.asarray(sd["edges"], dtype=float)
        number = np.asarray(sd["number"], dtype=float)
        volume = np.asarray(sd["volume"], dtype=float)
        centres = np.sqrt(edges[:-1] * edges[1:])
        ax.bar(centres, 100 * number / max(number.sum(), 1.0), width=np.diff(edges) * 0.45, align="edge",
               color="#e69f00", label="by number")
        ax.bar(centres, 100 * volume / max(volume.sum(), 1e-300), width=-np.diff(edges) * 0.3, align="edge",
               color="#0072b2", label="by volume")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no pore objects", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("pore equivalent diameter (physical units)")
    ax.set_ylabel("% of pores (number / volume)")
    lt = pores["local_thickness"]
    ax = axes[1]
    values, voxels = np.asarray(lt["values"], dtype=float), np.asarray(lt["voxels"], dtype=float)
    if voxels.sum():
        ax.bar(values, 100 * voxels / voxels.sum(), width=1.6, color="#009e73")
    ax.set_xlabel("local thickness (voxels)")
    ax.set_ylabel("% of pore voxels")
    fig.suptitle(f"pores ({pores['class']})", fontsize=10)
    return figures.png_uri(fig)


def profiles_figure(phases: Mapping[str, Any], shown: Sequence[str]) -> str:
    """Volume fraction of the shown classes slice by slice along z, y and x."""
    fig = figures.figure(12, 2.8, (0.8, 0.2, 0.6, 0.2))
    axes = fig.subplots(1, 3)
    palette = [np.asarray(c) / 255.0 for c in _label_colours(phases, shown)]
    for ax, axis in zip(axes, "zyx", strict=True):
        for colour, name in zip(palette, shown, strict=True):
            y = np.asarray(phases[name]["profile"][axis], dtype=float)
            ax.plot(np.arange(len(y)), 100 * y, color=colour, lw=1.2, label=name)
        ax.set_xlabel(f"{axis} (slice)")
        ax.set_ylabel("% of computed voxels")
    if shown:
        axes[0].legend(fontsize=8)
    return figures.png_uri(fig)


def _label_colours(phases: Mapping[str, Any], names: Sequence[str]) -> list[tuple[int, ...]]:
    from pipeline.io.labels import class_color

    return [class_color(int(phases[n]["label"]))[:3] for n in names]


__all__ = ["default_analysis", "find_analysis", "read_analysis", "section", "summary"]
