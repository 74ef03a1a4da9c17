"""Planning and dispatch of many blocks: seconds to plan, scheduler overhead per block.

    .venv/bin/python bench/dispatch.py [--plan-volume 4096 4096 4096] [--plan-block 64]
                                       [--tasks 20000] [--in-flight 0 64 512] [--workers 1] [--threads 1]

1. **Planning** (no data): :func:`pipeline.core.tiling.plan_blocks` (a list) and
   :func:`pipeline.core.tiling.iter_blocks` (lazy) over a virtual volume, by default 4096^3 in
   blocks of 64 (262,144 blocks), with the default model's halo and 64^3 chunks; also the
   memory the list of blocks takes (growth of this process's RSS while planning).
2. **Dispatch**: :class:`pipeline.compute.executors.DaskExecutor` (what ``segment()`` uses) over a
   LocalCluster (default 1 worker x 1 thread) runs a no-op block function on TASKS blocks of
   that plan: the wall time per block is the scheduler's overhead per block (submit, schedule,
   run an empty task, report, release), since the block itself does nothing. One row per
   ``max_in_flight`` (0 = the executor's default, 4 x worker threads, at least 8).
3. **Real block overhead** (``--real-blocks N``, 0 skips): ``segment()`` on a tiny cement crop
   in blocks of ``--real-block`` voxels (default 8^3) with a 1-layer, 2-channel model, so the
   forward pass is negligible and the time per block is the worker path's own overhead (open
   the scan, output, ledger and model, read, predict, write, mark). Run twice with the same
   data: serially in this process, and through a 1-worker x 1-thread LocalCluster (the worker
   process keeps its caches between blocks, as in production). ``--only-real`` skips 1 and 2.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def noop(job: Any, block: Any) -> dict[str, Any]:
    """The block function: does nothing, returns what a real block returns (a small dict)."""
    return {"id": block.id, "index": block.index, "skipped": True, "voxels": 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan-volume", type=int, nargs=3, default=[4096, 4096, 4096])
    ap.add_argument("--plan-block", type=int, default=64)
    ap.add_argument("--tasks", type=int, default=20000, help="blocks dispatched per row")
    ap.add_argument("--in-flight", type=int, nargs="+", default=[0, 64, 512],
                    help="DaskExecutor max_in_flight values (0: its default)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--real-blocks", type=int, default=512, help="blocks of the real-overhead run (0: skip)")
    ap.add_argument("--real-block", type=int, default=8, help="edge of a real-overhead block")
    ap.add_argument("--only-real", action="store_true", help="only the real block overhead (part 3)")
    args = ap.parse_args()
    if args.only_real:
        print(_common.machine_facts({"cluster": "serial and LocalCluster 1 worker x 1 thread"}))
        real_overhead(args.real_blocks, args.real_block)
        return

    from pipeline.compute.cluster import ClusterSpec, open_client
    from pipeline.compute.executors import DaskExecutor
    from pipeline.core.tiling import iter_blocks, plan_blocks
    from pipeline.segment.worker import SegmentJob

    halo = _common.bundle().halo
    volume = tuple(args.plan_volume)
    block = (args.plan_block,) * 3
    chunks = tuple(min(args.plan_block, 128) for _ in range(3))
    print(_common.machine_facts({"cluster": f"LocalCluster {args.workers} worker(s) x {args.threads} thread(s)"}))

    import psutil

    rss0 = psutil.Process().memory_info().rss
    t = time.perf_counter()
    blocks = plan_blocks(volume, block, halo, chunk_shape=chunks)
    t_plan = time.perf_counter() - t
    plan_bytes = psutil.Process().memory_info().rss - rss0
    t = time.perf_counter()
    n_lazy = sum(1 for _ in iter_blocks(volume, block, halo, chunk_shape=chunks))
    t_iter = time.perf_counter() - t
    n = len(blocks)
    assert n_lazy == n
    print(f"\nplanning {'x'.join(map(str, volume))} in blocks of {args.plan_block}^3, halo {halo}: {n} blocks")
    print(_common.table(["what", "blocks", "seconds", "us/block", "memory"], [
        ["plan_blocks (list)", n, f"{t_plan:.3f}", f"{1e6 * t_plan / n:.2f}", _common.mib(plan_bytes)],
        ["iter_blocks (lazy, consumed)", n, f"{t_iter:.3f}", f"{1e6 * t_iter / n:.2f}", "O(1)"],
    ]))
    print(_common.load_line(), flush=True)

    job = SegmentJob(scan="/nonexistent/scan.zarr", output="/nonexistent/out.zarr", model="/nonexistent/model",
                     fingerprint="0" * 64, classes=2, offset=0.0, scale=1.0)
    todo = list(itertools.islice(blocks, args.tasks))
    del blocks
    rows = []
    spec = ClusterSpec(workers=args.workers, threads_per_worker=args.threads)
    with open_client(spec) as client:
        DaskExecutor(client).run(noop, job, todo[:200])  # warm-up: the function reaches the workers
        for in_flight in args.in_flight:
            ex = DaskExecutor(client, max_in_flight=in_flight or None)
            t = time.perf_counter()
            outcome = ex.run(noop, job, todo)
            wall = time.perf_counter() - t
            assert len(outcome.results) == len(todo) and not outcome.failed, outcome.failed
            label = f"{in_flight}" if in_flight else f"default ({ex._capacity()})"
            rows.append([label, len(todo), f"{wall:.1f}", f"{1e3 * wall / len(todo):.2f}", f"{len(todo) / wall:.0f}"])
            print(f"in flight {label}: {wall:.1f}s; {_common.load_line()}", flush=True)
    print(f"\nDaskExecutor, no-op block function, {len(todo)} blocks per row:")
    print(_common.table(["max_in_flight", "blocks", "wall s", "ms/block", "blocks/s"], rows))
    print(_common.load_line())
    if args.real_blocks:
        real_overhead(args.real_blocks, args.real_block)


def real_overhead(n_blocks: int, edge: int) -> None:
    """Per-block wall time of ``segment()`` on ``n_blocks`` tiny blocks (see the module docstring)."""
    import math
    import tempfile
    from pathlib import Path

    from pipeline.compute.cluster import ClusterSpec
    from pipeline.compute.executors import SerialExecutor
    from pipeline.ingest.run import ingest_array
    from pipeline.io.bundle import init_bundle, save_bundle
    from pipeline.segment.run import segment

    side = max(1, round(n_blocks ** (1 / 3)))
    shape = (side * edge,) * 3
    n = math.prod(-(-s // edge) for s in shape)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        ingest_array(_common.cement_volume(shape), d / "scan.zarr", chunks=(edge,) * 3, pyramid=False)
        save_bundle(init_bundle(classes=("a", "b"), params={"channels": 2, "dilations": [1]}, seed=0), d / "m")
        for name, kwargs in (("serial (in process)", {"executor": SerialExecutor()}),
                             ("LocalCluster 1x1", {"cluster": ClusterSpec(workers=1, threads_per_worker=1)})):
            segment(d / "scan.zarr", d / "m", d / "warm.zarr", block=edge, qc=False, pyramid=False,
                    overwrite=True, **kwargs)  # warm-up: imports, worker start, model load
            r = segment(d / "scan.zarr", d / "m", d / "out.zarr", block=edge, qc=False, pyramid=False,
                        overwrite=True, **kwargs)
            dispatch = r.stage_seconds["dispatch"]
            rows.append([name, n, f"{dispatch:.2f}", f"{1e3 * dispatch / n:.2f}"])
            print(f"{name}: {dispatch:.2f}s for {n} blocks; {_common.load_line()}", flush=True)
    print(f"\nsegment(), {n} real blocks of {edge}^3 on a {'x'.join(map(str, shape))} cement crop:")
    print(_common.table(["executor", "blocks", "dispatch s", "ms/block"], rows))


if __name__ == "__main__":
    main()
