"""Peak resident memory of a Dask worker while segmenting a small and a large volume.

    .venv/bin/python bench/memory.py [--sizes 256 1024] [--block 256] [--params JSON | --default-model]
                                     [--malloc retain|glibc]

For each size, a fresh LocalCluster (studios' default: 1 worker process x 1 thread, torch
threads = cores) segments the bundled cement CT tiled to SIZE^3 (uint8, ingested from a tiled
in-memory array, then freed) with the same block size. A thread polls, every 50 ms, the
resident set size (RSS) of the worker process plus its children (psutil); the table shows
the worker's RSS once warm (imports + model, after a 64^3 warm-up run) and its peak during the
segmentation, and the ratio of the peaks (target <= 1.2: worker memory must not grow with the
volume, since a worker only ever holds one block and its halo).

Model: the default architecture. Its full default width makes a 1024^3 forward take hours on
two cores, so by default this script uses the registry defaults with a narrower width
(``{"channels": 4, "head": 4}``; same dilations, so the same halo and the same block size):
the peak then is dominated by the block buffers rather than the activations. Pass
``--default-model`` for the registry defaults (slow) or ``--params JSON`` for others.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

SMALL_PARAMS = {"channels": 4, "head": 4}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--arch", default=None)
    ap.add_argument("--params", default=None, help=f"JSON model params (default {json.dumps(SMALL_PARAMS)})")
    ap.add_argument("--default-model", action="store_true", help="registry default params (slow at 1024^3)")
    ap.add_argument("--probabilities", action="store_true", help="also write probabilities")
    ap.add_argument("--keep", type=Path, default=None, help="work folder to use (kept); default a temp folder")
    ap.add_argument("--malloc", choices=("retain", "glibc"), default="retain",
                    help="retain (studios' default worker_heap): driver and workers keep freed memory; "
                         "glibc: its defaults")
    args = ap.parse_args()
    heap, malloc_note = _common.set_malloc(args.malloc)

    import torch

    from pipeline.compute.cluster import ClusterSpec, open_client
    from pipeline.ingest.run import ingest_array
    from pipeline.io.bundle import save_bundle
    from pipeline.segment.run import segment

    params = None if args.default_model else (args.params or SMALL_PARAMS)
    bundle = _common.bundle(args.arch, params)
    spec = ClusterSpec(worker_heap=heap)
    print(_common.machine_facts({"cluster": f"LocalCluster {spec.workers} worker x {spec.threads_per_worker} thread, "
                                            f"torch threads per block {spec.torch_threads()}", "": malloc_note}))
    print(f"{_common.describe(bundle)}; block {args.block}^3 (chunks {min(args.block, 128)}^3), "
          f"probabilities={'on' if args.probabilities else 'off'}")

    rows: list[list[Any]] = []
    peaks: dict[int, int] = {}
    with tempfile.TemporaryDirectory(prefix="studios-bench-", dir=args.keep) as tmp:
        root = Path(tmp)
        model_dir = save_bundle(bundle, root / "model")
        ingest_array(_common.cement_volume(64), root / "small.zarr")
        for size in args.sizes:
            t = time.perf_counter()
            volume = _common.cement_volume(size)
            ingest_array(volume, root / f"scan{size}.zarr")
            del volume
            gc.collect()
            t_ingest = time.perf_counter() - t
            print(f"{size}^3 ingested in {t_ingest:.1f}s; {_common.load_line()}", flush=True)
            with open_client(spec) as client:
                pids = list(client.run(os.getpid).values())
                address = ClusterSpec(kind="address", address=client.scheduler.address)
                client.run(torch.set_num_threads, spec.torch_threads())
                segment(root / "small.zarr", model_dir, root / f"warm{size}.zarr", block=64, cluster=address, qc=False)
                warm = sum(_common.PeakRSS.rss_tree(p) for p in pids)
                poll = _common.PeakRSS(pids)
                t = time.perf_counter()
                with poll:
                    r = segment(root / f"scan{size}.zarr", model_dir, root / f"seg{size}.zarr", block=args.block,
                                cluster=address, probabilities=args.probabilities, qc=False)
                wall = time.perf_counter() - t
            peaks[size] = poll.peak
            rows.append([f"{size}^3", f"{size**3 / 2**20:.0f} MiB", r.blocks_total, f"{wall:.1f}",
                         f"{size**3 / wall / 1e6:.2f}", _common.mib(warm), _common.mib(poll.peak),
                         _common.mib(poll.peak - warm)])
            print(f"{size}^3 segmented in {wall:.1f}s, worker peak {_common.mib(poll.peak)}; {_common.load_line()}",
                  flush=True)
            for path in root.glob(f"*{size}.zarr"):
                shutil.rmtree(path, ignore_errors=True)

    print()
    print(_common.table(["volume", "uint8 size", "blocks", "segment s", "Mvox/s", "worker RSS warm", "worker peak",
                         "peak - warm"], rows))
    sizes = list(peaks)
    if len(sizes) >= 2:
        a, b = sizes[0], sizes[-1]
        print(f"\npeak worker RSS {b}^3 / {a}^3 = {peaks[b] / peaks[a]:.2f} (target <= 1.2) "
              f"for a {b**3 / a**3:.0f}x larger volume")
    print(_common.load_line())


if __name__ == "__main__":
    main()
