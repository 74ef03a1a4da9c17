"""bf16 against fp32 end to end on one scan and one trained model, with the CPU's matrix limits.

    PYTHONPATH=. python bench/precision_e2e.py --model DIR [--size 256] [--reps 2] [--threads N]

The scan: the bundled cement CT tiled to SIZE^3 (uint8), ingested once. ``DIR``: a trained
bundle (``bench/precision_models.py`` writes ``cement-dilated_resnet``, trained on that CT).
Each repetition runs ``segment()`` as ``studios segment`` does (default LocalCluster, default
block, QC and pyramid off) in fp32, then in bf16, so load drifts hit both alike. Printed in one
run:

- the matrix-product limits of this CPU (``torch.mm`` 4096^2 in fp32 and bf16, same threads);
- per run: wall seconds, Mvox/s, the worker's forward seconds (summed over blocks);
- speed bf16/fp32 (wall, best of each), label agreement with fp32, the largest class-fraction
  shift (percentage points);
- the bf16 forward's arithmetic rate (FLOP per output voxel x output voxels / forward seconds;
  and counting the halo the blocks recompute) as a share of the bf16 ``mm`` limit.
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
import numpy as np  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from pipeline.ingest.run import ingest_array
    from pipeline.io.bundle import load_bundle
    from pipeline.io.store import open_image
    from pipeline.segment.plan import DEFAULT_BLOCK
    from pipeline.segment.precision import cpu_facts
    from pipeline.segment.run import segment

    bundle = load_bundle(args.model)
    print(_common.machine_facts({"cpu numerics": cpu_facts(), "torch threads": args.threads}))
    limits = {"fp32": _common.matmul_gflops(), "bf16": _common.matmul_gflops(dtype=torch.bfloat16)}
    print(f"torch.mm 4096^2: fp32 {limits['fp32']:.0f} GFLOP/s, bf16 {limits['bf16']:.0f} GFLOP/s "
          f"({limits['bf16'] / limits['fp32']:.2f}x); {_common.load_line()}", flush=True)
    volume = _common.cement_volume((args.size,) * 3)
    n = volume.size
    runs: dict[str, list[dict[str, Any]]] = {"fp32": [], "bf16": []}
    labels: dict[str, np.ndarray[Any, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="studios-precision-e2e-") as tmp:
        root = Path(tmp)
        scan = root / "scan.zarr"
        ingest_array(volume, scan)
        for rep in range(args.reps):
            for prec in ("fp32", "bf16"):
                out = root / f"seg-{prec}-{rep}.zarr"
                t = time.perf_counter()
                r = segment(scan, bundle, out, precision=prec, qc=False, pyramid=False)
                wall = time.perf_counter() - t
                runs[prec].append({"wall": wall, "forward": r.stage_seconds["forward_s"], "blocks": r.blocks_total,
                                   "fractions": r.class_fractions})
                if prec not in labels:
                    labels[prec] = np.asarray(open_image(out, kind="segmentation").array[...])
                fwd = runs[prec][-1]["forward"]
                print(f"{prec} run {rep + 1}: {wall:.1f}s, {n / wall / 1e6:.3f} Mvox/s, forward {fwd:.1f}s "
                      f"over {r.blocks_total} blocks (stage seconds {r.stage_seconds}); {_common.load_line()}",
                      flush=True)
    best = {p: min(runs[p], key=lambda x: x["wall"]) for p in runs}
    agree = 100.0 * float((labels["fp32"] == labels["bf16"]).mean())
    f32, f16 = best["fp32"]["fractions"], best["bf16"]["fractions"]
    shift = max(abs(f16[c] - f32[c]) * 100.0 for c in f32)
    flops = bundle.build().flops_per_voxel()
    edge = min(DEFAULT_BLOCK, args.size)  # the default block edge; its halo is recomputed around each block
    halo_factor = ((edge + 2 * bundle.halo) / edge) ** 3
    rows = []
    for p in ("fp32", "bf16"):
        b = best[p]
        useful = flops * n / b["forward"] / 1e9
        rows.append([p, f"{b['wall']:.1f}", f"{n / b['wall'] / 1e6:.3f}", f"{b['forward']:.1f}",
                     f"{useful:.0f}", f"{useful * halo_factor:.0f}", f"{limits[p]:.0f}",
                     f"{100 * useful * halo_factor / limits[p]:.0f} %"])
    print()
    print(_common.table(["precision", "best wall s", "Mvox/s", "forward s (summed)", "forward GFLOP/s (output)",
                         "GFLOP/s with halo", "mm limit GFLOP/s", "share of limit"], rows))
    print(f"\n{args.size}^3, {bundle.arch} (halo {bundle.halo}, {flops / 1e3:.1f} kFLOP/voxel), "
          f"{args.reps} runs each: "
          f"speed bf16/fp32 {best['fp32']['wall'] / best['bf16']['wall']:.2f}x end to end, "
          f"{best['fp32']['forward'] / best['bf16']['forward']:.2f}x forward; labels agree {agree:.4f} %; "
          f"largest class-fraction shift {shift:.4f} pp")
    print(_common.load_line())


if __name__ == "__main__":
    main()
