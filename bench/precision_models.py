"""Train the models bench/precision.py compares (about 6 minutes on 2 cores).

    PYTHONPATH=. python bench/precision_models.py OUT [--minutes 1.5]

Writes ``OUT/phantom96.npy`` (a 96^3 uint16 phantom, seed 3) and the bundles
``OUT/phantom-<arch>`` (trained on 4 annotated z-slices of that phantom) and
``OUT/cement-<arch>`` (the bundled cement CT with its bundled scribbles), for the default
architecture and the filter bank.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ARCHS = ("dilated_resnet", "filterbank_mlp")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--minutes", type=float, default=1.5, help="training time per model")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from pipeline.demo import bundled_scan, bundled_scribbles
    from pipeline.ingest.run import ingest, ingest_array
    from pipeline.testing.phantom import make_annotations, make_phantom, to_uint16
    from pipeline.train.annotations import from_array
    from pipeline.train.loop import train

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    ph = make_phantom((96, 96, 96), seed=3)
    volume = to_uint16(ph.volume)
    np.save(out / "phantom96.npy", volume)
    with tempfile.TemporaryDirectory(prefix="studios-precision-models-") as tmp:
        root = Path(tmp)
        ingest_array(volume, root / "phantom.zarr")
        ingest(bundled_scan(), root / "cement.zarr", voxel_size=(1.0, 1.0, 1.0))
        ann = from_array(make_annotations(ph.labels, 4), classes=3)
        for arch in ARCHS:
            for name, scan, labels, classes in (
                ("phantom", root / "phantom.zarr", ann, ("matrix", "fibre", "pore")),
                ("cement", root / "cement.zarr", bundled_scribbles(), ("void", "cement")),
            ):
                t = time.perf_counter()
                r = train(scan, labels, out / f"{name}-{arch}", arch=arch, classes=classes, minutes=args.minutes,
                          seed=0, threads=args.threads, overwrite=True)
                print(f"{name}-{arch}: {r.epochs} epochs in {time.perf_counter() - t:.0f}s -> {r.bundle_path}",
                      flush=True)


if __name__ == "__main__":
    main()
