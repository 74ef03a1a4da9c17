"""``studios propose`` (no labels) against multi-Otsu thresholding on the fibre phantom.

Both give K = 3 phases without any annotation; each is matched to the truth classes by the
assignment of largest IoU (Hungarian), then scored by mean IoU over all voxels.

Usage::

    python bench/propose_vs_otsu.py                       # 64 x 96 x 96 phantom, seed 1
    python bench/propose_vs_otsu.py --shape 96 96 96 --seed 0
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_line, machine_facts  # noqa: E402

from pipeline.compute.executors import SerialExecutor  # noqa: E402
from pipeline.ingest.run import ingest_array  # noqa: E402
from pipeline.testing.phantom import make_phantom  # noqa: E402
from pipeline.train.propose import propose  # noqa: E402


def matched_miou(truth: np.ndarray, pred: np.ndarray, k: int) -> float:
    """Mean IoU after matching predicted to true classes (labels 1..k) by largest total IoU."""
    from scipy.optimize import linear_sum_assignment

    m = np.bincount((truth.ravel().astype(np.int64) - 1) * k + pred.ravel() - 1, minlength=k * k).reshape(k, k)
    iou = m / np.maximum(m.sum(1, keepdims=True) + m.sum(0, keepdims=True) - m, 1)
    rows, cols = linear_sum_assignment(-iou)
    return float(iou[rows, cols].mean())


def main(argv: list[str] | None = None) -> int:
    import zarr
    from skimage.filters import threshold_multiotsu

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=(64, 96, 96))
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    print(machine_facts({"phantom": "x".join(map(str, args.shape)) + f", seed {args.seed}"}))
    ph = make_phantom(tuple(args.shape), seed=args.seed)
    t = time.perf_counter()
    otsu = np.digitize(ph.volume, threshold_multiotsu(ph.volume, classes=3)).astype(np.int64) + 1
    rows = [("multi-Otsu", matched_miou(ph.labels, otsu, 3), time.perf_counter() - t)]
    with tempfile.TemporaryDirectory(prefix="studios-propose-") as tmp:
        scan = Path(tmp) / "scan.zarr"
        ingest_array(ph.volume, scan)
        for method, features in (("gmm", "intensity"), ("kmeans", "intensity"), ("gmm", "all"), ("kmeans", "all")):
            t = time.perf_counter()
            r = propose(scan, Path(tmp) / f"{method}-{features}", classes=3, method=method, features=features,
                        executor=SerialExecutor(), qc=False)
            seg = np.asarray(zarr.open_group(str(r.segmentation), mode="r")["0"]).astype(np.int64)
            rows.append((f"propose {method}/{features}", matched_miou(ph.labels, seg, 3), time.perf_counter() - t))
    print(f"\n{'method':28s}  {'mean IoU':>8}  {'seconds':>7}")
    for name, miou, seconds in rows:
        print(f"{name:28s}  {miou:8.4f}  {seconds:7.1f}")
    print(load_line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
