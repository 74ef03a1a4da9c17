"""Assembly of ``qc.json`` from the ledger facts, the streaming pass and the seam check.

The keys are documented in :mod:`pipeline.qc.run` and docs/qc.md.
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipeline import __version__
from pipeline.core.errors import InputError
from pipeline.core.geometry import Box
from pipeline.core.metrics import scores
from pipeline.io.store import AXES, Image
from pipeline.qc.components import component_stats
from pipeline.qc.facts import CENTRES, LedgerFacts, below
from pipeline.qc.stream import Accumulated
from pipeline.segment.ledger import CONF_BINS

SCHEMA = "studios-qc/1"
_TOP = 5


def _ratio(a: float, b: float) -> float | None:
    return float(a) / float(b) if b else None


def assemble(
    image: Image,
    attrs: Mapping[str, Any],
    manifest: Mapping[str, Any],
    facts: LedgerFacts,
    acc: Accumulated,
    seam: dict[str, Any],
    classes: Sequence[str],
    scan: Image | None,
    truth: Any,
    qc_block: Sequence[int],
    threshold: float,
) -> dict[str, Any]:
    k = len(classes)
    shape = image.shape
    done = facts.done
    run = dict(attrs.get("run") or {})
    failed = dict(run.get("failed") or {})
    missing_idx = [tuple(int(i) for i in ix) for ix in zip(*np.nonzero(done == 0), strict=True)]
    n_blocks = int(done.size)
    status = "complete" if attrs.get("complete") and not missing_idx and not failed else "incomplete"
    counts = facts.counts
    computed = float(counts.sum())
    per_class = []
    moments: list[tuple[float, float] | None] = []
    for c in range(k):
        n = float(counts[c])
        if n:
            mean = float(facts.totals.isum[c]) / n
            moments.append((mean, math.sqrt(max(float(facts.totals.isum2[c]) / n - mean * mean, 0.0))))
        else:
            moments.append(None)
        ms = moments[c]
        per_class.append({"label": c + 1, "name": classes[c], "voxels": int(n), "fraction": _ratio(n, computed),
                          "intensity_mean": ms[0] if ms else None, "intensity_std": ms[1] if ms else None})
    contrast = []
    for a, b in itertools.combinations(range(k), 2):
        first, second = moments[a], moments[b]
        if first is None or second is None:
            continue
        (ma, sa), (mb, sb) = first, second
        pooled = math.sqrt((sa * sa + sb * sb) / 2)
        contrast.append({"a": a + 1, "b": b + 1, "difference": mb - ma, "cnr": _ratio(abs(mb - ma), pooled)})

    profiles: dict[str, Any] = {}
    conf_layers = _layer_confidence(facts, shape, manifest)
    for a, axis in enumerate(AXES):
        prof = acc.profiles[a]
        comp_n = prof[:, 1:].sum(axis=1)
        fr = {classes[c]: [_ratio(prof[i, c + 1], comp_n[i]) for i in range(len(prof))] for c in range(k)}
        if acc.conf_sum is not None and acc.conf_low is not None:
            conf = [_ratio(acc.conf_sum[a][i] / 255.0, comp_n[i]) for i in range(len(prof))]
            source = "probabilities"
        else:
            conf, source = conf_layers[a], "ledger"
        profiles[axis] = {"fractions": fr, "computed": comp_n.tolist(), "confidence": conf, "confidence_source": source}

    hist = facts.totals.confidence
    n_conf = float(hist.sum())
    csum, clow, cvox = acc.conf_total
    confidence = {
        "source": "probabilities" if acc.conf_sum is not None else "ledger",
        "threshold": threshold,
        "histogram": {"edges": np.linspace(0, 1, CONF_BINS + 1).tolist(), "counts": hist.astype(np.int64).tolist()},
        "mean_max_probability": _ratio(csum / 255.0, cvox) if acc.conf_sum is not None
        else _ratio(float((hist * CENTRES).sum()), n_conf),
        "low_fraction": _ratio(clow, cvox) if acc.conf_sum is not None
        else _ratio(float(below(hist, threshold)), n_conf),
        "mean_entropy": _ratio(facts.totals.entropy_sum, computed),
        "mean_normalized_entropy": _ratio(facts.totals.entropy_sum, computed * math.log(k)) if k > 1 else None,
        "lowest_slices": _lowest_slices(profiles, acc, shape, manifest.get("block") or shape),
        "lowest_blocks": _lowest_blocks(facts, manifest, shape, threshold),
    }
    comp_classes = {classes[c - 1]: component_stats(c, volumes, touches, int(acc.profiles[0][:, c].sum()))
                    for c, (volumes, touches) in acc.components.items()}
    components = {"connectivity": 6, "block": list(qc_block), "classes": comp_classes}

    intensity = None
    if acc.intensity is not None and acc.edges is not None:
        intensity = {"edges": acc.edges.tolist(),
                     "counts": {classes[c]: acc.intensity[c].tolist() for c in range(k)}}
    block_seconds = facts.block_seconds
    n_done = int((done > 0).sum())
    return {
        "schema": SCHEMA,
        "status": status,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "studios_version": __version__,
        "inputs": {"segmentation": str(image.path), "scan": str(scan.path) if scan else None,
                   "truth": str(truth) if truth is not None else None, "model": str(image.path / "model")},
        "volume": {"shape": list(shape), "voxel_size": list(image.voxel_size), "voxels": math.prod(shape),
                   "computed_voxels": int(acc.profiles[0][:, 1:].sum()),
                   "not_computed_fraction": _ratio(acc.profiles[0][:, 0].sum(), math.prod(shape))},
        "classes": per_class,
        "contrast": contrast,
        "intensity_histograms": intensity,
        "profiles": profiles,
        "confidence": confidence,
        "components": components,
        "seam_check": seam,
        "truth": _truth_metrics(acc, classes, truth) if acc.confusion is not None else None,
        "blocks": {"total": n_blocks, "done": n_done, "computed": int((done == 1).sum()),
                   "skipped": int((done == 2).sum()), "missing": len(missing_idx),
                   "missing_ids": ["-".join(map(str, ix)) for ix in missing_idx[:20]], "failed": failed},
        "run": {
            "complete": bool(attrs.get("complete", False)), "finished": run.get("finished"), "host": run.get("host"),
            "studios_version": run.get("studios_version"), "seconds": run.get("seconds"),
            "voxels_per_second": run.get("voxels_per_second"), "stage_seconds": run.get("stage_seconds"),
            "block_seconds": block_seconds, "workers": run.get("workers"), "exact": manifest.get("exact"),
            "probabilities": manifest.get("probabilities"), "block": manifest.get("block"),
            "chunks": manifest.get("chunks"), "model_fingerprint": manifest.get("model_fingerprint"),
            "model": run.get("model"),
        },
    }


def _layer_confidence(facts: LedgerFacts, shape: Sequence[int], manifest: Mapping[str, Any]) -> list[list[Any]]:
    """Per-plane mean confidence from the ledger: each plane gets the value of its block layer."""
    conf = facts.block_conf  # (GZ, GY, GX, 10)
    block = manifest.get("block") or shape
    out = []
    for a in range(3):
        other = tuple(i for i in range(3) if i != a)
        layer = conf.sum(axis=other)  # (G_a, 10)
        n = layer.sum(axis=1)
        mean = [_ratio(float((layer[g] * CENTRES).sum()), float(n[g])) for g in range(len(layer))]
        out.append([mean[min(i // int(block[a]), len(mean) - 1)] for i in range(shape[a])])
    return out


def _lowest_slices(
    profiles: Mapping[str, Any], acc: Accumulated, shape: Sequence[int], block: Sequence[int]
) -> list[dict[str, Any]]:
    """Up to 3 planes per axis with the lowest mean confidence, at least 1/20 of the axis apart.

    From the ledger (no stored probabilities) only the centre plane of each block layer is a candidate.
    """
    out = []
    for a, axis in enumerate(AXES):
        conf = profiles[axis]["confidence"]
        computed = profiles[axis]["computed"]
        plane = math.prod(s for i, s in enumerate(shape) if i != a)
        if acc.conf_low is None:
            b = int(block[a])
            planes = [(g + min(g + b, shape[a])) // 2 for g in range(0, shape[a], b)]
        else:
            planes = list(range(shape[a]))
        cand = [i for i in planes if conf[i] is not None and computed[i] >= 0.01 * plane]
        cand.sort(key=lambda i: conf[i])
        gap = max(1, shape[a] // 20)
        picked: list[int] = []
        for i in cand:
            if all(abs(i - j) >= gap for j in picked):
                picked.append(i)
            if len(picked) == 3:
                break
        for i in picked:
            low = _ratio(acc.conf_low[a][i], computed[i]) if acc.conf_low is not None else None
            out.append({"axis": axis, "index": i, "mean_confidence": conf[i], "low_fraction": low})
    out.sort(key=lambda d: d["mean_confidence"])
    return out


def _lowest_blocks(facts: LedgerFacts, manifest: Mapping[str, Any], shape: Sequence[int],
                   threshold: float) -> list[dict[str, Any]]:
    conf = facts.block_conf
    n = conf.sum(axis=-1)
    low = below(conf, threshold)
    mean = (conf * CENTRES).sum(axis=-1)
    block = [int(b) for b in (manifest.get("block") or shape)]
    idx = [tuple(int(i) for i in ix) for ix in zip(*np.nonzero(n > 0), strict=True)]
    idx.sort(key=lambda ix: (-low[ix] / n[ix], mean[ix] / n[ix]))
    out = []
    for ix in idx[:_TOP]:
        box = Box(tuple(i * b for i, b in zip(ix, block, strict=True)), tuple(block)).intersect(Box.from_shape(shape))
        out.append({"id": "-".join(map(str, ix)), "offset": list(box.offset), "shape": list(box.shape),
                    "mean_confidence": float(mean[ix] / n[ix]), "low_fraction": float(low[ix] / n[ix])})
    return out


def _truth_metrics(acc: Accumulated, classes: Sequence[str], truth: Any) -> dict[str, Any]:
    conf = acc.confusion
    if conf is None:
        raise InputError("truth metrics were requested but no truth was accumulated; pass --truth")
    k = len(classes)
    summary = scores(conf[1:, 1:], classes)  # truth 1..K x prediction 1..K
    return {
        "path": str(truth), "compared_voxels": summary["voxels"], "ignored_voxels": int(acc.ignored),
        "not_computed_voxels": int(conf[1:, 0].sum()), "per_class": summary["per_class"],
        "mean_iou": summary["mean_iou"], "accuracy": summary["accuracy"], "kappa": summary["kappa"],
        "confusion": {"labels": list(range(1, k + 1)), "matrix": conf[1:, 1:].tolist()},
    }
