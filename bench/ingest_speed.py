"""Ingest throughput of a TIFF stack vs plain ``tifffile`` reading of the same files.

    .venv/bin/python bench/ingest_speed.py [--slices 256] [--size 512] [--dtype uint16] [--reps 2]

A folder of SLICES 2D TIFF files (SIZE x SIZE, uncompressed, the bundled cement CT tiled and
scaled to the dtype) is written to a temporary folder. Then, alternating so that load drift and
the page cache treat both alike (the files are in the page cache after writing; this measures
CPU-side cost, not the disk):

- **plain**: ``tifffile.imread`` of every file in order into one preallocated (Z, Y, X) array:
  what a script that loads the stack into memory does;
- **ingest**: ``pipeline.ingest.run.ingest(folder, out.zarr)`` with its defaults (128^3 chunks,
  Blosc-zstd, global statistics in the same pass, 2 slabs in parallel, the OME-Zarr pyramid);
- **ingest, no pyramid**: the same without the pyramid levels.

The ratio is ingest MB/s over plain MB/s (best of REPS each). Last, one more ingest runs in a
fresh process to report its peak resident memory against the slab size (128 z-slices): ingest
holds about (workers + 1) slabs plus bounded temporaries, whatever the volume's depth.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import numpy as np  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=256)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--dtype", default="uint16", choices=("uint8", "uint16"))
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()

    import tifffile

    from pipeline.ingest.run import ingest

    dtype = np.dtype(args.dtype)
    print(_common.machine_facts())
    with tempfile.TemporaryDirectory(prefix="studios-bench-") as tmp:
        root = Path(tmp)
        folder = root / "slices"
        folder.mkdir()
        base = _common.cement_volume((min(args.slices, 128), args.size, args.size))
        scale = 257 if dtype == np.uint16 else 1
        files = []
        for z in range(args.slices):
            img = base[z % base.shape[0]].astype(dtype) * dtype.type(scale)
            f = folder / f"slice_{z:05d}.tif"
            tifffile.imwrite(f, img)
            files.append(f)
        nbytes = args.slices * args.size * args.size * dtype.itemsize
        print(f"stack: {args.slices} slices of {args.size}x{args.size} {dtype.name}, {nbytes / 2**20:.0f} MiB "
              f"in {folder} (uncompressed TIFF, page cache warm)\n", flush=True)

        def plain() -> float:
            t = time.perf_counter()
            out = np.empty((len(files), args.size, args.size), dtype=dtype)
            for i, f in enumerate(files):
                out[i] = tifffile.imread(f)
            return time.perf_counter() - t

        def run_ingest(pyramid: bool) -> float:
            out = root / "scan.zarr"
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            ingest(folder, out, pyramid=pyramid)
            return time.perf_counter() - t

        times: dict[str, list[float]] = {"plain": [], "ingest": [], "ingest, no pyramid": []}
        plain()  # warm-up (imports, page cache)
        for _ in range(args.reps):
            times["plain"].append(plain())
            times["ingest"].append(run_ingest(True))
            times["ingest, no pyramid"].append(run_ingest(False))
        stored = _common.dir_bytes(root / "scan.zarr")
        shutil.rmtree(root / "scan.zarr")
        code = f"import sys; sys.path.insert(0, {str(_common.ROOT)!r}); from pipeline.ingest.run import ingest; " \
               f"ingest({str(folder)!r}, {str(root / 'scan.zarr')!r})"
        subprocess.run([sys.executable, "-c", code], check=True)  # the first child: ru_maxrss is its own
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024

    best = {k: min(v) for k, v in times.items()}
    rows = []
    for name, t in best.items():
        rows.append([name, f"{t:.2f}", " / ".join(f"{x:.2f}" for x in times[name]), f"{nbytes / t / 2**20:.0f}",
                     f"{best['plain'] / t:.2f}"])
    print(_common.table(["reader", "best s", "all runs s", "MiB/s", "ratio to plain"], rows))
    print(f"\nzarr level 0 (no pyramid) on disk: {stored / 2**20:.0f} MiB for {nbytes / 2**20:.0f} MiB raw "
          f"({nbytes / max(stored, 1):.1f}x)")
    slab = min(128, args.slices) * args.size * args.size * dtype.itemsize
    print(f"ingest peak resident memory (fresh process, interpreter and imports included): {peak / 2**20:.0f} MiB; "
          f"one slab (128 slices) = {slab / 2**20:.0f} MiB")
    print(f"ingest / plain tifffile = {best['plain'] / best['ingest']:.2f} (with pyramid), "
          f"{best['plain'] / best['ingest, no pyramid']:.2f} (without)")
    print(_common.load_line())


if __name__ == "__main__":
    main()
