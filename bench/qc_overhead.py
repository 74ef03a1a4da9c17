"""QC overhead: segment a 256^3 synthetic volume without and with QC, print the ratio.

Same model (the default ``dilated_resnet`` with seeded random weights, 3 classes), same
settings (128^3 blocks, so the seam check has seams to check; no stored probabilities, the
default), one run each in this process, the run without QC first (after a small warm-up that
imports torch and zarr paths). The target is that QC adds at most 15 % to the segment run.

    .venv/bin/python bench/qc_overhead.py [--size 256] [--block 128] [--cluster serial|local]

Prints wall times, the ratio, QC's own time (from qc.json) relative to the run without QC and to
the segmentation part of the same run, and the load average. On a shared machine the two runs
can see different load; QC's own time over the segmentation of the same run is the robust
figure, the end-to-end ratio the headline one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def synthetic_volume(size: int, seed: int = 0) -> np.ndarray:
    """(size,)*3 float32: matrix 1.0, fibres 1.6 (cylinders along z and x), pores 0.1, noise 0.08."""
    rng = np.random.default_rng(seed)
    vol = np.ones((size,) * 3, dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(size // 6):
        cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(2.5, 5.0)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        if rng.random() < 0.5:
            vol[:, disk] = 1.6  # along z
        else:
            vol.transpose(2, 0, 1)[:, disk] = 1.6  # along x
    zz = np.arange(size)
    for _ in range(size):
        c = rng.uniform(0, size, 3)
        r = rng.uniform(1.5, 6.0)
        lo = np.maximum(np.floor(c - r), 0).astype(int)
        hi = np.minimum(np.ceil(c + r) + 1, size).astype(int)
        z, y, x = (zz[lo[i]:hi[i]] - c[i] for i in range(3))
        ball = z[:, None, None] ** 2 + y[None, :, None] ** 2 + x[None, None, :] ** 2 <= r * r
        vol[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]][ball] = 0.1
    vol += rng.normal(0.0, 0.08, vol.shape).astype(np.float32)
    return vol


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--cluster", choices=("serial", "local"), default="serial")
    parser.add_argument("--keep", type=Path, help="keep the outputs in this folder")
    args = parser.parse_args()

    from pipeline.compute.cluster import ClusterSpec
    from pipeline.compute.executors import SerialExecutor
    from pipeline.ingest.run import ingest_array
    from pipeline.io.bundle import init_bundle
    from pipeline.segment.run import segment

    work = args.keep or Path(tempfile.mkdtemp(prefix="studios-qc-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {os.getloadavg()}, cores: {os.cpu_count()}")
    t = time.perf_counter()
    scan = work / "scan.zarr"
    ingest_array(synthetic_volume(args.size), scan, overwrite=True)
    print(f"ingested {args.size}^3 synthetic volume in {time.perf_counter() - t:.1f}s")
    bundle = init_bundle(classes=("matrix", "fibre", "pore"), seed=0)

    def run(name: str, qc: bool, size_scan: Path = scan) -> tuple[float, float, float]:
        """(wall seconds, seconds of the segmentation itself without QC, CPU seconds of this process)."""
        kwargs = ({"executor": SerialExecutor()} if args.cluster == "serial"
                  else {"cluster": ClusterSpec(kind="local", workers=1)})
        t0, c0 = time.perf_counter(), time.process_time()
        result = segment(size_scan, bundle, work / name, block=args.block, overwrite=True, qc=qc, **kwargs)
        return time.perf_counter() - t0, result.seconds, time.process_time() - c0

    small = work / "warm.zarr"
    ingest_array(synthetic_volume(32, seed=1), small, overwrite=True)
    run("warm-seg.zarr", False, small)

    without, _, cpu_without = run("seg-noqc.zarr", qc=False)
    with_qc, segment_part, cpu_with = run("seg-qc.zarr", qc=True)
    qc = json.loads((work / "seg-qc.zarr" / "qc" / "qc.json").read_text())
    qc_seconds = qc["timings"]["total"]
    print(f"segment without QC: {without:.1f}s")
    print(f"segment with QC:    {with_qc:.1f}s")
    print(f"ratio with/without: {with_qc / without:.3f}  (QC adds {100 * (with_qc / without - 1):+.1f} %)")
    print(f"QC's own time:      {qc_seconds:.1f}s = {100 * qc_seconds / without:.1f} % of the run without QC, "
          f"{100 * qc_seconds / segment_part:.1f} % of the segmentation part of the same run ({segment_part:.1f}s)")
    print(f"QC breakdown (s):   {qc['timings']}")
    if args.cluster == "serial":
        print(f"CPU seconds:        {cpu_without:.1f} without, {cpu_with:.1f} with QC: "
              f"ratio {cpu_with / cpu_without:.3f} (less sensitive to other users than wall time)")
    comps = {k: v["count"] for k, v in qc["components"]["classes"].items()}
    print(f"QC found: status {qc['status']}, seam check {qc['seam_check']['status']} "
          f"({qc['seam_check']['label_differences']} label differences), components {comps}")
    print(f"load average after: {os.getloadavg()}")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
