"""``report.html``: the QC report for people, one self-contained file.

Rendered with Jinja2 from ``pipeline/qc/templates/`` (``report.html`` the page, ``sections.html``
one macro per section, ``report.css`` inlined). Images are PNGs from :mod:`pipeline.qc.figures`
embedded as base64 ``data:`` URIs; the page has inline CSS, no scripts and no external
resources, so it opens offline and can be mailed or archived as is. Autoescaping is on: every
string that comes from data (paths, class names, warning texts, errors) is escaped.

Sections (``<section id=...>``), in the order of :data:`SECTIONS`: ``summary``, ``warnings``,
``slices`` (orthogonal views of the scan with the segmentation overlaid), ``fractions``,
``profiles``, ``intensity``, ``confidence`` (histogram, confidence maps, least confident slices
and blocks), ``suggestions`` ("Where to annotate next", only when qc.json has ``suggestions``),
``components``, ``analysis`` (what ``studios analyse`` found, only with an ``analysis.json``:
:mod:`pipeline.qc.analysis`), ``seam``, ``truth`` (a note when no ground truth was given), ``run``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import zarr

from pipeline.io.store import Image
from pipeline.qc import figures
from pipeline.qc.formats import num as _num
from pipeline.qc.formats import pct as _pct

TEMPLATES = Path(__file__).resolve().parent / "templates"
SECTIONS = ("summary", "warnings", "slices", "fractions", "profiles", "intensity", "confidence", "suggestions",
            "components", "analysis", "seam", "truth", "run")
#: Sections left out when their qc.json key is absent.
OPTIONAL = {"suggestions": "suggestions"}


def write_report(
    data: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    labels: zarr.Group,
    scan: Image | None = None,
    probabilities: zarr.Array | None = None,
    analysis: Mapping[str, Any] | None = None,
) -> Path:
    """Render ``data`` (the content of ``qc.json``) to ``path`` atomically; returns ``path``.

    Args:
        labels: the segmentation group (level ``0`` and any pyramid levels, (Z, Y, X) uint8).
        scan: the scan, for the slice views (optional).
        probabilities: ``probabilities/0`` (K, Z, Y, X) uint8, for confidence maps (optional).
        analysis: the content of the segmentation's ``analysis.json`` (optional; the section
            ``analysis`` is left out without it).
    """
    out = Path(path)
    text = render_report(data, labels=labels, scan=scan, probabilities=probabilities, analysis=analysis)
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
    analysis: Mapping[str, Any] | None = None,
) -> str:
    """The report as one HTML string (arguments as in :func:`write_report`)."""
    from pipeline.qc import analysis as analysis_section

    classes = [c["name"] for c in data["classes"]]
    builders: dict[str, Callable[[], dict[str, Any]]] = {
        "summary": lambda: _summary(data),
        "warnings": lambda: {"texts": [str(w) for w in data["warnings"]]},
        "slices": lambda: _slices(data, labels, scan, classes),
        "fractions": lambda: _fractions(data),
        "profiles": lambda: _profiles(data, classes),
        "intensity": lambda: _intensity(data, classes),
        "confidence": lambda: _confidence(data, probabilities),
        "suggestions": lambda: _suggestions(data),
        "components": lambda: _components(data),
        "analysis": lambda: analysis_section.section(analysis or {}),
        "seam": lambda: _seam(data),
        "truth": lambda: _truth(data),
        "run": lambda: _run(data),
    }
    present = {*data, *(("analysis",) if analysis is not None else ())}
    sections = [(sid, builders[sid]()) for sid in SECTIONS
                if (sid not in OPTIONAL or OPTIONAL[sid] in present) and (sid != "analysis" or analysis is not None)]
    name = Path(str(data["inputs"]["segmentation"])).name
    return _environment().get_template("report.html").render(
        title=f"studios QC: {name}", heading=f"studios QC report: {name}", sections=sections)


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True)


# ----------------------------------------------------------------------------- formatting


def _dims(values: Sequence[Any], sep: str = " x ") -> str:
    return sep.join(map(str, values))


# ----------------------------------------------------------------------------- sections


def _summary(data: Mapping[str, Any]) -> dict[str, Any]:
    vol, inputs, seam = data["volume"], data["inputs"], data["seam_check"]
    rows = [
        ("segmentation", inputs["segmentation"]),
        ("scan", inputs["scan"] or "not available"),
        ("ground truth", inputs["truth"] or "not given"),
        ("shape (z, y, x)", _dims(vol["shape"])),
        ("voxel size", ", ".join(_num(v) for v in vol["voxel_size"])),
        ("blocks", f"{data['blocks']['done']} of {data['blocks']['total']} done"),
        ("warnings", str(len(data["warnings"]))),
        ("QC created", f"{data['created']} (studios {data['studios_version']}, schema {data['schema']})"),
    ]
    return {"complete": data["status"] == "complete", "seam": seam["status"],
            "seam_badge": {"ok": "ok", "failed": "bad"}.get(seam["status"], "warn"), "rows": rows}


def _slices(data: Mapping[str, Any], labels: zarr.Group, scan: Image | None, classes: Sequence[str]) -> dict[str, Any]:
    fig = figures.slices(data, labels, scan, classes)
    detail = f"pyramid level {fig.level}, every {fig.step}th voxel" if fig.level or fig.step > 1 else "full resolution"
    return {"image": fig.uri, "detail": detail, "with_scan": fig.with_scan}


def _fractions(data: Mapping[str, Any]) -> dict[str, Any]:
    classes = data["classes"]
    rows = [(f"{c['label']} {c['name']}", _num(c["voxels"]), _pct(c["fraction"]), _num(c["intensity_mean"]),
             _num(c["intensity_std"])) for c in classes]
    names = {c["label"]: c["name"] for c in classes}
    contrast = [(f"{names[p['a']]} / {names[p['b']]}", _num(p["difference"]), _num(p["cnr"], 3))
                for p in data["contrast"]]
    return {"rows": rows, "contrast": contrast, "image": figures.fractions(classes)}


def _profiles(data: Mapping[str, Any], classes: Sequence[str]) -> dict[str, Any]:
    source = data["profiles"]["z"]["confidence_source"]
    note = ("per-slice confidence from the stored probabilities" if source == "probabilities"
            else "confidence per block layer from the ledger (no stored probabilities)")
    return {"note": note, "image": figures.profiles(data, classes)}


def _intensity(data: Mapping[str, Any], classes: Sequence[str]) -> dict[str, Any]:
    hist = data["intensity_histograms"]
    return {"image": figures.intensity(hist, classes) if hist else None}


def _confidence(data: Mapping[str, Any], probabilities: zarr.Array | None) -> dict[str, Any]:
    conf = data["confidence"]
    rows = [
        ("source", conf["source"]),
        ("mean max probability", _num(conf["mean_max_probability"], 3)),
        (f"voxels below {conf['threshold']:g}", _pct(conf["low_fraction"])),
        ("mean entropy (nats)", _num(conf["mean_entropy"], 3)),
        ("mean entropy / ln K", _num(conf["mean_normalized_entropy"], 3)),
    ]
    slices = [(s["axis"], s["index"], _num(s["mean_confidence"], 3), _pct(s["low_fraction"]))
              for s in conf["lowest_slices"]]
    blocks = [(b["id"], ", ".join(map(str, b["offset"])), _dims(b["shape"]), _num(b["mean_confidence"], 3),
               _pct(b["low_fraction"])) for b in conf["lowest_blocks"]]
    return {"rows": rows, "histogram": figures.confidence_histogram(conf), "slices": slices, "blocks": blocks,
            "maps": figures.confidence_maps(data, probabilities) if probabilities is not None else None}


def _suggestions(data: Mapping[str, Any]) -> dict[str, Any]:
    """``suggestions``: ``[{"axis": "z", "index": 41, "score": 0.73, "reason": "..."}, ...]``, best first."""
    items = data.get("suggestions") or []
    rows = [(str(i), str(s.get("axis", "?")), _num(s.get("index")), _num(s.get("score"), 3), str(s.get("reason", "")))
            for i, s in enumerate(items, start=1) if isinstance(s, Mapping)]
    return {"rows": rows}


def _components(data: Mapping[str, Any]) -> dict[str, Any]:
    comp = data["components"]
    rows = []
    for name, c in comp["classes"].items():
        q = c["quantiles"]
        rows.append((f"{c['label']} {name}", _num(c["count"]), _num(c["voxels"]), _num(c["largest"]),
                     _pct(c["largest_fraction"]), _num(c["mean"], 3), _num(q["p50"], 3), _num(q["p95"], 3),
                     _num(c["single_voxel"]), _num(c["touching_border"])))
    shown = [(n, c) for n, c in comp["classes"].items() if c["count"]]
    return {"connectivity": comp["connectivity"], "block": _dims(comp["block"]), "rows": rows,
            "image": figures.components(shown) if shown else None}


def _seam(data: Mapping[str, Any]) -> dict[str, Any]:
    seam = data["seam_check"]
    rows = [
        ("status", seam["status"] + (f" ({seam['reason']})" if seam["reason"] else "")),
        ("exact numerics", "yes" if seam["exact"] else "no"),
        ("box", _dims(seam["box"]) if seam["box"] else "n/a"),
        ("compared voxels", _num(seam["compared_voxels"])),
        ("label differences", _num(seam["label_differences"])),
        ("unexplained label differences", _num(seam["unexplained_label_differences"])),
        ("max |probability difference|", _num(seam["max_abs_probability_difference"], 3)),
        ("probabilities compared with", seam["probability_reference"] or "n/a"),
    ]
    samples = [(", ".join(map(str, s["offset"])), _dims(s["shape"]), _num(s["compared_voxels"]),
                _num(s["label_differences"]), _num(s["max_abs_probability_difference"], 3)) for s in seam["samples"]]
    return {"rows": rows, "samples": samples}


def _truth(data: Mapping[str, Any]) -> dict[str, Any]:
    truth = data["truth"]
    if not truth:
        return {"given": False}
    rows = [(f"{c['label']} {c['name']}", _num(c["iou"], 4), _num(c["dice"], 4), _num(c["precision"], 4),
             _num(c["recall"], 4), _num(c["support"])) for c in truth["per_class"]]
    return {"given": True, "compared": _num(truth["compared_voxels"]), "ignored": _num(truth["ignored_voxels"]),
            "not_computed": _num(truth["not_computed_voxels"]), "mean_iou": _num(truth["mean_iou"], 4),
            "accuracy": _num(truth["accuracy"], 4), "kappa": _num(truth["kappa"], 4), "rows": rows,
            "image": figures.confusion(truth)}


def _run(data: Mapping[str, Any]) -> dict[str, Any]:
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
    return {"rows": rows}
