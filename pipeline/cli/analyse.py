"""``studios analyse``: objects, fibre orientation, pores and surfaces of a segmentation (plugin of
:mod:`pipeline.cli.main`).

::

    studios analyse SEG.zarr [--out DIR] [--classes fibre pore] [--fibre fibre] [--pore pore] [options]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli.main import command

USAGE = "studios analyse [options] SEG.zarr"


@command("analyse")
def _analyse_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "analyse", usage=USAGE, help="quantify a segmentation: objects, fibre orientation, pores, surfaces",
        description="Blockwise analysis of a finished segmentation: a global instance-label image and an object "
        "table (volume, centroid, box, equivalent diameter, principal axes, elongation), phase fractions and "
        "profiles, structure-tensor fibre orientation, pore sizes and local thickness, and per-class surface "
        "meshes (STL, PLY, neuroglancer precomputed). Writes analysis.json (keys in docs/analysis.md).",
    )
    p.add_argument("segmentation", type=Path, help="the seg.zarr written by 'studios segment'")
    p.add_argument("--out", type=Path, help="output folder (default SEG.analysis beside the segmentation)")
    p.add_argument("--classes", nargs="+", metavar="CLASS",
                   help="classes (names or labels) for objects and meshes (default: all but the majority class)")
    p.add_argument("--fibre", metavar="CLASS", help="class for fibre orientation (default: one named fibre/fiber)")
    p.add_argument("--pore", metavar="CLASS", help="class for porosity and pore sizes (default: pore/void/air)")
    p.add_argument("--sigma", type=float, default=1.0, help="structure tensor: gradient scale in voxels (default 1)")
    p.add_argument("--rho", type=float, default=3.0, help="structure tensor: integration scale in voxels (default 3)")
    p.add_argument("--orientation-field", action="store_true", help="also write orientation.zarr (3, Z, Y, X)")
    p.add_argument("--mesh-sigma", type=float, default=1.0,
                   help="Gaussian smoothing of a class before marching cubes, voxels (default 1; 0 = raw)")
    p.add_argument("--no-meshes", action="store_true", help="skip the surface meshes")
    p.add_argument("--max-radius", type=int, default=16,
                   help="largest ball radius of the local thickness, voxels (default 16; sets the halo 2R)")
    p.add_argument("--block", type=int, help="block edge in voxels (default: the chunks, at least 128)")
    p.add_argument("--device", default="cpu", help="torch device for the structure tensor (cpu, cuda, cuda:N)")
    p.add_argument("--report", type=Path, metavar="QC_DIR",
                   help="add an Analysis section to the QC report in this folder (default: SEG/qc when it "
                        "holds a qc.json)")
    p.add_argument("--no-report", action="store_true", help="leave the QC report as it is")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(handler=_analyse)


def _analyse(args: argparse.Namespace) -> int:
    from pipeline.analyse import analyse
    from pipeline.core.errors import ConfigError, InputError
    from pipeline.qc.run import refresh_report

    if args.report is not None and args.no_report:
        raise ConfigError("give --report QC_DIR or --no-report, not both")
    if args.report is not None and not (args.report / "qc.json").is_file():
        raise InputError(f"{args.report}: holds no qc.json; run 'studios qc {args.segmentation}' first "
                         "or leave out --report")
    if args.sigma <= 0 or args.rho <= 0 or args.mesh_sigma < 0 or args.max_radius < 1:
        raise ConfigError("--sigma and --rho must be > 0, --mesh-sigma >= 0 and --max-radius >= 1")
    res = analyse(
        args.segmentation, args.out, classes=args.classes, fibre=args.fibre, pore=args.pore, sigma=args.sigma,
        rho=args.rho, mesh_sigma=args.mesh_sigma, meshes=not args.no_meshes, orientation_field=args.orientation_field,
        max_radius=args.max_radius, block=args.block, device=args.device, overwrite=args.overwrite,
    )
    d = res.data
    print(f"analysis of {args.segmentation}: {d['objects']['count']} objects")
    phases = d["phases"]["classes"].items()
    print("  phases:      " + ", ".join(f"{n} {100 * (c['fraction'] or 0):.2f}%" for n, c in phases))
    if d["orientation"]:
        o = d["orientation"]
        print(f"  orientation: {o['class']}, main direction (z, y, x) {o['main_direction']}, "
              f"tensor eigenvalues {o['eigenvalues']}")
    if d["pores"]:
        lt = d["pores"]["local_thickness"]
        print(f"  pores:       {d['pores']['class']}, mean local thickness {lt['mean']} voxels")
    print(f"  analysis:    {res.json_path}")
    qc_dir = args.report if args.report is not None else args.segmentation / "qc"
    if not args.no_report and (qc_dir / "qc.json").is_file():
        print(f"  report:      {refresh_report(qc_dir, res.json_path)} (Analysis section)")
    return 0
