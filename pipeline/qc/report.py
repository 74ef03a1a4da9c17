"""``report.html``: the QC report for people, one self-contained file.

Images are PNGs drawn with matplotlib (Agg, no pyplot state) and embedded as base64 ``data:``
URIs; the page has inline CSS, no scripts and no external resources, so it opens offline and
can be mailed or archived as is. Every string that comes from data (paths, class names, warning
texts, errors) is escaped with :func:`html.escape`.

Sections (``<section id=...>``), in order: ``summary``, ``warnings``, ``slices`` (orthogonal
views of the scan with the segmentation overlaid), ``fractions``, ``profiles``, ``intensity``,
``confidence`` (histogram, confidence maps, "annotate here next"), ``components``, ``seam``,
``truth`` (when ground truth was given), ``run``.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.core.geometry import AXES
from pipeline.io.store import Image

MAX_PX = 384
SECTIONS = ("summary", "warnings", "slices", "fractions", "profiles", "intensity", "confidence", "components",
            "seam", "truth", "run")

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1200px;
padding:16px 24px;color:#1d232a;background:#fff}
h1{font-size:1.6em;margin:.2em 0}h2{border-bottom:2px solid #d8dee4;padding-bottom:4px;margin-top:1.6em}
table{border-collapse:collapse;margin:8px 0;font-size:.92em}td,th{border:1px solid #d8dee4;padding:3px 8px;
text-align:right}th{background:#f3f5f7}td.l,th.l{text-align:left}img{max-width:100%;display:block;margin:8px 0}
.badge{display:inline-block;padding:3px 10px;border-radius:4px;color:#fff;font-weight:600}
.ok{background:#1a7f37}.bad{background:#cf222e}.warn{background:#9a6700}.muted{color:#59636e}
ul.w li{margin:4px 0}code{background:#f3f5f7;padding:1px 4px;border-radius:3px}
"""


def write_report(
    data: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    labels: zarr.Group,
    scan: Image | None = None,
    probabilities: zarr.Array | None = None,
) -> Path:
    """Render ``data`` (the content of ``qc.json``) to ``path``; returns ``path``.

    Args:
        labels: the segmentation group (level ``0`` and any pyramid levels, (Z, Y, X) uint8).
        scan: the scan, for the slice views (optional).
        probabilities: ``probabilities/0`` (K, Z, Y, X) uint8, for confidence maps (optional).
    """
    out = Path(path)
    text = render_report(data, labels=labels, scan=scan, probabilities=probabilities)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return out


def render_report(
    data: Mapping[str, Any],
    *,
    labels: zarr.Group,
    scan: Image | None = None,
    probabilities: zarr.Array | None = None,
) -> str:
    """The report as one HTML string."""
    classes = [c["name"] for c in data["classes"]]
    parts = [
        _summary(data),
        _warnings(data),
        _slices(data, labels, scan, classes),
        _fractions(data),
        _profiles(data, classes),
        _intensity(data, classes),
        _confidence(data, probabilities),
        _components(data),
        _seam(data),
        _truth(data),
        _run(data),
    ]
    title = f"studios QC: {Path(str(data['inputs']['segmentation'])).name}"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )


# ----------------------------------------------------------------------------- helpers


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * float(value):.3g} %"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, left: int = 1) -> str:
    head = "".join(f"<th class=\"l\">{_e(h)}</th>" if i < left else f"<th>{_e(h)}</th>" for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(f"<td class=\"l\">{_e(v)}</td>" if i < left else f"<td>{_e(v)}</td>" for i, v in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _section(sid: str, title: str, body: str) -> str:
    return f"<section id=\"{sid}\"><h2>{_e(title)}</h2>\n{body}\n</section>"


def _figure(
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


def _img(fig: Any, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f"<img alt=\"{_e(alt)}\" src=\"data:image/png;base64,{data}\">"


def _colors(k: int) -> np.ndarray:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return np.array([cmap(i % 10) for i in range(k)], dtype=np.float64)


def _levels(group: zarr.Group) -> list[zarr.Array]:
    out: list[zarr.Array] = []
    while True:
        try:
            arr = group[str(len(out))]
        except KeyError:
            return out
        if not isinstance(arr, zarr.Array):
            return out
        out.append(arr)


def _plane_reader(levels: Sequence[Sequence[zarr.Array]], shape: Sequence[int]) -> tuple[int, int]:
    """(level, step) so that a plane is at most about MAX_PX pixels on a side."""
    available = min(len(lv) for lv in levels)
    level = 0
    while level + 1 < available and max(-(-s // 2**level) for s in shape) > MAX_PX:
        level += 1
    size = max(-(-s // 2**level) for s in shape)
    return level, max(1, math.ceil(size / MAX_PX))


def _plane(arr: zarr.Array, axis: int, index: int, step: int) -> np.ndarray:
    sl: list[Any] = [slice(None, None, step)] * 3
    sl[axis] = min(index, arr.shape[-3 + axis] - 1)
    return np.asarray(arr[(..., *sl)])


def _aspect(voxel: Sequence[float], axis: int) -> float:
    rows, cols = [i for i in range(3) if i != axis]
    return float(voxel[rows]) / float(voxel[cols])


# ----------------------------------------------------------------------------- sections


def _summary(data: Mapping[str, Any]) -> str:
    complete = data["status"] == "complete"
    badge = "<span class=\"badge ok\">complete</span>" if complete else "<span class=\"badge bad\">INCOMPLETE</span>"
    vol = data["volume"]
    inputs = data["inputs"]
    seam = data["seam_check"]
    seam_badge = {"ok": "ok", "failed": "bad"}.get(seam["status"], "warn")
    rows = [
        ("segmentation", inputs["segmentation"]),
        ("scan", inputs["scan"] or "not available"),
        ("ground truth", inputs["truth"] or "not given"),
        ("shape (z, y, x)", " x ".join(str(s) for s in vol["shape"])),
        ("voxel size", ", ".join(_num(v) for v in vol["voxel_size"])),
        ("blocks", f"{data['blocks']['done']} of {data['blocks']['total']} done"),
        ("warnings", str(len(data["warnings"]))),
        ("QC created", f"{data['created']} (studios {data['studios_version']}, schema {data['schema']})"),
    ]
    body = (
        f"<p>Status: {badge} &nbsp; Seam check: <span class=\"badge {seam_badge}\">{_e(seam['status'])}</span></p>"
        + _table(("", "value"), rows, left=2)
    )
    title = f"studios QC report: {Path(str(inputs['segmentation'])).name}"
    return f"<h1>{_e(title)}</h1>\n" + _section("summary", "Summary", body)


def _warnings(data: Mapping[str, Any]) -> str:
    items = data["warnings"]
    if not items:
        return _section("warnings", "Warnings", "<p class=\"muted\">No warnings.</p>")
    body = "<ul class=\"w\">" + "".join(f"<li>{_e(w)}</li>" for w in items) + "</ul>"
    return _section("warnings", f"Warnings ({len(items)})", body)


def _slices(data: Mapping[str, Any], labels: zarr.Group, scan: Image | None, classes: Sequence[str]) -> str:
    shape = data["volume"]["shape"]
    voxel = data["volume"]["voxel_size"]
    label_levels = _levels(labels)
    scan_levels = _levels(zarr.open_group(str(scan.path), mode="r")) if scan is not None else []
    level, step = _plane_reader([label_levels] + ([scan_levels] if scan_levels else []), shape)
    colors = _colors(len(classes))
    rows = 2 if scan_levels else 1
    fig = _figure(12, 4.0 * rows + 0.5, (0.1, 0.1, 0.5, 0.3), wspace=0.05, hspace=0.15)
    axes = fig.subplots(rows, 3, squeeze=False)
    vmin = vmax = None
    if scan is not None:
        pct = scan.attrs.get("stats", {}).get("percentiles", {})
        vmin, vmax = pct.get("0.5"), pct.get("99.5")
    for a in range(3):
        index = shape[a] // 2
        lab = _plane(label_levels[level], a, index // 2**level, step)
        overlay = np.zeros((*lab.shape, 4))
        for c in range(len(classes)):
            overlay[lab == c + 1] = (*colors[c][:3], 0.45)
        top = axes[0][a]
        if scan_levels:
            raw = _plane(scan_levels[level], a, index // 2**level, step).astype(np.float32)
            for ax in (axes[0][a], axes[1][a]):
                ax.imshow(raw, cmap="gray", vmin=vmin, vmax=vmax, aspect=_aspect(voxel, a), interpolation="nearest")
            top.set_title(f"scan, {AXES[a]} = {index}")
            axes[1][a].imshow(overlay, aspect=_aspect(voxel, a), interpolation="nearest")
            axes[1][a].set_title(f"segmentation overlaid, {AXES[a]} = {index}")
        else:
            top.imshow(overlay, aspect=_aspect(voxel, a), interpolation="nearest")
            top.set_title(f"segmentation, {AXES[a]} = {index}")
        for r in range(rows):
            axes[r][a].set_xticks([])
            axes[r][a].set_yticks([])
    from matplotlib.patches import Patch

    handles = [Patch(color=colors[c], label=f"{c + 1} {name}") for c, name in enumerate(classes)]
    fig.legend(handles=handles, loc="lower center", ncols=min(len(classes), 8), frameon=False)
    note = "" if scan_levels else "<p class=\"muted\">The scan is not available: labels only.</p>"
    detail = f"pyramid level {level}, every {step}th voxel" if level or step > 1 else "full resolution"
    body = f"<p class=\"muted\">Middle slices along each axis ({_e(detail)}).</p>{note}" + _img(fig, "slices")
    return _section("slices", "Orthogonal slices", body)


def _fractions(data: Mapping[str, Any]) -> str:
    classes = data["classes"]
    rows = [(f"{c['label']} {c['name']}", _num(c["voxels"]), _pct(c["fraction"]), _num(c["intensity_mean"]),
             _num(c["intensity_std"])) for c in classes]
    body = "<p class=\"muted\">Fractions of the computed voxels; intensities in raw scan units (from the " \
           "per-block ledger).</p>" + _table(("class", "voxels", "fraction", "intensity mean", "intensity std"), rows)
    names = {c["label"]: c["name"] for c in classes}
    if data["contrast"]:
        crow = [(f"{names[p['a']]} / {names[p['b']]}", _num(p["difference"]), _num(p["cnr"], 3))
                for p in data["contrast"]]
        body += "<h3>Contrast between classes</h3>" + _table(("pair", "mean difference", "contrast (pooled std)"), crow)
    fig = _figure(7, 1.2 + 0.4 * len(classes), (1.6, 0.2, 0.6, 0.1))
    ax = fig.subplots()
    colors = _colors(len(classes))
    values = [100 * (c["fraction"] or 0.0) for c in classes]
    ax.barh([f"{c['label']} {c['name']}" for c in classes], values, color=colors)
    ax.invert_yaxis()
    ax.set_xlabel("% of computed voxels")
    body += _img(fig, "class fractions")
    return _section("fractions", "Class fractions", body)


def _profiles(data: Mapping[str, Any], classes: Sequence[str]) -> str:
    profiles = data["profiles"]
    has_conf = any(v is not None for a in AXES for v in profiles[a]["confidence"])
    rows = 2 if has_conf else 1
    fig = _figure(12, 3.2 * rows, (0.8, 0.2, 0.6, 0.2))
    axes = fig.subplots(rows, 3, squeeze=False)
    colors = _colors(len(classes))
    for a, axis in enumerate(AXES):
        ax = axes[0][a]
        for c, name in enumerate(classes):
            y = np.array([np.nan if v is None else v for v in profiles[axis]["fractions"][name]], dtype=float)
            ax.plot(np.arange(len(y)), y, color=colors[c], label=name, lw=1.2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(f"{axis} (slice)")
        ax.set_ylabel("class fraction")
        if a == 0 and classes:
            ax.legend(fontsize=8)
        if has_conf:
            cax = axes[1][a]
            conf = np.array([np.nan if v is None else v for v in profiles[axis]["confidence"]], dtype=float)
            cax.plot(np.arange(len(conf)), conf, color="#444", lw=1.2)
            cax.axhline(data["confidence"]["threshold"], color="#cf222e", lw=0.8, ls="--")
            cax.set_ylim(0, 1.02)
            cax.set_xlabel(f"{axis} (slice)")
            cax.set_ylabel("mean max probability")
    source = profiles["z"]["confidence_source"]
    note = ("per-slice confidence from the stored probabilities" if source == "probabilities"
            else "confidence per block layer from the ledger (no stored probabilities)")
    body = (f"<p class=\"muted\">Slice-by-slice class fractions: drift, rings, beam hardening and sample edges "
            f"show up here. Bottom row: {_e(note)}; dashed line: the confidence threshold.</p>" + _img(fig, "profiles"))
    return _section("profiles", "Profiles along each axis", body)


def _intensity(data: Mapping[str, Any], classes: Sequence[str]) -> str:
    hist = data["intensity_histograms"]
    if not hist:
        return _section("intensity", "Intensity per class",
                        "<p class=\"muted\">The scan is not available: no histograms (means and std above).</p>")
    edges = np.asarray(hist["edges"], dtype=float)
    centres = (edges[:-1] + edges[1:]) / 2
    fig = _figure(9, 3.4, (0.9, 0.2, 0.6, 0.2))
    ax = fig.subplots()
    colors = _colors(len(classes))
    drawn = 0
    for c, name in enumerate(classes):
        counts = np.asarray(hist["counts"][name], dtype=float)
        if counts.sum() > 0:
            ax.step(centres, counts / counts.sum(), where="mid", color=colors[c], label=name)
            drawn += 1
    ax.set_xlabel("scan intensity (0.1-99.9 percentile range; outliers in the end bins)")
    ax.set_ylabel("fraction of the class")
    if drawn:
        ax.legend(fontsize=8)
    return _section("intensity", "Intensity per class", _img(fig, "intensity histograms"))


def _confidence(data: Mapping[str, Any], probabilities: zarr.Array | None) -> str:
    conf = data["confidence"]
    rows = [
        ("source", conf["source"]),
        ("mean max probability", _num(conf["mean_max_probability"], 3)),
        (f"voxels below {conf['threshold']:g}", _pct(conf["low_fraction"])),
        ("mean entropy (nats)", _num(conf["mean_entropy"], 3)),
        ("mean entropy / ln K", _num(conf["mean_normalized_entropy"], 3)),
    ]
    body = _table(("", "value"), rows, left=2)
    fig = _figure(6, 2.8, (0.9, 0.2, 0.6, 0.2))
    ax = fig.subplots()
    edges = np.asarray(conf["histogram"]["edges"], dtype=float)
    counts = np.asarray(conf["histogram"]["counts"], dtype=float)
    total = counts.sum()
    ax.bar(edges[:-1], counts / total if total else counts, width=np.diff(edges), align="edge", color="#57606a",
           edgecolor="white")
    ax.axvline(conf["threshold"], color="#cf222e", ls="--", lw=1)
    ax.set_xlabel("max class probability")
    ax.set_ylabel("fraction of voxels")
    body += _img(fig, "confidence histogram")
    if probabilities is not None:
        shape = data["volume"]["shape"]
        _, step = _plane_reader([[probabilities]], shape)
        k = probabilities.shape[0]
        fig = _figure(12, 3.8, (0.1, 0.1, 0.1, 0.35), wspace=0.05)
        axes = fig.subplots(1, 3)
        image = None
        for a in range(3):
            q = _plane(probabilities, a, shape[a] // 2, step)
            image = axes[a].imshow(q.max(axis=0) / 255.0, cmap="magma", vmin=1.0 / k, vmax=1.0,
                                   aspect=_aspect(data["volume"]["voxel_size"], a), interpolation="nearest")
            axes[a].set_title(f"confidence, {AXES[a]} = {shape[a] // 2}")
            axes[a].set_xticks([])
            axes[a].set_yticks([])
        if image is not None:
            fig.colorbar(image, ax=list(axes), shrink=0.8, label="max probability")
        body += "<h3>Confidence maps</h3>" + _img(fig, "confidence maps")
    if conf["lowest_slices"]:
        srows = [(s["axis"], s["index"], _num(s["mean_confidence"], 3), _pct(s["low_fraction"]))
                 for s in conf["lowest_slices"]]
        body += "<h3>Annotate here next: least confident slices</h3>" + _table(
            ("axis", "slice", "mean max probability", "below threshold"), srows)
    if conf["lowest_blocks"]:
        brows = [(b["id"], ", ".join(map(str, b["offset"])), " x ".join(map(str, b["shape"])),
                  _num(b["mean_confidence"], 3), _pct(b["low_fraction"])) for b in conf["lowest_blocks"]]
        body += "<h3>Least confident blocks</h3>" + _table(
            ("block", "offset (z, y, x)", "shape", "mean max probability", "below threshold"), brows)
    return _section("confidence", "Prediction confidence", body)


def _components(data: Mapping[str, Any]) -> str:
    comp = data["components"]
    classes = comp["classes"]
    if not classes:
        return _section("components", "Connected components", "<p class=\"muted\">No class analysed.</p>")
    rows = []
    for name, c in classes.items():
        q = c["quantiles"]
        rows.append((f"{c['label']} {name}", _num(c["count"]), _num(c["voxels"]), _num(c["largest"]),
                     _pct(c["largest_fraction"]), _num(c["mean"], 3), _num(q["p50"], 3), _num(q["p95"], 3),
                     _num(c["single_voxel"]), _num(c["touching_border"])))
    body = (f"<p class=\"muted\">{_e(comp['connectivity'])}-connectivity, labelled in blocks of "
            f"{_e(' x '.join(map(str, comp['block'])))} and merged across block faces (a component that crosses "
            "blocks counts once). Volumes in voxels.</p>"
            + _table(("class", "components", "voxels", "largest", "largest / class", "mean", "median", "p95",
                      "single voxels", "touching border"), rows))
    shown = [(n, c) for n, c in classes.items() if c["count"]]
    if shown:
        fig = _figure(min(12, 4 * len(shown)), 3.0, (0.8, 0.2, 0.7, 0.35))
        axes = fig.subplots(1, len(shown), squeeze=False)[0]
        for ax, (name, c) in zip(axes, shown, strict=True):
            counts = c["histogram"]["counts"]
            ax.bar(np.arange(len(counts)), counts, color="#57606a")
            ax.set_xticks(np.arange(len(counts)))
            ax.set_xticklabels([f"2^{i}" if i % 2 == 0 else "" for i in range(len(counts))], fontsize=7)
            ax.set_xlabel("component volume (voxels, log2 bins)")
            ax.set_ylabel("components")
            ax.set_title(name)
        body += _img(fig, "component volume histograms")
    return _section("components", "Connected components", body)


def _seam(data: Mapping[str, Any]) -> str:
    seam = data["seam_check"]
    rows = [
        ("status", seam["status"] + (f" ({seam['reason']})" if seam["reason"] else "")),
        ("exact numerics", "yes" if seam["exact"] else "no"),
        ("box", " x ".join(map(str, seam["box"])) if seam["box"] else "n/a"),
        ("compared voxels", _num(seam["compared_voxels"])),
        ("label differences", _num(seam["label_differences"])),
        ("unexplained label differences", _num(seam["unexplained_label_differences"])),
        ("max |probability difference|", _num(seam["max_abs_probability_difference"], 3)),
        ("probabilities compared with", seam["probability_reference"] or "n/a"),
    ]
    body = ("<p class=\"muted\">Boxes centred on corners of the run's block grid (a grid shifted by half a block) "
            "are recomputed from the scan and compared with the written output: 0 differences prove the "
            "stitching is exact.</p>" + _table(("", "value"), rows, left=2))
    if seam["samples"]:
        srows = [(", ".join(map(str, s["offset"])), " x ".join(map(str, s["shape"])), _num(s["compared_voxels"]),
                  _num(s["label_differences"]), _num(s["max_abs_probability_difference"], 3)) for s in seam["samples"]]
        body += _table(("offset (z, y, x)", "shape", "compared", "label differences", "max |dp|"), srows)
    return _section("seam", "Seam check", body)


def _truth(data: Mapping[str, Any]) -> str:
    truth = data["truth"]
    if not truth:
        return _section("truth", "Against ground truth", "<p class=\"muted\">No ground truth given.</p>")
    rows = [(f"{c['label']} {c['name']}", _num(c["iou"], 4), _num(c["dice"], 4), _num(c["precision"], 4),
             _num(c["recall"], 4), _num(c["support"])) for c in truth["per_class"]]
    body = (f"<p>Compared {_e(_num(truth['compared_voxels']))} voxels (ignored: {_e(_num(truth['ignored_voxels']))} "
            f"unlabelled, {_e(_num(truth['not_computed_voxels']))} not computed). Mean IoU "
            f"<b>{_e(_num(truth['mean_iou'], 4))}</b>, accuracy <b>{_e(_num(truth['accuracy'], 4))}</b>, "
            f"Cohen's kappa <b>{_e(_num(truth['kappa'], 4))}</b>.</p>"
            + _table(("class", "IoU", "Dice / F1", "precision", "recall", "support"), rows))
    matrix = np.asarray(truth["confusion"]["matrix"], dtype=float)
    names = [c["name"] for c in truth["per_class"]]
    k = len(names)
    fig = _figure(4.2 + 0.6 * k, 2.0 + 0.55 * k, (1.2, 0.9, 1.1, 0.2))
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
    body += _img(fig, "confusion matrix")
    return _section("truth", "Against ground truth", body)


def _run(data: Mapping[str, Any]) -> str:
    run = data["run"]
    blocks = data["blocks"]
    stage = run.get("stage_seconds") or {}
    rows = [
        ("blocks total / done / computed / skipped / missing",
         f"{blocks['total']} / {blocks['done']} / {blocks['computed']} / {blocks['skipped']} / {blocks['missing']}"),
        ("failed blocks", ", ".join(f"{k}: {v}" for k, v in blocks["failed"].items()) or "none"),
        ("wall time (s)", _num(run["seconds"])),
        ("voxels / s", _num(run["voxels_per_second"])),
        ("workers", _num(run["workers"])),
        ("wall time per stage (s)", ", ".join(f"{k} {_num(v, 3)}" for k, v in stage.items()) or "n/a"),
        ("block time summed over blocks (s)", ", ".join(f"{k} {_num(v, 3)}" for k, v in run["block_seconds"].items())),
        ("exact numerics", _num(run["exact"])),
        ("block / chunks", f"{run['block']} / {run['chunks']}"),
        ("model fingerprint", run["model_fingerprint"] or "n/a"),
        ("finished", f"{run['finished'] or 'not finished'} on {run['host'] or '?'} (studios {run['studios_version']})"),
    ]
    if blocks["missing_ids"]:
        rows.insert(2, ("missing blocks (first 20)", ", ".join(blocks["missing_ids"])))
    timings = data.get("timings") or {}
    if timings:
        rows.append(("QC time (s)", ", ".join(f"{k} {_num(v, 3)}" for k, v in timings.items())))
    return _section("run", "Run facts", _table(("", "value"), rows, left=2))
