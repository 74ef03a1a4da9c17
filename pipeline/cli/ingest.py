"""``studios ingest``: a reconstruction becomes a chunked OME-Zarr scan."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli.main import command


@command("ingest")
def _ingest_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("ingest", help="convert a reconstruction to a chunked OME-Zarr scan",
                       description="Convert a reconstruction (TIFF folder, multipage TIFF, FILE.h5:/dataset, raw, "
                       ".npy, zarr) into a zarr v3 OME-Zarr scan with global intensity statistics.")
    p.add_argument("source", help="TIFF folder, .tif, FILE.h5:/exchange/data, .npy, .zarr, or raw file")
    p.add_argument("output", type=Path, help="the .zarr to create")
    p.add_argument("--chunks", type=int, nargs=3, default=(128, 128, 128), metavar=("Z", "Y", "X"))
    p.add_argument("--voxel-size", type=float, nargs=3, default=(1.0, 1.0, 1.0), metavar=("Z", "Y", "X"))
    p.add_argument("--unit", default="micrometer", help="unit of the voxel size (default micrometer)")
    p.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"), help="raw files: volume shape")
    p.add_argument("--dtype", help="raw files: uint8, uint16, int16 or float32")
    p.add_argument("--byte-order", default="<", choices=("<", ">"), help="raw files: < little, > big endian")
    p.add_argument("--offset", type=int, default=0, help="raw files: header bytes to skip")
    p.add_argument("--workers", type=int, default=2, help="slabs processed in parallel (default 2)")
    p.add_argument("--nonfinite", choices=("error", "zero"), default="error",
                   help="float scans with NaN/Inf: refuse (default) or replace by 0")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(handler=_ingest)


def _ingest(args: argparse.Namespace) -> int:
    from pipeline.core.progress import TerminalReporter
    from pipeline.ingest.run import ingest

    r = ingest(
        args.source, args.output, chunks=args.chunks, voxel_size=args.voxel_size, unit=args.unit,
        workers=args.workers, nonfinite=args.nonfinite, overwrite=args.overwrite, reporter=TerminalReporter(),
        raw_shape=args.shape, raw_dtype=args.dtype, byte_order=args.byte_order, raw_offset=args.offset,
    )
    print(f"wrote {r.path}: {r.shape[0]}x{r.shape[1]}x{r.shape[2]} {r.dtype}, {r.levels} levels, "
          f"mean {r.stats.mean:.4g}, std {r.stats.std:.4g}")
    return 0
