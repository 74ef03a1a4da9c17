"""``studios segment``: blockwise segmentation of a scan with a model bundle."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli.main import command
from pipeline.cli.options import add_cluster_options, cluster_from_args
from pipeline.core.errors import ConfigError


@command("segment")
def _segment_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("segment", help="segment a scan blockwise with a model bundle",
                       description="Plan blocks, run one Dask task per block (read block+halo, normalise with "
                       "global statistics, predict, trim the halo, write), then summarise.")
    p.add_argument("scan", type=Path, help="an ingested scan (.zarr)")
    p.add_argument("model", type=Path, help="a model bundle folder")
    p.add_argument("output", type=Path, help="the segmentation .zarr to write")
    p.add_argument("--block", type=int, nargs="+", default=None, metavar="N",
                   help="write-block edge, or Z Y X (a multiple of the output chunks; default 128, "
                   "or the largest that fits in free GPU memory on GPU workers)")
    p.add_argument("--chunks", type=int, nargs=3, metavar=("Z", "Y", "X"),
                   help="output chunks (default min(block,128))")
    p.add_argument("--probabilities", action="store_true", help="also write uint8 class probabilities")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:N or auto (default cuda with --cluster cuda, else cpu)")
    p.add_argument("--precision", choices=("fp32", "auto", "bf16", "fp16"), default="fp32",
                   help="model arithmetic: fp32 (default), auto (bf16 on CPUs with AMX-BF16/AVX512-BF16, else "
                   "fp32; see docs/exactness.md), bf16, or fp16 autocast on GPUs (docs/gpu.md)")
    p.add_argument("--exact", action="store_true",
                   help="bit-identical to a whole-volume pass (disables oneDNN; slower on CPU); always fp32: "
                   "makes --precision auto fp32, refuses bf16/fp16")
    p.add_argument("--skip-constant", action="store_true", help="skip blocks whose input is constant (air)")
    p.add_argument("--mask", type=Path, help="a studios image; blocks where it is 0 everywhere are skipped")
    p.add_argument("--retries", type=int, default=2, help="extra attempts per block (default 2)")
    p.add_argument("--timeout", type=float, help="seconds a block may run before it is abandoned and retried")
    p.add_argument("--overwrite", action="store_true", help="replace a finished output")
    p.add_argument("--force", action="store_true", help="recompute all blocks of an unfinished output")
    p.add_argument("--take-over-lock", action="store_true", help="take over a stale lock left by a dead run")
    p.add_argument("--no-qc", action="store_true", help="skip the QC (qc.json, report.html) at the end of the run")
    add_cluster_options(p)
    p.set_defaults(handler=_segment)


def _segment(args: argparse.Namespace) -> int:
    from pipeline.core.progress import TerminalReporter
    from pipeline.segment.run import segment

    if args.block is not None and len(args.block) not in (1, 3):
        raise ConfigError("--block takes one or three integers (Z Y X)")
    block = None if args.block is None else args.block[0] if len(args.block) == 1 else tuple(args.block)
    spec, executor = cluster_from_args(args)
    r = segment(
        args.scan, args.model, args.output, block=block, chunks=args.chunks, cluster=spec, executor=executor,
        probabilities=args.probabilities, device=args.device, precision=args.precision, exact=args.exact,
        skip_constant=args.skip_constant,
        mask=args.mask, overwrite=args.overwrite, force=args.force, take_over_lock=args.take_over_lock,
        retries=args.retries, timeout=args.timeout, reporter=TerminalReporter(), qc=not args.no_qc,
    )
    fractions = ", ".join(f"{c} {100 * f:.1f}%" for c, f in r.class_fractions.items())
    print(f"wrote {r.path}: {r.blocks_done}/{r.blocks_total} blocks ({r.blocks_resumed} resumed, "
          f"{r.blocks_skipped} skipped) in {r.seconds:.1f}s, {r.voxels_per_second / 1e6:.2f} Mvox/s; {fractions}")
    if r.qc:
        print(f"QC report: {r.qc}")
    return 0
