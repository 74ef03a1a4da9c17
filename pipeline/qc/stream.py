"""The streaming pass of QC: block by block over the labels (and probabilities, scan, truth).

Accumulates class-fraction profiles along z, y and x, connected components (see
:mod:`pipeline.qc.components`), per-plane confidence, per-class intensity histograms and the
confusion matrix against truth. Memory: one block, plus what the component tracker keeps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from pipeline.core.progress import Reporter
from pipeline.core.tiling import iter_blocks
from pipeline.io.store import Image
from pipeline.qc.components import BlockComponents
from pipeline.qc.inputs import TruthReader

HIST_BINS = 64


@dataclass
class Accumulated:
    profiles: list[np.ndarray]  # per axis (n, K + 1) voxel counts, column 0 = not computed
    components: dict[int, tuple[np.ndarray, np.ndarray]]
    conf_sum: list[np.ndarray] | None = None  # per axis (n,) sum of max probability (uint8 units)
    conf_low: list[np.ndarray] | None = None  # per axis (n,) voxels under the threshold
    conf_total: tuple[float, float, float] = (0.0, 0.0, 0.0)  # (sum q, low, voxels)
    intensity: np.ndarray | None = None  # (K, HIST_BINS)
    edges: np.ndarray | None = None
    confusion: np.ndarray | None = None  # (K + 1, K + 1), row truth, column prediction
    ignored: int = 0


def plane_sums(values: np.ndarray, dtype: Any = np.int64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    zy = values.sum(axis=2, dtype=dtype)
    return zy.sum(axis=1), zy.sum(axis=0), values.sum(axis=(0, 1), dtype=dtype)


def stream(
    labels: zarr.Array,
    block_shape: tuple[int, ...],
    k: int,
    chosen: Sequence[int],
    *,
    probs: zarr.Array | None,
    scan: Image | None,
    truth: TruthReader | None,
    threshold: float,
    reporter: Reporter,
) -> Accumulated:
    shape = tuple(labels.shape)
    acc = Accumulated(profiles=[np.zeros((n, k + 1), dtype=np.int64) for n in shape], components={})
    trackers = {c: BlockComponents(shape) for c in chosen}
    if probs is not None:
        acc.conf_sum = [np.zeros(n, dtype=np.float64) for n in shape]
        acc.conf_low = [np.zeros(n, dtype=np.float64) for n in shape]
    lo = hi = 0.0
    if scan is not None:
        st = scan.stats
        lo, hi = st.percentiles.get("0.1", st.min), st.percentiles.get("99.9", st.max)
        if not hi > lo:
            lo, hi = st.min, (st.max if st.max > st.min else st.min + 1.0)
        acc.edges = np.linspace(lo, hi, HIST_BINS + 1)
        acc.intensity = np.zeros((k, HIST_BINS), dtype=np.int64)
    if truth is not None:
        acc.confusion = np.zeros((k + 1, k + 1), dtype=np.int64)
    q_threshold = 255.0 * threshold
    blocks = list(iter_blocks(shape, block_shape, 0))
    reporter.start("qc", len(blocks))
    csum = clow = cvox = 0.0
    for block in blocks:
        sl = block.write.to_slices()
        z0, y0, x0 = block.write.offset
        z1, y1, x1 = block.write.end
        lab = np.asarray(labels[sl])
        for c in range(1, k + 1):
            mask = lab == c
            pz, py, px = plane_sums(mask)
            acc.profiles[0][z0:z1, c] += pz
            acc.profiles[1][y0:y1, c] += py
            acc.profiles[2][x0:x1, c] += px
            if c in trackers:
                trackers[c].add(block, mask)
        valid = lab > 0
        if probs is not None and acc.conf_sum is not None and acc.conf_low is not None:
            top = np.asarray(probs[(slice(None), *sl)]).max(axis=0)
            top = np.where(valid, top, 0)
            low = valid & (top < q_threshold)
            sums, lows = plane_sums(top), plane_sums(low)
            for a, (s, e) in enumerate(((z0, z1), (y0, y1), (x0, x1))):
                acc.conf_sum[a][s:e] += sums[a]
                acc.conf_low[a][s:e] += lows[a]
            csum += float(top.sum(dtype=np.int64))
            clow += float(np.count_nonzero(low))
            cvox += float(np.count_nonzero(valid))
        if scan is not None and acc.intensity is not None:
            raw = np.asarray(scan.array[sl]).astype(np.float32)
            bins = np.clip(((raw - lo) * (HIST_BINS / (hi - lo))).astype(np.int64), 0, HIST_BINS - 1)
            idx = lab.astype(np.int64) * HIST_BINS + bins
            acc.intensity += np.bincount(idx.reshape(-1), minlength=(k + 1) * HIST_BINS).reshape(k + 1, -1)[1:]
        if truth is not None and acc.confusion is not None:
            t = truth.read(block.write).astype(np.int64)
            acc.ignored += int(np.count_nonzero(t == 0))
            idx = t * (k + 1) + lab
            acc.confusion += np.bincount(idx.reshape(-1), minlength=(k + 1) ** 2).reshape(k + 1, k + 1)
        reporter.advance(1, voxels=block.write.size)
    reporter.finish()
    for a in range(3):
        plane = math.prod(s for i, s in enumerate(shape) if i != a)
        acc.profiles[a][:, 0] = plane - acc.profiles[a][:, 1:].sum(axis=1)
    acc.conf_total = (csum, clow, cvox)
    acc.components = {c: tr.finish() for c, tr in trackers.items()}
    return acc
