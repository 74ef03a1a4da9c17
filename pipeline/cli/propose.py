"""``studios propose``: a first segmentation with no labels (plugin of :mod:`pipeline.cli.main`).

::

    studios propose SCAN.zarr OUTPUT_DIR --classes K [--method gmm|kmeans]

Writes ``OUTPUT_DIR/model/`` (a ``filterbank_mlp`` bundle), ``OUTPUT_DIR/segmentation.zarr`` and
``OUTPUT_DIR/preannotation.zarr`` (confident voxels on a few slices, for ``studios train`` after
correction in a viewer). See :mod:`pipeline.train.propose`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli.main import command
from pipeline.cli.options import add_cluster_options, cluster_from_args


@command("propose")
def _propose_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from pipeline.train.propose import DEFAULT_SAMPLE, FEATURE_SETS, METHODS

    p = sub.add_parser(
        "propose", help="a first segmentation and pre-annotation with no labels (clustering)",
        description="Cluster filter-bank features of a sample of voxels into K phases (Gaussian mixture or "
        "k-means), order them by mean intensity, segment the scan blockwise with the resulting linear model, "
        "and write a sparse pre-annotation of confident voxels to correct in a viewer and train on.",
    )
    p.add_argument("scan", type=Path, metavar="SCAN", help="an ingested scan (.zarr)")
    p.add_argument("output", type=Path, metavar="OUTPUT", help="folder to create (model/, segmentation.zarr, "
                   "preannotation.zarr)")
    p.add_argument("--classes", type=int, required=True, metavar="K", help="number of phases (>= 2)")
    p.add_argument("--names", nargs="+", metavar="NAME", help="class names, darkest phase first")
    p.add_argument("--method", choices=METHODS, default="gmm", help="gmm (tied covariance, default) or kmeans")
    p.add_argument("--features", choices=FEATURE_SETS, default="intensity",
                   help="intensity (raw + smoothed, default) or all filter-bank features")
    p.add_argument("--sample", type=int, default=DEFAULT_SAMPLE, help=f"voxels to fit on (default {DEFAULT_SAMPLE})")
    p.add_argument("--confidence", type=float, default=0.95,
                   help="posterior a voxel needs to enter the pre-annotation (default 0.95)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder's results")
    add_cluster_options(p)
    p.set_defaults(handler=_propose)


def _propose(args: argparse.Namespace) -> int:
    from pipeline.core.progress import TerminalReporter
    from pipeline.train.propose import propose

    spec, executor = cluster_from_args(args)
    r = propose(args.scan, args.output, classes=args.classes, method=args.method, features=args.features,
                sample=args.sample, confidence=args.confidence, names=args.names, seed=args.seed,
                overwrite=args.overwrite, reporter=TerminalReporter(), cluster=spec, executor=executor)
    phases = ", ".join(f"{i}: mean {m:.4g} ({100 * f:.1f}%)"
                       for i, (m, f) in enumerate(zip(r.class_means, r.fractions, strict=True), 1))
    print(f"wrote {r.model}, {r.segmentation} and {r.preannotation} in {r.seconds:.1f}s; phases {phases}; "
          f"pre-annotated voxels per class {list(r.preannotated)}")
    print(f"next: correct {r.preannotation} in a viewer, then 'studios train {args.scan} {r.preannotation} MODEL_DIR'")
    return 0
