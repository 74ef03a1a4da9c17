"""The embedded demo: a real bundled tomogram through the whole pipeline.

Steps: ingest the bundled cement CT (128^3, uint8) into OME-Zarr, train the default model from
scribbles on three slices (``cement_scribbles_z*.png``),
segment blockwise on a local Dask cluster (64^3 blocks, so the stitching is exercised), check
that the result equals a whole-volume pass, and write a short summary. Needs only this
project (the data ships inside the package).
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path

import numpy as np

from pipeline.compute.cluster import ClusterSpec
from pipeline.core.progress import TerminalReporter
from pipeline.ingest.run import ingest
from pipeline.io.bundle import load_bundle
from pipeline.io.store import open_image
from pipeline.segment.predict import predict_volume, to_labels
from pipeline.segment.run import segment
from pipeline.train.loop import train

logger = logging.getLogger(__name__)

DEMO_FILE = "cement_128x128x128.tif"


def bundled_scan() -> Path:
    """Path of the bundled real tomogram."""
    return Path(str(resources.files("pipeline") / "data" / DEMO_FILE))


def bundled_scribbles() -> Path:
    """YAML listing of the bundled scribble annotations (three z-slices, 1 = void, 2 = cement)."""
    return Path(str(resources.files("pipeline") / "data" / "cement_scribbles.yaml"))


def run_demo(output: Path, *, workers: int = 1, epochs: int = 3) -> str:
    """Run the demo into ``output`` (replacing earlier demo results); return the summary text."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    scan = output / "scan.zarr"
    seg = output / "seg.zarr"
    model_dir = output / "model"
    ingest(bundled_scan(), scan, overwrite=True, voxel_size=(1.0, 1.0, 1.0), reporter=TerminalReporter())
    trained = train(
        scan, bundled_scribbles(), model_dir, classes=("void", "cement"), epochs=epochs, seed=0,
        overwrite=True, reporter=TerminalReporter(),
    )
    bundle = load_bundle(trained.bundle_path)
    result = segment(
        scan, model_dir, seg, block=64, cluster=ClusterSpec(kind="local", workers=workers),
        probabilities=True, overwrite=True, reporter=TerminalReporter(),
    )
    image = open_image(scan)
    volume = np.asarray(image.array[...])
    offset, scale = bundle.normalization.affine(image.stats)
    reference = to_labels(predict_volume(bundle.build(), volume, offset=offset, scale=scale))
    blockwise = np.asarray(open_image(seg, kind="segmentation").array[...])
    mismatches = int((reference != blockwise).sum())
    summary = {
        "scan": str(scan),
        "segmentation": str(seg),
        "model": str(model_dir),
        "shape": list(result.shape),
        "blocks": result.blocks_total,
        "seconds": round(result.seconds, 2),
        "voxels_per_second": round(result.voxels_per_second),
        "class_fractions": {k: round(v, 4) for k, v in result.class_fractions.items()},
        "labels_differing_from_whole_volume_pass": mismatches,
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        "studios demo finished",
        f"  scan:          {scan}",
        f"  segmentation:  {seg}  ({result.blocks_total} blocks of 64^3, {result.seconds:.1f}s)",
        f"  model:         {model_dir}  (trained {trained.seconds:.0f}s, validation "
        f"mean IoU {trained.metrics.get('val_mean_iou', float('nan')):.3f})",
        "  classes:       " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in result.class_fractions.items()),
        f"  blockwise vs whole-volume labels differing: {mismatches}",
        f"  summary:       {output / 'summary.json'}",
        f"  QC report:     {result.qc}",
    ]
    return "\n".join(lines)
