"""``studios demo``: the embedded demo end to end on a bundled real tomogram."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli.main import command


@command("demo")
def _demo_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="run the embedded demo end to end on a bundled real tomogram")
    p.add_argument("--output", type=Path, default=Path("demo-output"),
                   help="folder for the results (default demo-output)")
    p.add_argument("--workers", type=int, default=1, help="Dask worker processes (default 1)")
    p.add_argument("--epochs", type=int, default=3, help="training epochs on the bundled scribbles (default 3)")
    p.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    summary = run_demo(args.output, workers=args.workers, epochs=args.epochs)
    print(summary)
    return 0
