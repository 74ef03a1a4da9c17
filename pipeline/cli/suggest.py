"""``studios suggest``: where to annotate next (plugin of :mod:`pipeline.cli.main`).

::

    studios suggest SCAN.zarr MODEL_DIR [ANNOTATIONS] [-n N] [--json FILE]

Prints a table of slices (axis, index, score, box on the slice, reason), best first, and with
``--json`` writes the same as a JSON list. See :mod:`pipeline.train.suggest`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.cli.main import command
from pipeline.core.errors import StorageError


@command("suggest")
def _suggest_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from pipeline.train.suggest import DEFAULT_CANDIDATES, MEASURES

    p = sub.add_parser(
        "suggest", help="rank slices (and boxes) to annotate next by model uncertainty",
        description="Predict evenly spaced candidate slices with the model, score them by uncertainty "
        "(1 - top-2 margin, or entropy), spread the picks over the volume and away from the annotated "
        "slices, and print the best N with the box on each slice where the model is least sure.",
    )
    p.add_argument("scan", type=Path, metavar="SCAN", help="an ingested scan (.zarr)")
    p.add_argument("model", type=Path, metavar="MODEL", help="a model bundle folder")
    p.add_argument("annotations", type=Path, nargs="?", metavar="ANNOTATIONS",
                   help="the annotations so far (label volume, napari labels, .ilp or YAML slice listing)")
    p.add_argument("-n", type=int, default=5, help="suggestions to print (default 5)")
    p.add_argument("--axes", nargs="+", default=["z", "y", "x"], choices=("z", "y", "x"),
                   help="axes to consider (default z y x)")
    p.add_argument("--candidates", type=int, default=None,
                   help=f"candidate slices per axis, evenly spaced (default {DEFAULT_CANDIDATES})")
    p.add_argument("--measure", choices=MEASURES, default="margin", help="uncertainty measure (default margin)")
    p.add_argument("--json", dest="json_path", type=Path, metavar="FILE", help="also write the suggestions as JSON")
    p.set_defaults(handler=_suggest)


def _suggest(args: argparse.Namespace) -> int:
    from pipeline.core.progress import TerminalReporter
    from pipeline.train.suggest import suggest

    found = suggest(args.scan, args.model, args.annotations, n=args.n, axes=args.axes, candidates=args.candidates,
                    reporter=TerminalReporter(), measure=args.measure)
    print(f"{'rank':>4}  {'axis':4}  {'index':>5}  {'score':>6}  {'box (z, y, x)':28}  reason")
    for rank, s in enumerate(found, 1):
        box = str(s.box) if s.box is not None else "-"
        print(f"{rank:>4}  {s.axis:4}  {s.index:>5}  {s.score:6.3f}  {box:28}  {s.reason}")
    if args.json_path is not None:
        try:
            args.json_path.write_text(json.dumps([s.to_json() for s in found], indent=2) + "\n")
        except OSError as exc:
            raise StorageError(f"{args.json_path}: cannot write the suggestions ({exc}); check the path") from None
        print(f"wrote {args.json_path}")
    return 0
