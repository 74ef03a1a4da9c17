"""Pipeline throughput vs the same model run monolithically in memory, on the same cores.

Prints one table; every figure comes from this one run (ratios, not absolute speeds, are the
point: machines are noisy). Usage::

    python bench/throughput.py [--size 256] [--blocks 256 128 64] [--workers 1] [--threads 1]

The volume is the bundled real cement CT tiled to SIZE^3 (uint8). The model is the default
architecture with seeded random weights (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--blocks", type=int, nargs="+", default=[256, 128])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="Dask threads per worker")
    ap.add_argument("--arch", default=None)
    args = ap.parse_args()

    from pipeline.bundle import init_bundle, save_bundle
    from pipeline.cluster import ClusterSpec, cpu_count, open_client
    from pipeline.demo import bundled_scan
    from pipeline.inference import predict_volume
    from pipeline.ingest import ingest_array
    from pipeline.models import DEFAULT_ARCH
    from pipeline.segment import segment
    from pipeline.store import open_image

    cores = cpu_count()
    base = tifffile.imread(bundled_scan())
    reps = -(-args.size // base.shape[0])
    volume = np.tile(base, (reps, reps, reps))[: args.size, : args.size, : args.size].copy()
    n = volume.size
    bundle = init_bundle(classes=("void", "cement"), arch=args.arch or DEFAULT_ARCH, seed=0)
    model = bundle.build()
    print(f"volume {volume.shape} uint8 ({n / 1e6:.1f} Mvox), model {bundle.arch} {dict(bundle.params)}")
    print(f"halo {bundle.halo}, parameters {model.n_parameters()}, {model.flops_per_voxel() / 1e3:.1f} kFLOP/voxel, "
          f"{cores} cores, torch {torch.__version__}")

    with tempfile.TemporaryDirectory(prefix="studios-bench-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        ingest_array(volume, root / "scan.zarr")
        t_ingest = time.perf_counter() - t
        model_dir = save_bundle(bundle, root / "model")
        stats = open_image(root / "scan.zarr").stats
        offset, scale = bundle.normalization.affine(stats)

        torch.set_num_threads(cores)
        predict_volume(model, volume[:32, :32, :32], offset=offset, scale=scale)  # warm-up
        t = time.perf_counter()
        predict_volume(model, volume, offset=offset, scale=scale)
        t_mono = time.perf_counter() - t
        mono = n / t_mono

        rows = []
        spec = ClusterSpec(kind="local", workers=args.workers, threads_per_worker=args.threads)
        with open_client(spec) as client:
            address = client.scheduler.address
            warm_spec = ClusterSpec(kind="address", address=address)
            # warm the workers (imports, model load) with a tiny run
            segment(root / "scan.zarr", model_dir, root / "warm.zarr", block=args.blocks[-1], cluster=warm_spec)
            client.run(torch.set_num_threads, spec.torch_threads())
            for block in args.blocks:
                out = root / f"seg{block}.zarr"
                t = time.perf_counter()
                r = segment(root / "scan.zarr", model_dir, out, block=block, cluster=warm_spec)
                wall = time.perf_counter() - t
                rows.append((block, r.blocks_total, wall, n / wall, r.stage_seconds))
        t = time.perf_counter()
        segment(root / "scan.zarr", model_dir, root / "cold.zarr", block=args.blocks[0], cluster=spec)
        t_cold = time.perf_counter() - t

    print()
    print(f"{'run':34s} {'blocks':>6s} {'wall s':>8s} {'Mvox/s':>8s} {'ratio':>6s}   stage seconds (summed over blocks)")
    print(f"{'monolithic forward (in memory)':34s} {1:6d} {t_mono:8.2f} {mono / 1e6:8.3f} {1.0:6.2f}")
    for block, nb, wall, rate, st in rows:
        stages = "read {read_s:.2f} post {normalize_s:.2f} forward {forward_s:.2f} write {write_s:.2f}".format(**st)
        sched = wall - sum(st[k] for k in ("read_s", "normalize_s", "forward_s", "write_s")) / max(spec.workers * args.threads, 1)
        print(f"{'segment, warm cluster, block ' + str(block):34s} {nb:6d} {wall:8.2f} {rate / 1e6:8.3f} "
              f"{rate / mono:6.2f}   {stages}; other {sched:.2f}")
    print(f"{'segment, cold (starts cluster), ' + str(args.blocks[0]):34s} {'':6s} {t_cold:8.2f} {n / t_cold / 1e6:8.3f} "
          f"{n / t_cold / mono:6.2f}")
    print(f"{'ingest (in-memory array)':34s} {'':6s} {t_ingest:8.2f} {n / t_ingest / 1e6:8.3f}")
    best = max(r[3] for r in rows)
    print(f"\nbest pipeline / monolithic = {best / mono:.2f} (target >= 0.85)")


if __name__ == "__main__":
    main()
