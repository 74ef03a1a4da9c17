"""QC warnings in plain words, from an assembled ``qc.json`` dictionary."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.core.geometry import AXES


def pct(x: float) -> str:
    return f"{100 * x:.2g} %" if x < 0.01 else f"{100 * x:.1f} %"


def qc_warnings(data: Mapping[str, Any], *, rare_fraction: float, drift_threshold: float) -> list[str]:
    out: list[str] = []
    blocks = data["blocks"]
    if data["status"] != "complete":
        if blocks["missing"]:
            ids = ", ".join(blocks["missing_ids"][:5]) + (", ..." if blocks["missing"] > 5 else "")
            out.append(f"output is incomplete: {blocks['missing']} of {blocks['total']} blocks missing ({ids}); "
                       "the numbers cover finished blocks only; rerun the same 'studios segment' command to finish")
        else:
            out.append("output is incomplete: the run did not finish (not marked complete); "
                       "rerun the same 'studios segment' command")
    if blocks["failed"]:
        out.append(f"{len(blocks['failed'])} blocks failed: " + ", ".join(sorted(blocks["failed"])[:5]))
    seam = data["seam_check"]
    if seam["status"] == "failed":
        out.append(f"seam check failed: {seam['unexplained_label_differences']} labels differ and probabilities differ "
                   f"by up to {seam['max_abs_probability_difference']:.3g} when blocks are shifted by half a block; "
                   "stitching is not exact (check the model's halo and normalisation)")
    for c in data["classes"]:
        f = c["fraction"]
        if f is None:
            continue
        if f == 0:
            out.append(f"class {c['label']} ({c['name']}) was never predicted")
        elif f < rare_fraction:
            out.append(f"class {c['label']} ({c['name']}) covers {pct(f)} of the volume")
    conf = data["confidence"]
    if conf["low_fraction"] is not None and conf["low_fraction"] > 0.2:
        out.append(f"{pct(conf['low_fraction'])} of voxels have confidence below {conf['threshold']:g}; "
                   "annotate the lowest-confidence slices listed below and retrain")
    for axis in AXES:
        drop = confidence_drop(data["profiles"][axis]["confidence"], axis)
        if drop:
            out.append(drop)
    for axis in AXES:
        for name, values in data["profiles"][axis]["fractions"].items():
            msg = drift(values, name, axis, drift_threshold)
            if msg:
                out.append(msg)
    for pair in data["contrast"]:
        if pair["cnr"] is not None and pair["cnr"] < 1.0:
            names = {c["label"]: c["name"] for c in data["classes"]}
            out.append(f"classes {names[pair['a']]} and {names[pair['b']]} have nearly the same intensity "
                       f"(contrast {pair['cnr']:.2f} std): they are told apart by context only")
    for name, comp in data["components"]["classes"].items():
        if comp["count"] >= 20 and comp["single_voxel"] > 0.5 * comp["count"]:
            out.append(f"{pct(comp['single_voxel'] / comp['count'])} of {name} components are single voxels "
                       "(speckle: noise or an under-trained model)")
    truth = data["truth"]
    if truth:
        for c in truth["per_class"]:
            if c["iou"] is not None and c["support"] and c["iou"] < 0.5:
                out.append(f"class {c['name']}: IoU against the truth is only {c['iou']:.2f}")
        if truth["not_computed_voxels"]:
            out.append(f"{truth['not_computed_voxels']} annotated voxels were not computed (skipped or missing blocks)")
    return out


def confidence_drop(values: Sequence[float | None], axis: str, drop: float = 0.1) -> str | None:
    arr = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    ok = np.isfinite(arr)
    if ok.sum() < 4:
        return None
    ref = float(np.median(arr[ok]))
    low = ok & (arr < ref - drop)
    if not low.any():
        return None
    best, start, run_start = (0, 0), None, 0
    for i, v in enumerate(np.append(low, False)):
        if v and start is None:
            start = i
        elif not v and start is not None:
            if i - start > best[1] - best[0]:
                best = (start, i)
            start = None
    run_start, run_end = best
    if run_end - run_start < max(2, int(0.02 * len(arr))):
        return None
    mean_low = float(np.nanmean(arr[run_start:run_end]))
    where = (f"{axis} >= {run_start}" if run_end == len(arr) else
             f"{axis} < {run_end}" if run_start == 0 else f"{axis} in {run_start}..{run_end - 1}")
    return (f"confidence drops at {where} (mean max probability {mean_low:.2f} vs {ref:.2f} elsewhere); "
            "annotate there next")


def drift(values: Sequence[float | None], name: str, axis: str, threshold: float) -> str | None:
    arr = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if len(arr) < 8:
        return None
    w = max(1, len(arr) // 20)
    smooth = np.convolve(arr, np.ones(w) / w, mode="valid")
    lo, hi = float(smooth.min()), float(smooth.max())
    if hi - lo <= threshold:
        return None
    return (f"fraction of {name} varies from {pct(lo)} to {pct(hi)} along {axis} "
            "(drift, beam hardening, rings or a sample edge?)")


__all__ = ["confidence_drop", "drift", "pct", "qc_warnings"]
