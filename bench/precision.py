"""bf16 against fp32 with trained models: speed, label agreement, class-fraction shifts, seams.

    PYTHONPATH=. python bench/precision.py --models DIR [--cases NAME ...] [--block 64] [--no-whole]

``DIR`` holds trained bundles ``phantom-<arch>`` (trained on the 96^3 phantom saved as
``phantom96.npy`` beside them) and ``cement-<arch>`` (trained on the bundled cement CT with its
scribbles); bench/precision_models.py makes them. Cases (scan x model):

- ``phantom``: the phantom the phantom models were trained on (its unannotated voxels are most);
- ``cement``: the real cement CT (128^3) with the cement models;
- ``fibres``: the real fibre-composite CT from ``../shared/data/qim3d`` (central 96^3) with the
  phantom models (a fibre composite too; normalised with the scan's own statistics).

Per case and precision, ``segment()`` runs in this process (SerialExecutor: the worker's block
path, read -> forward -> post -> write, without the cluster), fp32 and bf16 interleaved. Rows:
seconds, Mvox/s, bf16/fp32 speed ratio, label agreement with fp32, the largest class-fraction
shift (percentage points), and (unless ``--no-whole``) bf16 blockwise vs a bf16 whole-volume
pass (the seam question at bf16). The criteria of docs/exactness.md are printed at the end.
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

AGREE_MIN = 99.95  # % of voxels with the fp32 label
SHIFT_MAX = 0.05  # percentage points, any class
ROOT = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    for base in (ROOT.parent / "shared" / "data", ROOT.parents[1] / "shared" / "data"):
        if base.is_dir():
            return base
    raise SystemExit("../shared/data not found")


def crop(volume: np.ndarray[Any, Any], size: int | None) -> np.ndarray[Any, Any]:
    """The central ``size``^3 of ``volume`` (all of it when None or larger)."""
    if size is None:
        return volume
    starts = [max(0, (s - size) // 2) for s in volume.shape]
    return volume[tuple(slice(a, a + size) for a in starts)].copy()


def cases(models: Path, names: list[str], size: int | None) -> list[tuple[str, str, np.ndarray[Any, Any]]]:
    import tifffile

    from pipeline.demo import bundled_scan

    out = []
    archs = sorted(p.name.split("-", 1)[1] for p in models.glob("phantom-*") if p.is_dir())
    for name in names:
        if name == "phantom":
            vol = np.load(models / "phantom96.npy")
            out += [(name, f"phantom-{a}", crop(vol, size)) for a in archs]
        elif name == "cement":
            vol = tifffile.imread(bundled_scan())
            out += [(name, f"cement-{a}", crop(vol, size)) for a in archs if (models / f"cement-{a}").is_dir()]
        elif name == "fibres":
            vol = tifffile.imread(shared_data() / "qim3d" / "fibers_150x150x150.tif")
            out += [(name, f"phantom-{a}", crop(vol, size or 96)) for a in archs]
        else:
            raise SystemExit(f"unknown case {name!r}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, required=True)
    ap.add_argument("--cases", nargs="+", default=["phantom", "cement", "fibres"])
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--size", type=int, default=None,
                    help="central SIZE^3 crop of every scan (bf16 is slow on CPUs without a bf16 unit)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-whole", action="store_true", help="skip the bf16 whole-volume pass")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from pipeline.compute.executors import SerialExecutor
    from pipeline.ingest.run import ingest_array
    from pipeline.io.bundle import load_bundle
    from pipeline.io.store import PAD_MODE, open_image
    from pipeline.segment.precision import cpu_facts
    from pipeline.segment.predict import forward, numerics, to_labels
    from pipeline.segment.run import segment

    print(_common.machine_facts({"cpu numerics": cpu_facts(), "torch threads": args.threads}))
    rows: list[list[Any]] = []
    worst_agree, worst_shift = 100.0, 0.0
    with tempfile.TemporaryDirectory(prefix="studios-precision-") as tmp:
        root = Path(tmp)
        for i, (case, model_name, volume) in enumerate(cases(args.models, args.cases, args.size)):
            scan = root / f"scan{i}.zarr"
            ingest_array(volume, scan)
            bundle = load_bundle(args.models / model_name)
            got: dict[str, tuple[float, np.ndarray[Any, Any], dict[str, float]]] = {}
            for prec in ("fp32", "bf16"):
                t = time.perf_counter()
                r = segment(scan, bundle, root / f"seg{i}-{prec}.zarr", block=args.block, executor=SerialExecutor(),
                            precision=prec, qc=False, pyramid=False)
                wall = time.perf_counter() - t
                labels = np.asarray(open_image(root / f"seg{i}-{prec}.zarr", kind="segmentation").array[...])
                got[prec] = (wall, labels, r.class_fractions)
                print(f"{case} {model_name} {prec}: {wall:.1f}s; {_common.load_line()}", flush=True)
            (t32, l32, f32), (t16, l16, f16) = got["fp32"], got["bf16"]
            agree = 100.0 * float((l32 == l16).mean())
            shift = max(abs(f16[c] - f32[c]) * 100.0 for c in f32)
            worst_agree, worst_shift = min(worst_agree, agree), max(worst_shift, shift)
            seam = ""
            if not args.no_whole:
                image = open_image(scan)
                offset, scale = bundle.normalization.affine(image.stats)
                padded = np.pad(volume, bundle.halo, mode=PAD_MODE)
                with numerics(exact=False):
                    whole = to_labels(forward(bundle.build(), padded, offset=offset, scale=scale, precision="bf16"))
                seam = f"{100.0 * float((whole == l16).mean()):.4f}"
            n = volume.size
            fr = " ".join(f"{c} {100 * f32[c]:.2f}/{100 * f16[c]:.2f}" for c in f32)
            rows.append([case, model_name, "x".join(map(str, volume.shape)), f"{t32:.1f}", f"{n / t32 / 1e6:.3f}",
                         f"{t16:.1f}", f"{n / t16 / 1e6:.3f}", f"{t32 / t16:.2f}", f"{agree:.4f}", f"{shift:.4f}",
                         seam, fr])
    print()
    print(_common.table(["case", "model", "shape", "fp32 s", "fp32 Mvox/s", "bf16 s", "bf16 Mvox/s",
                         "speed bf16/fp32", "labels agree %", "max shift pp", "bf16 block=whole %",
                         "fractions % fp32/bf16"], rows))
    ok = worst_agree >= AGREE_MIN and worst_shift <= SHIFT_MAX
    print(f"\ncriteria (agreement >= {AGREE_MIN} %, shift <= {SHIFT_MAX} pp): worst agreement {worst_agree:.4f} %, "
          f"worst shift {worst_shift:.4f} pp -> {'MET' if ok else 'NOT MET'}")
    print(_common.load_line())


if __name__ == "__main__":
    main()
