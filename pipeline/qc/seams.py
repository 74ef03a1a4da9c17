"""Seam check: recompute sampled boxes that straddle block corners and compare with the output.

A box centred on a corner of the run's block grid is predicted in one piece and compared with
the stored labels (and stored probabilities, or the same box recomputed piece by piece on the
run's grid). For an exact run every voxel must agree; otherwise a label may differ only where
the top-two margin is below :data:`MARGIN` (float rounding), and probabilities within a tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zarr

from pipeline.core.errors import ModelError
from pipeline.core.geometry import Box
from pipeline.core.tiling import Block
from pipeline.io.store import Image, read_padded

MARGIN = 1e-5  # top-two margin under which a label flip is explained by float rounding
LOW_PRECISION_TOLERANCE = 2e-2  # the same margin, and the probability tolerance, for bf16/fp16 runs

F32 = np.ndarray[Any, np.dtype[np.float32]]


def _centres(blocks: Sequence[Block], shape: Sequence[int]) -> list[list[int]]:
    """Per axis: the block faces of the run's grid (starts of blocks after the first), or the
    middle of the axis where the grid has one block along it."""
    out = []
    for a, s in enumerate(shape):
        faces = sorted({b.write.offset[a] for b in blocks if b.index[a] > 0})
        out.append(faces or [int(s) // 2])
    return out


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
    """Recompute ``samples`` boxes of edge ``edge`` centred on block corners; see the module docstring.

    Returns:
        The ``seam_check`` section of qc.json.
    """
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
    from pipeline.segment.plan import seam_grid

    grid_blocks = seam_grid(shape, run_block, 0)
    if len(grid_blocks) == 1:
        out["status"], out["reason"] = "not_applicable", "the output is a single block: it has no seams"
        return out
    if scan is None:
        out["reason"] = "the scan is not available"
        return out
    from pipeline.io.bundle import load_bundle
    from pipeline.segment.predict import predict, quantize, resolve_device, to_labels, top2_margin

    try:
        bundle = load_bundle(image.path / "model")
    except ModelError as exc:
        out["reason"] = f"the model saved in the output cannot be loaded ({exc})"
        return out
    if manifest.get("model_fingerprint") not in (None, bundle.fingerprint):
        out["reason"] = "the model saved in the output differs from the one the run used"
        return out
    dev = resolve_device(device)
    model = bundle.build().to(dev)
    offset, scale = bundle.normalization.affine(scan.stats)
    halo = bundle.halo
    blocks = seam_grid(shape, run_block, halo)  # the run's blocks, with the model's halo
    bshape = blocks[0].write.shape
    box_shape = tuple(min(b, edge, s) for b, s in zip(bshape, shape, strict=True))
    centres = _centres(blocks, shape)
    n_all = math.prod(len(c) for c in centres)
    rng = np.random.default_rng(0)
    picks = sorted(rng.choice(n_all, size=min(samples, n_all), replace=False).tolist())
    out["box"] = list(box_shape)
    out["probability_reference"] = "stored" if probs is not None else "recomputed_on_run_grid"
    volume = tuple(shape)

    margin, tolerance = (MARGIN, 1e-4) if precision == "fp32" else (LOW_PRECISION_TOLERANCE,) * 2
    if exact:
        tolerance = 0.0
    elif probs is not None:
        tolerance = max(tolerance, 1.0 / 255.0)

    def run_predict(pieces: Sequence[Block]) -> list[F32]:
        """What the worker computes for each piece (its read box through :func:`predict`).

        Equal-shaped pieces go through the model as one batch: small pieces one by one cost
        ~5x their voxels in per-call overhead, and the batch axis changes no voxel's arithmetic.
        """
        found: dict[Box, F32] = {}
        for read_shape in sorted({p.read.shape for p in pieces}):
            group = [p for p in pieces if p.read.shape == read_shape]
            raw = np.stack([read_padded(scan.array, p, volume) for p in group])
            batch = predict(model, raw, offset=offset, scale=scale, device=dev, precision=precision, exact=exact)
            found.update(zip((p.write for p in group), batch, strict=True))
        return [found[p.write] for p in pieces]

    total_diff = unexplained = compared = 0
    worst = 0.0
    for flat in picks:
        centre = [centres[a][i] for a, i in enumerate(np.unravel_index(flat, [len(c) for c in centres]))]
        start = tuple(int(min(max(c - e // 2, 0), s - e)) for c, e, s in zip(centre, box_shape, shape, strict=True))
        box = Box(start, box_shape)
        (p,) = run_predict([Block(index=(0, 0, 0), write=box, read=box.grow(halo))])
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
            pieces = [Block(b.index, part, part.grow(halo)) for b in blocks
                      if not (part := b.write.intersect(box)).empty]
            for piece, piece_probs in zip(pieces, run_predict(pieces), strict=True):
                ref[(slice(None), *piece.write.relative_to(box).to_slices())] = piece_probs
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
