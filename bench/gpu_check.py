"""The GPU check behind bench/gpu_check.sh: exactness, throughput per precision, memory, block.

    PYTHONPATH=. python bench/gpu_check.py [--device cuda|cpu] [--size 512 1024]
        [--precisions fp32 bf16 fp16] [--cluster cuda|serial] [--params JSON] [--budget-s 420]

1. Exactness: a real scan (the bundled cement CT, E^3 with E = min(96, largest SIZE)) segmented
   blockwise (E/3 and E/2 blocks, exact mode, deterministic kernels, fp32) against one
   whole-volume pass on the same device; labels must be identical (``PASS``). The largest
   uint8 probability difference is shown beside it.
2. Throughput: for each SIZE (the cement CT tiled to SIZE^3, uint8) and precision,
   ``segment()`` through the cluster (``--cluster cuda``: one dask-cuda worker per GPU, started
   once and reused; ``serial``: in this process). The block is segment's default (on GPUs: the
   auto block sized to free GPU memory), shown per row with the workers' peak GPU memory
   (``torch.cuda.max_memory_allocated``, reset before each run).
3. One table, then the load average. Runs that would start after ``--budget-s`` seconds are
   listed as skipped, so the whole check ends in time.

``--device cpu --size 64`` is the CPU smoke path (serial, fp32 only by default); a test runs it.
"""

from __future__ import annotations

import argparse
import json
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

EXACT_EDGE = 96  # exactness volume edge (smaller when every --size is smaller)


def deterministic(device: str) -> None:
    """Deterministic kernels, no TF32 (exact mode also turns TF32 off per block)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)  # a kernel without one warns, the check still runs
    if device.startswith("cuda"):
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def exactness(root: Path, bundle: Any, device: str, edge: int) -> list[Any]:
    import zarr

    from pipeline.compute.executors import SerialExecutor
    from pipeline.ingest.run import ingest_array
    from pipeline.io.store import PAD_MODE, open_image
    from pipeline.segment.predict import predict, resolve_device, to_labels
    from pipeline.segment.run import segment

    shape = (edge,) * 3
    volume = _common.cement_volume(shape)
    ingest_array(volume, root / "exact.zarr")
    image = open_image(root / "exact.zarr")
    offset, scale = bundle.normalization.affine(image.stats)
    model = bundle.build().to(resolve_device(device))
    padded = np.pad(volume, bundle.halo, mode=PAD_MODE)
    t = time.perf_counter()
    whole = predict(model, padded, offset=offset, scale=scale, device=resolve_device(device), exact=True)
    t_whole = time.perf_counter() - t
    ref = to_labels(whole)
    rows = []
    for block in (edge // 3, edge // 2):
        out = root / f"exact-{block}.zarr"
        t = time.perf_counter()
        segment(root / "exact.zarr", bundle, out, block=block, executor=SerialExecutor(), device=device, exact=True,
                probabilities=True, qc=False, pyramid=False)
        wall = time.perf_counter() - t
        labels = np.asarray(open_image(out, kind="segmentation").array[...])
        probs = np.asarray(zarr.open_group(str(out), mode="r")["probabilities/0"][...]).astype(np.int16)
        differ = int((labels != ref).sum())
        dq = int(np.abs(probs - np.rint(whole * 255).astype(np.int16)).max())
        rows.append([f"exact fp32, block {block} vs whole", "x".join(map(str, shape)), block, "fp32",
                     f"{wall:.1f}", f"{volume.size / wall / 1e6:.3g}", "-",
                     f"{'PASS' if differ == 0 else 'FAIL'}: {differ} labels differ, uint8 prob diff {dq} "
                     f"(whole pass {t_whole:.1f}s)"])
    return rows


def gpu_peak(client: Any) -> str:
    if client is None:
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if torch.cuda.is_available() else "-"
    peaks = client.run(lambda: torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0)
    return ", ".join(f"{p / 2**30:.2f}" for p in peaks.values()) + " GiB"


def reset_peak(client: Any) -> None:
    def reset() -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    if client is None:
        reset()
    else:
        client.run(reset)


def throughput(root: Path, bundle: Any, args: argparse.Namespace, t0: float) -> list[Any]:
    import contextlib

    from pipeline.compute.cluster import ClusterSpec, open_client
    from pipeline.compute.executors import SerialExecutor
    from pipeline.ingest.run import ingest_array
    from pipeline.segment.plan import block_shape
    from pipeline.segment.run import segment

    rows: list[Any] = []
    serial = args.cluster == "serial"
    ctx = contextlib.nullcontext(None) if serial else open_client(ClusterSpec(kind=args.cluster))
    with ctx as client:
        spec = None if serial else ClusterSpec(kind="address", address=client.scheduler.address)
        for size in args.size:
            if time.perf_counter() - t0 > args.budget_s:
                rows += [[f"segment {p}", f"{size}^3", "", p, "", "", "", "skipped: time budget"]
                         for p in args.precisions]
                continue
            scan = root / f"scan{size}.zarr"
            t = time.perf_counter()
            ingest_array(_common.cement_volume(size), scan)
            print(f"ingest {size}^3: {time.perf_counter() - t:.1f}s; {_common.load_line()}", flush=True)
            for prec in args.precisions:
                if time.perf_counter() - t0 > args.budget_s:
                    rows.append([f"segment {prec}", f"{size}^3", "", prec, "", "", "", "skipped: time budget"])
                    continue
                block = block_shape((size,) * 3, block=None, chunks=None, device=args.device, model=bundle.build,
                                    precision=prec)
                reset_peak(client)
                t = time.perf_counter()
                note = "ok"
                try:
                    r = segment(scan, bundle, root / f"seg{size}-{prec}.zarr", device=args.device, precision=prec,
                                cluster=spec, executor=SerialExecutor() if serial else None, qc=False)
                    wall = time.perf_counter() - t
                    mvox = f"{size**3 / wall / 1e6:.3g}"
                    fr = ", ".join(f"{c} {100 * f:.2f}%" for c, f in r.class_fractions.items())
                    note = f"{r.blocks_total} blocks; {fr}"
                except Exception as exc:  # report and go on: one table at the end
                    wall, mvox, note = time.perf_counter() - t, "-", f"FAILED {type(exc).__name__}: {exc}"[:160]
                rows.append([f"segment {prec}", f"{size}^3", "x".join(map(str, block)), prec, f"{wall:.1f}", mvox,
                             gpu_peak(client), note])
                print(f"{size}^3 {prec}: {wall:.1f}s; {_common.load_line()}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--precisions", nargs="+", default=None, help="default fp32 bf16 fp16 (cpu: fp32)")
    ap.add_argument("--cluster", choices=("cuda", "serial", "local"), default=None,
                    help="default cuda (device cuda) or serial (device cpu)")
    ap.add_argument("--arch", default=None)
    ap.add_argument("--params", default=None, help="JSON overriding the registry defaults of the model")
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no run after this many seconds")
    ap.add_argument("--no-exact", action="store_true")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.precisions = args.precisions or (["fp32", "bf16", "fp16"] if cuda else ["fp32"])
    args.cluster = args.cluster or ("cuda" if cuda else "serial")
    if cuda and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch (torch.cuda.is_available() is False); "
              "run with --device cpu for the smoke path", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    deterministic(args.device)
    from pipeline.segment.precision import cpu_facts

    facts: dict[str, Any] = {"cpu numerics": cpu_facts()}
    if cuda:
        facts["gpu"] = f"{torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} visible, " \
                       f"torch CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    print(_common.machine_facts(facts))
    bundle = _common.bundle(args.arch, args.params)
    print(_common.describe(bundle), flush=True)
    rows: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="studios-gpu-check-") as tmp:
        root = Path(tmp)
        if not args.no_exact:
            rows += exactness(root, bundle, args.device, min(EXACT_EDGE, max(args.size)))
            print(f"exactness done at {time.perf_counter() - t0:.0f}s; {_common.load_line()}", flush=True)
        torch.use_deterministic_algorithms(False)  # throughput: the kernels a run uses
        rows += throughput(root, bundle, args, t0)
    print()
    print(_common.table(["check", "volume", "block", "precision", "wall s", "Mvox/s", "GPU peak", "result"], rows))
    print(f"\ntotal {time.perf_counter() - t0:.0f}s; {_common.load_line()}")
    print("GPU_CHECK_JSON " + json.dumps({"rows": rows}))
    failed = any(str(r[-1]).startswith(("FAIL", "FAILED")) for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
