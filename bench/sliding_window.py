"""studios blockwise inference vs MONAI ``sliding_window_inference`` with the same model.

    .venv/bin/python bench/sliding_window.py [--size 256] [--window 128] [--overlaps 0.25 0.5]
                                             [--blocks 128 256] [--check-size 128] [--check-block 64]

Needs ``monai`` (``pip install -e ".[bench]"``).

Same model (the default architecture with seeded random weights), same input (the bundled
cement CT tiled to SIZE^3, normalised with the scan's global statistics), same cores:

- **reference**: :func:`pipeline.segment.predict.predict_volume`, the whole volume in one forward pass
  (edge-padded by the halo at the volume border only);
- **studios**: ``segment()`` on a warm LocalCluster (default settings otherwise: 1 worker x 1
  thread, torch threads = cores), reading from and writing to zarr, one row per block size.
  Each block reads its halo from the volume, so its output is the whole-volume output;
- **MONAI**: ``sliding_window_inference(roi_size=WINDOW, overlap=o, mode="gaussian")`` in
  memory. The studios model is *valid* (its output is smaller than its input by the halo), so
  it is wrapped as a same-size predictor the way one would for MONAI: each window is
  edge-padded by the halo, predicted, and softmaxed; MONAI blends the window probabilities
  with Gaussian weights. Inside the volume that padding replaces real context with copies of
  the window edge, so predictions near window borders are wrong: the seam error.

Seam error against the reference: the largest |probability difference| over all voxels and
classes, and the number of voxels whose label differs. For studios the labels are those the
pipeline wrote; its probabilities are checked on a smaller volume (CHECK_SIZE^3, blocks of
CHECK_BLOCK) in memory through the same per-block path (``read_padded`` + ``forward``), in the
default numerics and in exact mode (``--exact``: oneDNN off), where it must be 0.
Speed ratio = MONAI seconds / studios seconds (target >= 1.5).
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


def monai_predictor(model: torch.nn.Module, halo: int):
    """Wrap a valid model as a same-size predictor: edge-pad each window by the halo."""
    from pipeline.segment.predict import softmax_channels

    def predict(x: torch.Tensor) -> torch.Tensor:
        padded = torch.nn.functional.pad(x, (halo,) * 6, mode="replicate")
        return softmax_channels(model(padded))

    return predict


def blockwise_in_memory(
    model: Any, volume: np.ndarray, block: int, offset: float, scale: float, *, exact: bool
) -> np.ndarray:
    """studios' per-block path (read_padded + forward) over an in-memory volume, assembled."""
    from pipeline.core.tiling import plan_blocks
    from pipeline.io.store import read_padded
    from pipeline.segment.predict import forward, numerics

    out = np.empty((model.classes, *volume.shape), dtype=np.float32)
    with numerics(exact=exact):
        for b in plan_blocks(volume.shape, (block,) * 3, model.halo):
            raw = read_padded(volume, b, volume.shape)
            out[(slice(None), *b.write.to_slices())] = forward(model, raw, offset=offset, scale=scale)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--window", type=int, default=128, help="MONAI roi_size (edge)")
    ap.add_argument("--overlaps", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--blocks", type=int, nargs="+", default=None, help="studios block sizes (default: window, 256)")
    ap.add_argument("--check-size", type=int, default=128, help="volume edge of the in-memory probability check")
    ap.add_argument("--check-block", type=int, default=64)
    ap.add_argument("--arch", default=None)
    ap.add_argument("--params", default=None)
    args = ap.parse_args()

    try:
        from monai.inferers import sliding_window_inference
    except ImportError:
        sys.exit("monai is not installed: pip install -e '.[bench]' (check that it keeps your torch)")

    from pipeline.compute.cluster import ClusterSpec, open_client
    from pipeline.compute.hosts import cpu_count
    from pipeline.core.normalize import apply_affine
    from pipeline.ingest.run import ingest_array
    from pipeline.io.bundle import save_bundle
    from pipeline.io.store import open_image
    from pipeline.segment.predict import predict_volume, to_labels
    from pipeline.segment.run import segment

    cores = cpu_count()
    torch.set_num_threads(cores)
    blocks = args.blocks or sorted({args.window, 256})
    blocks = [b for b in blocks if b <= args.size] or [args.size]
    volume = _common.cement_volume(args.size)
    bundle = _common.bundle(args.arch, args.params)
    model = bundle.build()
    h = bundle.halo
    print(_common.machine_facts({"studios cluster": "LocalCluster 1 worker x 1 thread (warm)"}))
    print(f"volume {volume.shape} uint8, {_common.describe(bundle)}")
    print(f"MONAI window {args.window}^3 (+{h} edge padding each side inside the predictor), Gaussian blending, "
          f"sw_batch_size 1; studios blocks {blocks}")

    with tempfile.TemporaryDirectory(prefix="studios-bench-") as tmp:
        root = Path(tmp)
        ingest_array(volume, root / "scan.zarr")
        ingest_array(volume[:64, :64, :64].copy(), root / "small.zarr")
        model_dir = save_bundle(bundle, root / "model")
        offset, scale = bundle.normalization.affine(open_image(root / "scan.zarr").stats)

        predict_volume(model, volume[:32, :32, :32], offset=offset, scale=scale)  # warm-up
        t = time.perf_counter()
        ref = predict_volume(model, volume, offset=offset, scale=scale)
        t_ref = time.perf_counter() - t
        ref_labels = to_labels(ref)
        print(f"reference: {t_ref:.1f}s; {_common.load_line()}", flush=True)

        studios: dict[int, tuple[float, int]] = {}
        with open_client(ClusterSpec()) as client:
            spec = ClusterSpec(kind="address", address=client.scheduler.address)
            client.run(torch.set_num_threads, ClusterSpec().torch_threads())
            segment(root / "small.zarr", model_dir, root / "warm.zarr", block=64, cluster=spec, qc=False)
            for block in blocks:
                out = root / f"seg{block}.zarr"
                t = time.perf_counter()
                segment(root / "scan.zarr", model_dir, out, block=block, cluster=spec, qc=False)
                wall = time.perf_counter() - t
                labels = np.asarray(open_image(out, kind="segmentation").array[...])
                studios[block] = (wall, int((labels != ref_labels).sum()))
                print(f"studios block {block}: {wall:.1f}s; {_common.load_line()}", flush=True)

        x = torch.from_numpy(apply_affine(volume, offset, scale))[None, None]
        predictor = monai_predictor(model, h)
        monai: dict[float, tuple[float, float, int]] = {}
        for overlap in args.overlaps:
            with torch.inference_mode():
                t = time.perf_counter()
                probs = sliding_window_inference(x, args.window, 1, predictor, overlap=overlap, mode="gaussian")
                wall = time.perf_counter() - t
            p = probs[0].numpy()
            monai[overlap] = (wall, float(np.abs(p - ref).max()), int((to_labels(p) != ref_labels).sum()))
            print(f"MONAI overlap {overlap}: {wall:.1f}s; {_common.load_line()}", flush=True)
        del x, ref

        # studios probabilities, in memory through the per-block path, default and exact numerics
        small = volume[: args.check_size, : args.check_size, : args.check_size].copy()
        check = {}
        for exact in (False, True):
            r = predict_volume(model, small, offset=offset, scale=scale, exact=exact)
            b = blockwise_in_memory(model, small, args.check_block, offset, scale, exact=exact)
            check[exact] = (float(np.abs(b - r).max()), int((to_labels(b) != to_labels(r)).sum()))
        print(f"check done; {_common.load_line()}", flush=True)

    n = volume.size
    fastest = min(w for w, _ in studios.values())
    rows: list[list[Any]] = [
        ["whole-volume reference (in memory)", f"{t_ref:.1f}", f"{n / t_ref / 1e6:.3f}", "", "0", "0"]
    ]
    for block, (wall, bad) in studios.items():
        rows.append([f"studios pipeline, block {block} (zarr in/out)", f"{wall:.1f}", f"{n / wall / 1e6:.3f}", "",
                     "see below", f"{bad}"])
    for overlap, (wall, err, bad) in monai.items():
        rows.append([f"MONAI sliding window, overlap {overlap}", f"{wall:.1f}", f"{n / wall / 1e6:.3f}",
                     f"{wall / fastest:.2f}x", f"{err:.3g}", f"{bad} ({100 * bad / n:.2f}%)"])
    print()
    print(_common.table(["method", "wall s", "Mvox/s", "MONAI/studios", "max |dp|", "labels differing"], rows))
    cs, cb = args.check_size, args.check_block
    print(f"\nstudios probabilities vs whole-volume pass ({cs}^3 volume, blocks of {cb}, in memory, per-block path):")
    print(f"  default numerics (oneDNN): max |dp| = {check[False][0]:.3g}, labels differing {check[False][1]}")
    print(f"  exact mode (oneDNN off):   max |dp| = {check[True][0]:.3g}, labels differing {check[True][1]}")
    for overlap, (wall, _, _) in monai.items():
        print(f"speed: studios (fastest block) is {wall / fastest:.2f}x MONAI overlap {overlap} (target >= 1.5)")
    print(_common.load_line())


if __name__ == "__main__":
    main()
