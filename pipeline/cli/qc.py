"""``studios qc``: quality control of a segmentation (qc.json + report.html)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli.main import command


@command("qc")
def _qc_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "qc", help="check a segmentation: qc.json and a self-contained report.html",
        description="Quality control of a segmentation: class fractions and profiles, intensity per class, "
        "confidence, connected components (merged across blocks), a seam check that recomputes blocks on a "
        "shifted grid, run facts, and metrics against ground truth when given. Writes qc.json (stable keys, "
        "see docs/qc.md) and report.html (opens offline).",
    )
    p.add_argument("segmentation", type=Path, help="the seg.zarr written by 'studios segment'")
    p.add_argument("--scan", type=Path, help="the segmented scan (default: the one recorded in the output)")
    p.add_argument("--truth", type=Path,
                   help="dense ground-truth labels (studios image, .zarr, .npy or TIFF; 0 = ignore, 1..K)")
    p.add_argument("--out", type=Path, help="folder for qc.json and report.html (default SEG/qc)")
    p.add_argument("--classes", nargs="+", metavar="CLASS",
                   help="classes (names or labels) for connected components (default: all but the majority class)")
    p.add_argument("--threshold", type=float, default=0.6,
                   help="confidence threshold: max probability below it counts as uncertain (default 0.6)")
    p.add_argument("--seam-samples", type=int, default=2,
                   help="boxes recomputed by the seam check (default 2, 0 = off)")
    p.add_argument("--seam-box", type=int, default=32, help="edge of a seam-check box in voxels (default 32)")
    p.add_argument("--device", default="cpu", help="device for the seam check (default cpu)")
    p.add_argument("--no-report", action="store_true", help="write qc.json only")
    p.add_argument("--suggest", type=int, default=0, metavar="N",
                   help="also rank N slices where to annotate next (as 'studios suggest', with the output's "
                        "model and its training annotations): qc.json 'suggestions' and a report section")
    p.add_argument("--analysis", type=Path, metavar="PATH",
                   help="analysis.json (or its folder) from 'studios analyse' for the report's Analysis section "
                        "(default: SEG.analysis beside the segmentation, when it analysed this output)")
    p.set_defaults(handler=_qc)


def _qc(args: argparse.Namespace) -> int:
    from pipeline.core.errors import ConfigError
    from pipeline.core.progress import TerminalReporter
    from pipeline.qc.run import run_qc

    if args.seam_samples < 0 or args.seam_box < 1 or args.suggest < 0:
        raise ConfigError("--seam-samples and --suggest must be >= 0 and --seam-box >= 1")
    result = run_qc(
        args.segmentation, scan=args.scan, truth=args.truth, out_dir=args.out, component_classes=args.classes,
        analysis=args.analysis, suggest=args.suggest,
        seam_samples=args.seam_samples, seam_box=args.seam_box, confidence_threshold=args.threshold,
        device=args.device, report=not args.no_report, reporter=TerminalReporter(),
    )
    data = result.data
    seam = data["seam_check"]
    head = "QC of an INCOMPLETE segmentation" if not result.complete else "QC of a complete segmentation"
    print(f"{head}: {args.segmentation}")
    fractions = ", ".join(f"{c['name']} {100 * (c['fraction'] or 0):.1f}%" for c in data["classes"])
    print(f"  classes:    {fractions}")
    print(f"  seam check: {seam['status']}" + (f" ({seam['reason']})" if seam["reason"] else
                                              f", {seam['label_differences']} label differences"))
    if data["truth"]:
        print(f"  truth:      mean IoU {data['truth']['mean_iou']:.4f}, kappa {data['truth']['kappa']:.4f}"
              if data["truth"]["mean_iou"] is not None and data["truth"]["kappa"] is not None
              else "  truth:      no overlapping labelled voxels")
    for w in result.warnings:
        print(f"  warning:    {w}")
    print(f"  qc.json:    {result.json_path}")
    if result.report_path:
        print(f"  report:     {result.report_path}")
    return 0
