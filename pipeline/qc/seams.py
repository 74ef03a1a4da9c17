"""Seam check: recompute sampled boxes that straddle block corners and compare with the output.

A box centred on a corner of the run's block grid is predicted in one piece and compared with
the stored labels (and stored probabilities, or the same box recomputed piece by piece on the
run's grid). For an exact run every voxel must agree; otherwise a label may differ only where
the top-two margin is below :data:`MARGIN` (float rounding), and probabilities within a tolerance.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zarr

from pipeline.core.errors import ModelError
from pipeline.core.geometry import Box
from pipeline.core.tiling import Block, grid_shape
from pipeline.io.store import Image

MARGIN = 1e-5  # top-two margin under which a label flip is explained by float rounding
LOW_PRECISION_TOLERANCE = 2e-2  # the same margin, and the probability tolerance, for bf16/fp16 runs


def seam_check(
    image: Image,
    probs: zarr.Array | None,
    scan: Image | None,
    manifest: Mapping[str, Any],
    *,
    samples: int,
    edge: int,
    device: str,
) -> dict[str, Any]:
    exact = bool(manifest.get("exact", False))
    precision = str(manifest.get("precision", "fp32"))
    out: dict[str, Any] = {
        "status": "skipped", "reason": "", "exact": exact, "precision": precision, "device": device, "box": None,
        "probability_reference": None,
        "samples": [], "compared_voxels": 0, "label_differences": None, "unexplained_label_differences": None,
        "max_abs_probability_difference": None,
    }
    shape = image.shape
    run_block = manifest.get("block")
    if samples <= 0:
        out["reason"] = "disabled (seam_samples=0)"
        return out
    if not run_block:
        out["reason"] = "the output records no block shape"
        return out
    bshape = tuple(min(int(b), s) for b, s in zip(run_block, shape, strict=True))
    grid = grid_shape(shape, bshape)
    if all(g == 1 for g in grid):
        out["status"], out["reason"] = "not_applicable", "the output is a single block: it has no seams"
        return out
    if scan is None:
        out["reason"] = "the scan is not available"
        return out
    from pipeline.io.bundle import load_bundle
    from pipeline.io.store import read_padded
    from pipeline.segment.predict import (
        forward,
        numerics,
        quantize,
        resolve_device,
        to_labels,
        top2_margin,
    )

    try:
        bundle = load_bundle(image.path / "model")
    except ModelError as exc:
        out["reason"] = f"the model saved in the output cannot be loaded ({exc})"
        return out
    if manifest.get("model_fingerprint") not in (None, bundle.fingerprint):
        out["reason"] = "the model saved in the output differs from the one the run used"
        return out
    model = bundle.build().to(resolve_device(device))
    offset, scale = bundle.normalization.affine(scan.stats)
    box_shape = tuple(min(b, edge, s) for b, s in zip(bshape, shape, strict=True))
    centres = [[i * b for i in range(1, g)] if g > 1 else [s // 2] for g, b, s in zip(grid, bshape, shape, strict=True)]
    n_all = math.prod(len(c) for c in centres)
    rng = np.random.default_rng(0)
    picks = sorted(rng.choice(n_all, size=min(samples, n_all), replace=False).tolist())
    out["box"] = list(box_shape)
    out["probability_reference"] = "stored" if probs is not None else "recomputed_on_run_grid"
    volume = tuple(shape)

    extra = {"precision": precision} if precision != "fp32" else {}
    margin, tolerance = (MARGIN, 1e-4) if precision == "fp32" else (LOW_PRECISION_TOLERANCE,) * 2
    if exact:
        tolerance = 0.0
    elif probs is not None:
        tolerance = max(tolerance, 1.0 / 255.0)

    def predict(box: Box) -> np.ndarray:
        blk = Block(index=(0, 0, 0), write=box, read=box.grow(bundle.halo))
        with numerics(exact=exact):
            return forward(model, read_padded(scan.array, blk, volume), offset=offset, scale=scale,
                           device=resolve_device(device), **extra)

    def predict_batch(boxes: Sequence[Box]) -> list[np.ndarray]:
        """Same as ``predict`` per box; equal-shaped boxes go through the model as one batch.

        Small pieces one by one cost ~5x their voxels in per-call overhead; the batch axis does
        not change any voxel's arithmetic (each sample is convolved on its own).
        """
        import torch

        from pipeline.core.normalize import apply_affine
        from pipeline.segment.predict import softmax_channels

        out: dict[Box, np.ndarray] = {}
        dev = resolve_device(device)
        for shape_ in sorted({b.shape for b in boxes}):
            group = [b for b in boxes if b.shape == shape_]
            raw = [read_padded(scan.array, Block((0, 0, 0), b, b.grow(bundle.halo)), volume) for b in group]
            x = torch.from_numpy(np.stack([apply_affine(r, offset, scale) for r in raw]))[:, None].to(dev)
            with numerics(exact=exact):
                if extra:
                    from pipeline.segment.predict import autocast

                    with autocast(dev, precision):
                        logits = model(x).float()
                else:
                    logits = model(x)
                probs_ = softmax_channels(logits).float().cpu().numpy()
            out.update(zip(group, probs_, strict=True))
        return [out[b] for b in boxes]

    total_diff = unexplained = compared = 0
    worst = 0.0
    for flat in picks:
        centre = [centres[a][i] for a, i in enumerate(np.unravel_index(flat, [len(c) for c in centres]))]
        start = tuple(int(min(max(c - e // 2, 0), s - e)) for c, e, s in zip(centre, box_shape, shape, strict=True))
        box = Box(start, box_shape)
        p = predict(box)
        stored = np.asarray(image.array[box.to_slices()])
        valid = stored > 0
        differ = valid & (to_labels(p) != stored)
        n_diff = int(np.count_nonzero(differ))
        n_unexp = n_diff if exact else int(np.count_nonzero(differ & (top2_margin(p) > margin)))
        if probs is not None:
            q = np.asarray(probs[(slice(None), *box.to_slices())]).astype(np.int16)
            d = np.abs(quantize(p).astype(np.int16) - q).max(axis=0)
            diff = float(d[valid].max()) / 255.0 if valid.any() else 0.0
        else:
            ref = np.empty_like(p)
            first = [o // b for o, b in zip(box.offset, bshape, strict=True)]
            last = [(e - 1) // b for e, b in zip(box.end, bshape, strict=True)]
            pieces = [
                Box(tuple(i * b for i, b in zip(index, bshape, strict=True)), bshape).intersect(box)
                for index in itertools.product(*(range(f, l_ + 1) for f, l_ in zip(first, last, strict=True)))
            ]
            for piece, piece_probs in zip(pieces, predict_batch(pieces), strict=True):
                ref[(slice(None), *piece.relative_to(box).to_slices())] = piece_probs
            d = np.abs(p - ref).max(axis=0)
            diff = float(d[valid].max()) if valid.any() else 0.0
        n_valid = int(np.count_nonzero(valid))
        out["samples"].append({"offset": list(start), "shape": list(box_shape), "compared_voxels": n_valid,
                               "label_differences": n_diff, "max_abs_probability_difference": diff})
        total_diff += n_diff
        unexplained += n_unexp
        compared += n_valid
        worst = max(worst, diff)
    out.update(
        compared_voxels=compared, label_differences=total_diff, unexplained_label_differences=unexplained,
        max_abs_probability_difference=worst,
        status="ok" if unexplained == 0 and worst <= tolerance + 1e-12 else "failed",
        reason="" if compared else "no computed voxels in the sampled boxes",
    )
    return out


__all__ = ["LOW_PRECISION_TOLERANCE", "MARGIN", "seam_check"]
