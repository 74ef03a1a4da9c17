"""The ``studios`` command.

Every subcommand has ``--help``. Errors are one line on stderr (``studios: error: ...``) and a
non-zero exit status; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.core.errors import ConfigError, StudiosError

logger = logging.getLogger("pipeline.cli.main")

_COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {}  # type: ignore[type-arg]


def command(name: str) -> Callable[[Callable[[argparse._SubParsersAction], None]], Callable[[argparse._SubParsersAction], None]]:  # type: ignore[type-arg]
    """Register a function that adds the subparser for ``name``."""

    def wrap(fn: Callable[[argparse._SubParsersAction], None]) -> Callable[[argparse._SubParsersAction], None]:  # type: ignore[type-arg]
        _COMMANDS[name] = fn
        return fn

    return wrap


def add_cluster_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--cluster", choices=("local", "slurm", "cuda", "serial"), default="local",
                   help="where blocks run: local Dask cluster (default), SLURM via dask-jobqueue, GPU workers, or in-process")
    g.add_argument("--workers", type=int, default=1, help="worker processes (local) or SLURM jobs (default 1)")
    g.add_argument("--threads-per-worker", type=int, default=1, help="blocks run at once per worker (default 1)")
    g.add_argument("--scheduler", metavar="ADDRESS", help="use an existing Dask scheduler, e.g. tcp://10.0.0.5:8786")
    g.add_argument("--cluster-config", metavar="YAML", type=Path,
                   help="site profile with a 'cluster:' section (SLURM partition, cores, memory, ...)")


def cluster_from_args(args: argparse.Namespace) -> tuple[Any, Any]:
    """(ClusterSpec | None, Executor | None) from the cluster options."""
    from pipeline.compute.cluster import ClusterSpec
    from pipeline.compute.executors import SerialExecutor

    if args.cluster == "serial":
        return None, SerialExecutor(retries=getattr(args, "retries", 2))
    if args.scheduler:
        return ClusterSpec(kind="address", address=args.scheduler), None
    if args.cluster_config is not None:
        from pipeline.core.config import cluster_spec_from_file

        spec = cluster_spec_from_file(args.cluster_config, kind=args.cluster, workers=args.workers)
        return spec, None
    return ClusterSpec(kind=args.cluster, workers=args.workers, threads_per_worker=args.threads_per_worker), None


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


@command("model")
def _model_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("model", help="create or inspect model bundles")
    msub = p.add_subparsers(dest="model_command", required=True, metavar="{init,info,list}")
    i = msub.add_parser("init", help="create a bundle with seeded random weights")
    i.add_argument("output", type=Path, help="bundle folder to create")
    i.add_argument("--classes", nargs="+", default=["background", "foreground"],
                   help="class names for labels 1..K (at least two), or a count N >= 2 for class_1..class_N")
    i.add_argument("--arch", default=None, help="architecture (see 'studios model list')")
    i.add_argument("--params", default="{}", help='architecture parameters as JSON, e.g. \'{"channels": 8}\'')
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--overwrite", action="store_true")
    i.set_defaults(handler=_model_init)
    info = msub.add_parser("info", help="print a bundle's architecture, halo, classes and provenance")
    info.add_argument("bundle", type=Path)
    info.set_defaults(handler=_model_info)
    lst = msub.add_parser("list", help="list the registered architectures")
    lst.set_defaults(handler=_model_list)


def _model_init(args: argparse.Namespace) -> int:
    from pipeline.io.bundle import init_bundle, save_bundle
    from pipeline.models import DEFAULT_ARCH

    try:
        params = json.loads(args.params)
    except ValueError as exc:
        raise ConfigError(f"--params is not valid JSON ({exc}); e.g. '{{\"channels\": 8}}'") from None
    bundle = init_bundle(classes=class_names(args.classes), arch=args.arch or DEFAULT_ARCH, params=params,
                         seed=args.seed)
    save_bundle(bundle, args.output, overwrite=args.overwrite)
    print(f"wrote {args.output}: {bundle.arch}, halo {bundle.halo}, classes {', '.join(bundle.classes)}")
    return 0


def class_names(given: Sequence[str]) -> tuple[str, ...]:
    """``--classes``: names (two or more), or one count N >= 2 meaning class_1..class_N."""
    if len(given) == 1 and given[0].strip().isdigit():
        n = int(given[0])
        if n < 2:
            raise ConfigError(f"--classes {n}: a segmentation model needs at least two classes; e.g. --classes 2")
        return tuple(f"class_{k}" for k in range(1, n + 1))
    if len(given) < 2:
        raise ConfigError(
            f"--classes {' '.join(given)}: one class given; --classes takes two or more names (label 1..K), "
            "e.g. --classes background fibre, or a count, e.g. --classes 3"
        )
    return tuple(given)


def _model_info(args: argparse.Namespace) -> int:
    from pipeline.io.bundle import load_bundle

    bundle = load_bundle(args.bundle)
    model = bundle.build()
    info = {**bundle.to_json(), "parameters": model.n_parameters(), "flops_per_voxel": model.flops_per_voxel(),
            "fingerprint": bundle.fingerprint}
    print(json.dumps(info, indent=2))
    return 0


def _model_list(args: argparse.Namespace) -> int:
    from pipeline.models import ARCHITECTURES

    for name, cls in sorted(ARCHITECTURES.items()):
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name:20s} {doc}")
    return 0


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
    p.add_argument("--chunks", type=int, nargs=3, metavar=("Z", "Y", "X"), help="output chunks (default min(block,128))")
    p.add_argument("--probabilities", action="store_true", help="also write uint8 class probabilities")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:N or auto (default cuda with --cluster cuda, else cpu)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="model arithmetic: fp32 (default, exact) or bf16/fp16 autocast on GPUs (see docs/gpu.md)")
    p.add_argument("--exact", action="store_true",
                   help="bit-identical to a whole-volume pass (disables oneDNN; slower on CPU)")
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


@command("demo")
def _demo_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="run the embedded demo end to end on a bundled real tomogram")
    p.add_argument("--output", type=Path, default=Path("demo-output"), help="folder for the results (default demo-output)")
    p.add_argument("--workers", type=int, default=1, help="Dask worker processes (default 1)")
    p.add_argument("--epochs", type=int, default=3, help="training epochs on the bundled scribbles (default 3)")
    p.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    summary = run_demo(args.output, workers=args.workers, epochs=args.epochs)
    print(summary)
    return 0


PLUGINS = ("pipeline.cli.train", "pipeline.cli.qc", "flows.cli")  # flows.cli imports Prefect; pipeline/ never does


def build_parser() -> argparse.ArgumentParser:
    from pipeline import __version__

    parser = argparse.ArgumentParser(
        prog="studios",
        description="Exact blockwise segmentation of large tomograms with stride-free local models.",
    )
    parser.add_argument("--version", action="version", version=f"studios {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-v", "--verbose", action="store_true", help="show progress logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _load_plugins()
    for add in _COMMANDS.values():
        add(sub)
    return parser


def _load_plugins() -> None:
    """Import the modules that register further subcommands (train, qc, run, ...)."""
    import importlib

    for name in PLUGINS:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise


def main(argv: Sequence[str] | None = None) -> int:
    import os

    # distributed configures its own log handlers when first imported: quiet them unless --debug
    if "--debug" not in (argv if argv is not None else sys.argv[1:]):
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.debug:
        for noisy in ("distributed", "prefect", "httpx", "dask_jobqueue"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    from pipeline.core import interrupt

    try:
        with interrupt.handling():  # SIGTERM / SIGINT: finish running work, record it, exit 143 / 130
            return int(args.handler(args))
    except interrupt.Interrupted as exc:
        print(f"studios: {exc}", file=sys.stderr)
        return exc.exit_code
    except StudiosError as exc:
        if args.debug:
            raise
        print(f"studios: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("studios: interrupted", file=sys.stderr)
        return interrupt.exit_code(130)
    except Exception as exc:
        if args.debug:
            raise
        print(f"studios: internal error: {type(exc).__name__}: {exc}; rerun with --debug for the traceback",
              file=sys.stderr)
        return 70

