"""Cost of 'studios analyse' relative to the segmentation of the same volume.

Segments a synthetic fibre/pore volume (bench/qc_overhead.synthetic_volume: cylinders along z
and x, spherical pores, noise) with the default model (seeded random weights: the cost per voxel
of a trained model), then replaces the labels by the volume's thresholded classes (matrix,
fibre, pore: realistic objects for the analysis; an untrained model's labels would not be) and
runs the analysis on them: objects (fibre and pore), orientation of the fibres, pores with
local thickness, meshes of both classes. Both in this process, serially, one after the other.

    .venv/bin/python bench/analyse_cost.py [--size 512] [--block 128] [--max-radius 8]

Prints wall and CPU seconds of each and their ratio, the analysis' own stage timings and the load
average (on a shared machine the CPU-seconds ratio is the steadier figure).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qc_overhead import synthetic_volume  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--max-radius", type=int, default=8)
    parser.add_argument("--keep", type=Path, help="keep the outputs in this folder")
    parser.add_argument("--reuse", type=Path,
                        help="a folder kept by an earlier run: analyse its seg.zarr again, skip the segmentation")
    args = parser.parse_args()


    from pipeline.analyse import analyse

    work = args.reuse or args.keep or Path(tempfile.mkdtemp(prefix="studios-analyse-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {os.getloadavg()}, cores: {os.cpu_count()}")
    seg = work / "seg.zarr"
    if args.reuse is None:
        seg_wall, seg_cpu = _segment(args, work, seg)
    t0, c0 = time.perf_counter(), time.process_time()
    res = analyse(seg, work / "analysis", block=args.block, max_radius=args.max_radius, overwrite=True)
    an_wall, an_cpu = time.perf_counter() - t0, time.process_time() - c0
    d = res.data
    print(f"analyse {args.size}^3: {an_wall:.1f} s wall, {an_cpu:.1f} s CPU")
    if args.reuse is None:
        print(f"ratio analyse/segment: {an_wall / seg_wall:.2f} wall, {an_cpu / seg_cpu:.2f} CPU")
    print(f"analysis stages (s): {json.dumps(d['seconds'])}")
    print(f"objects {d['objects']['count']}, fibre fraction {d['phases']['classes']['fibre']['fraction']:.4f}, "
          f"porosity {d['phases']['classes']['pore']['fraction']:.4f}, "
          f"mesh faces {[c['faces'] for c in d['surfaces']['classes'].values()]}, "
          f"thickness radius cap {d['pores']['local_thickness']['radius_cap']}")
    print(f"load average after: {os.getloadavg()}")
    if args.keep is None and args.reuse is None:
        shutil.rmtree(work, ignore_errors=True)


def _segment(args: argparse.Namespace, work: Path, seg: Path) -> tuple[float, float]:
    """Ingest and segment the synthetic volume, then put its thresholded classes into seg.zarr."""
    import zarr

    from pipeline.compute.executors import SerialExecutor
    from pipeline.ingest.run import ingest_array
    from pipeline.io.bundle import init_bundle
    from pipeline.segment.run import segment

    vol = synthetic_volume(args.size)
    truth = np.where(vol < 0.55, 3, np.where(vol > 1.3, 2, 1)).astype(np.uint8)
    scan = work / "scan.zarr"
    ingest_array(vol, scan, overwrite=True)
    del vol
    bundle = init_bundle(classes=("matrix", "fibre", "pore"), seed=0)
    t0, c0 = time.perf_counter(), time.process_time()
    segment(scan, bundle, seg, block=args.block, overwrite=True, qc=False, executor=SerialExecutor())
    seg_wall, seg_cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"segment {args.size}^3: {seg_wall:.1f} s wall, {seg_cpu:.1f} s CPU")
    zarr.open_group(str(seg), mode="r+")["0"][...] = truth
    return seg_wall, seg_cpu


if __name__ == "__main__":
    main()
