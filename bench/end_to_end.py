"""One end-to-end run on a large volume: TIFF stack -> ingest -> segment -> QC.

    .venv/bin/python bench/end_to_end.py [--size 1024] [--params JSON] [--keep DIR] [--malloc retain|glibc]

A stack of SIZE TIFF slices (SIZE x SIZE uint8: the bundled cement CT tiled, written slice by
slice, never held whole in memory) is written to a work folder, then the three user-facing
stages run with their defaults, as ``studios ingest`` / ``studios segment`` / ``studios qc``
would run them:

1. ``ingest(stack, scan.zarr)``: 128^3 chunks, statistics, pyramid;
2. ``segment(scan.zarr, model, seg.zarr, qc=False)``: default block (128 on CPU) on a default
   LocalCluster (1 worker x 1 thread, torch threads = cores), started and stopped inside;
3. ``pipeline.qc.run.run_qc(seg.zarr, scan=scan.zarr)`` (skipped if ``pipeline.qc.run`` is absent).

Per stage: wall seconds, voxels/s, and peak resident memory (a thread polls every 100 ms) of
this process (the driver), of its largest child process (the Dask worker during segment), and
of the whole process tree. The model is the default architecture with seeded random weights
from the registry defaults, unless ``--params`` narrows it (say so when quoting figures).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def write_stack(folder: Path, size: int) -> int:
    """SIZE slices of SIZE x SIZE uint8 from the tiled cement CT; returns bytes written."""
    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    base = _common.cement_volume((128, size, size))
    for z in range(size):
        tifffile.imwrite(folder / f"slice_{z:05d}.tif", base[z % 128])
    return size**3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--arch", default=None)
    ap.add_argument("--params", default=None, help="JSON overriding the registry defaults of the model")
    ap.add_argument("--keep", type=Path, default=None, help="work folder (kept); default a temporary folder")
    ap.add_argument("--probabilities", action="store_true")
    ap.add_argument("--malloc", choices=("retain", "glibc"), default="retain",
                    help="retain (studios' default worker_heap): driver and workers keep freed memory; "
                         "glibc: its defaults")
    args = ap.parse_args()
    heap, malloc_note = _common.set_malloc(args.malloc)

    from pipeline.compute.cluster import ClusterSpec
    from pipeline.ingest.run import ingest
    from pipeline.io.bundle import save_bundle
    from pipeline.segment.run import segment

    try:
        from pipeline.qc.run import run_qc
    except ImportError:
        run_qc = None

    bundle = _common.bundle(args.arch, args.params)
    print(_common.machine_facts({"": malloc_note}))
    print(f"{_common.describe(bundle)}; volume {args.size}^3 uint8 ({args.size**3 / 2**30:.2f} GiB)")
    n = args.size**3
    rows: list[list[Any]] = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="studios-e2e-", dir=args.keep) as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        write_stack(root / "stack", args.size)
        print(f"stack written in {time.perf_counter() - t:.1f}s ({root / 'stack'}); {_common.load_line()}", flush=True)
        model_dir = save_bundle(bundle, root / "model")

        def stage(name: str, fn: Any) -> Any:
            poll = _common.TreePeak()
            t = time.perf_counter()
            with poll:
                result = fn()
            wall = time.perf_counter() - t
            rows.append([name, f"{wall:.1f}", f"{n / wall / 1e6:.2f}", _common.mib(poll.peak_self),
                         _common.mib(poll.peak_child) if poll.peak_child else "-", _common.mib(poll.peak)])
            print(f"{name}: {wall:.1f}s; {_common.load_line()}", flush=True)
            return result

        stage("ingest (TIFF stack -> OME-Zarr)", lambda: ingest(root / "stack", root / "scan.zarr"))
        seg = stage("segment (LocalCluster, default block)", lambda: segment(
            root / "scan.zarr", model_dir, root / "seg.zarr", qc=False, probabilities=args.probabilities,
            cluster=ClusterSpec(worker_heap=heap)))
        qc = None
        if run_qc is not None:
            seg_dir = root / "seg.zarr"
            qc = stage("qc", lambda: run_qc(seg_dir, scan=root / "scan.zarr", out_dir=seg_dir / "qc"))
        total = time.perf_counter() - t_all
        stored = {name: _common.dir_bytes(root / name)
                  for name in ("stack", "scan.zarr", "seg.zarr")}

    print()
    print(_common.table(["stage", "wall s", "Mvox/s", "peak driver", "peak largest child", "peak tree"], rows))
    st = seg.stage_seconds
    print(f"\nsegment: {seg.blocks_total} blocks, stage seconds summed over blocks: read {st['read_s']:.1f}, "
          f"post {st['normalize_s']:.1f}, forward {st['forward_s']:.1f}, write {st['write_s']:.1f}; "
          f"dispatch wall {st.get('dispatch', 0):.1f}")
    if run_qc is None:
        print("qc: pipeline.qc.run is not available in this checkout; not measured")
    elif qc is not None:
        print(f"qc: status {qc.status}, {len(qc.warnings)} warning(s)")
    print(f"on disk: stack {_common.mib(stored['stack'])}, scan.zarr {_common.mib(stored['scan.zarr'])}, "
          f"seg.zarr {_common.mib(stored['seg.zarr'])}")
    print(f"total (stack writing included) {total:.1f}s; ingest+segment+qc "
          f"{sum(float(r[1]) for r in rows):.1f}s = {n / sum(float(r[1]) for r in rows) / 1e6:.3f} Mvox/s end to end")
    print(_common.load_line())


if __name__ == "__main__":
    main()
