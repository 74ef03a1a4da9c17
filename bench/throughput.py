"""Pipeline throughput vs the same model run monolithically in memory, on the same cores.

Prints one table; every figure comes from this one run (ratios, not absolute speeds, are the
point: machines are noisy). Usage::

    python bench/throughput.py [--size 256] [--blocks 256 128] [--workers 1] [--threads 1]
                               [--torch-threads N] [--arch NAME] [--params JSON] [--no-cold]
                               [--malloc retain|glibc] [--exact] [--reps 2]

The volume is the bundled real cement CT tiled to SIZE^3 (uint8). The model is the default
architecture with seeded random weights from the registry defaults (speed does not depend on
the weights).

Rows:

- ``monolithic``: :func:`pipeline.segment.predict.predict_volume` on the whole in-memory volume (pad
  by the halo, normalise, one forward pass, softmax), torch threads = cores.
- ``warm``: ``segment()`` on a LocalCluster already started (and warmed with a tiny run), one
  row per block size: what a long job sees per block once the cluster is up.

Monolithic and warm runs alternate ``--reps`` times (default 2) and each row shows its best
(fastest) run: on a shared machine the minimum is the estimate least disturbed by other load.
- ``cold``: ``segment()`` with its default cluster (starts a LocalCluster, imports, loads the
  model): what ``studios segment`` costs end to end on a small volume.

Stage seconds are summed over blocks (from the ledger): read (zarr read + edge pad), post
(labels + the per-block statistics QC uses), forward (normalise + model + softmax), write
(labels to zarr). ``sched`` is the dispatch wall time not covered by the stages (divided by
the concurrent block slots): scheduling, task transfer, ledger writes. ``setup`` is the
segment wall time outside dispatch: opening the scan, creating the output, the label pyramid,
attributes (QC is off here; ``bench/qc_overhead.py`` measures it).
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
import torch  # noqa: E402

STAGES = ("read_s", "normalize_s", "forward_s", "write_s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--blocks", type=int, nargs="+", default=[256, 128])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="Dask threads per worker")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch threads per block (default: cores / (workers x threads), as segment does)")
    ap.add_argument("--arch", default=None)
    ap.add_argument("--params", default=None, help="JSON overriding the registry defaults of the model")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold-cluster run")
    ap.add_argument("--reps", type=int, default=2, help="interleaved repetitions of monolithic and warm runs")
    ap.add_argument("--exact", action="store_true", help="segment and reference in exact mode (oneDNN off)")
    ap.add_argument("--malloc", choices=("retain", "glibc"), default="retain",
                    help="retain (studios' default worker_heap): driver and workers keep freed memory; "
                         "glibc: its defaults")
    args = ap.parse_args()
    heap, malloc_note = _common.set_malloc(args.malloc)

    from pipeline.compute.cluster import ClusterSpec, open_client
    from pipeline.compute.hosts import cpu_count
    from pipeline.ingest.run import ingest_array
    from pipeline.io.bundle import save_bundle
    from pipeline.io.store import open_image
    from pipeline.segment.predict import predict_volume
    from pipeline.segment.run import segment

    cores = cpu_count()
    volume = _common.cement_volume(args.size)
    n = volume.size
    bundle = _common.bundle(args.arch, args.params)
    model = bundle.build()
    spec = ClusterSpec(kind="local", workers=args.workers, threads_per_worker=args.threads, worker_heap=heap)
    torch_threads = args.torch_threads or spec.torch_threads()
    slots = args.workers * args.threads
    print(_common.machine_facts({
        "cluster": f"LocalCluster {args.workers} worker(s) x {args.threads} thread(s), torch threads per block "
                   f"{torch_threads}; monolithic torch threads {cores}",
        "": malloc_note,
    }))
    print(f"volume {volume.shape} uint8 ({n / 1e6:.1f} Mvox), {_common.describe(bundle)}, exact={args.exact}")

    rows: list[list[Any]] = []
    with tempfile.TemporaryDirectory(prefix="studios-bench-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        ingest_array(volume, root / "scan.zarr")
        t_ingest = time.perf_counter() - t
        ingest_array(volume[:64, :64, :64].copy(), root / "small.zarr")
        model_dir = save_bundle(bundle, root / "model")
        offset, scale = bundle.normalization.affine(open_image(root / "scan.zarr").stats)

        def monolithic() -> float:
            torch.set_num_threads(cores)
            t = time.perf_counter()
            predict_volume(model, volume, offset=offset, scale=scale, exact=args.exact)
            return time.perf_counter() - t

        predict_volume(model, volume[:32, :32, :32], offset=offset, scale=scale)  # warm-up
        t_mono: list[float] = []

        def mono_run() -> None:
            t_mono.append(monolithic())
            print(f"monolithic #{len(t_mono)}: {t_mono[-1]:.2f}s; {_common.load_line()}", flush=True)

        def seg(out: Path, block: int, cluster: ClusterSpec, scan: str = "scan.zarr") -> tuple[float, Any]:
            t = time.perf_counter()
            r = segment(root / scan, model_dir, out, block=block, cluster=cluster, exact=args.exact, qc=False)
            return time.perf_counter() - t, r

        warm: dict[int, list[tuple[float, Any]]] = {b: [] for b in args.blocks}
        runs = []
        with open_client(spec) as client:
            warm_spec = ClusterSpec(kind="address", address=client.scheduler.address)
            # warm the workers (imports, model load) with a tiny run; set torch threads as segment would
            client.run(torch.set_num_threads, torch_threads)
            seg(root / "warm.zarr", 64, warm_spec, scan="small.zarr")
            for rep in range(args.reps):  # interleaved with the monolithic runs: load drift hits both
                mono_run()
                for block in args.blocks:
                    wall, r = seg(root / f"seg{block}-{rep}.zarr", block, warm_spec)
                    warm[block].append((wall, r))
                    print(f"warm block {block}: {wall:.2f}s; {_common.load_line()}", flush=True)
        for block in args.blocks:
            wall, r = min(warm[block], key=lambda x: x[0])
            runs.append((f"segment, warm cluster, block {block}", r.blocks_total, wall, r))
        if not args.no_cold:
            wall, r = seg(root / "cold.zarr", args.blocks[0], spec)
            runs.append((f"segment, cold cluster, block {args.blocks[0]}", r.blocks_total, wall, r))
            print(f"cold block {args.blocks[0]}: {wall:.2f}s; {_common.load_line()}", flush=True)
        mono_run()

    mono = min(t_mono)
    rows.append([f"monolithic forward (in memory), best of {len(t_mono)}", 1, f"{mono:.2f}", f"{n / mono / 1e6:.3f}",
                 "1.00", "", "", f"{mono:.2f}", "", "", ""])
    best = 0.0
    for name, nb, wall, r in runs:
        st = r.stage_seconds
        dispatch = st.get("dispatch", wall)
        sched = dispatch - sum(st[k] for k in STAGES) / slots
        ratio = mono / wall
        best = max(best, ratio)
        stages = [f"{st[k]:.2f}" for k in STAGES]
        rows.append([name, nb, f"{wall:.2f}", f"{n / wall / 1e6:.3f}", f"{ratio:.2f}", *stages,
                     f"{sched:.2f}", f"{wall - dispatch:.2f}"])
    rows.append(["ingest (in-memory array)", "", f"{t_ingest:.2f}", f"{n / t_ingest / 1e6:.3f}", *[""] * 7])
    print()
    print(_common.table(["run", "blocks", "wall s", "Mvox/s", "ratio", "read", "post", "forward", "write", "sched",
                         "setup"], rows))
    print(f"\nmonolithic runs: {', '.join(f'{t:.2f}s' for t in t_mono)}; warm runs: "
          + "; ".join(f"block {b}: " + ", ".join(f"{w:.2f}s" for w, _ in warm[b]) for b in args.blocks))
    print(f"ratio = best monolithic / best pipeline wall time ({args.reps} interleaved repetitions)")
    print(f"best pipeline / monolithic = {best:.2f} (target >= 0.85)")
    print(_common.load_line())


if __name__ == "__main__":
    main()
