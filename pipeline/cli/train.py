"""``studios train``: learn a model from a few annotated slices (plugin of :mod:`pipeline.cli.main`).

::

    studios train SCAN.zarr ANNOTATIONS MODEL_DIR [options]
    studios train SCAN.zarr MODEL_DIR --slice z:21:z021.png --slice z:64:z064.png [options]

ANNOTATIONS is a label volume of the scan's shape (``.npy``, ``.tif``, ``.zarr``, napari labels,
OME-Zarr labels; 0 = unlabelled, 1..K = classes), an ilastik project (``.ilp``) or a YAML listing
of slice images; ``--slice AXIS:INDEX:FILE`` adds 2D slice
images (palette or greyscale PNG/TIFF). See :mod:`pipeline.train.annotations`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.cli.main import command
from pipeline.core.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.train.loop import TrainResult

USAGE = "studios train [options] SCAN [ANNOTATIONS] MODEL_DIR [--slice AXIS:INDEX:FILE ...]"


@command("train")
def _train_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from pipeline.train.loop import (
        DEFAULT_BATCH,
        DEFAULT_MINUTES,
        DEFAULT_PATCH,
        DEFAULT_PATIENCE,
        DEFAULT_VAL_FRACTION,
        STEPS_PER_EPOCH,
    )
    from pipeline.train.priors import MODES as PRIOR_MODES
    from pipeline.train.teacher import DEFAULT_MODE as DEFAULT_TEACHER
    from pipeline.train.teacher import KEEP, SPARSE_FRACTION, WEIGHT
    from pipeline.train.teacher import MODES as TEACHERS
    from pipeline.train.unlabelled import DEFAULT_MODE, MODES

    p = sub.add_parser(
        "train", usage=USAGE, help="train a model from a few annotated slices",
        description="Train a stride-free model on sparse annotations of an ingested scan and write a model "
        "bundle with its training provenance and validation metrics. Annotations: a label volume of the "
        "scan's shape (.npy, .tif, .zarr, napari labels; 0 = unlabelled, 1..K = classes), an ilastik project "
        "(.ilp: brush strokes and class names), a YAML listing "
        "('slices: [{axis: z, index: 64, file: a.png}, ...]'), and/or --slice AXIS:INDEX:FILE images.",
    )
    p.add_argument("scan", type=Path, metavar="SCAN", help="an ingested scan (.zarr)")
    p.add_argument("paths", nargs="+", metavar="[ANNOTATIONS] MODEL_DIR",
                   help="annotations (label volume or YAML slice listing; omit when using --slice) and the "
                   "bundle folder to create")
    p.add_argument("--slice", dest="slices", action="append", default=[], metavar="AXIS:INDEX:FILE",
                   help="a 2D label image of one slice, e.g. z:64:labels_z64.png (axis z, y or x; repeatable)")
    p.add_argument("--arch", default=None, help="architecture (see 'studios model list'; default dilated_resnet)")
    p.add_argument("--params", default="{}", help='architecture parameters as JSON, e.g. \'{"channels": 8}\'')
    p.add_argument("--classes", nargs="+", metavar="NAME", help="class names for labels 1..K (default class1..classK)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help=f"wall-clock training budget (default {DEFAULT_MINUTES:g})")
    budget.add_argument("--epochs", type=int,
                        help="epochs of --steps-per-epoch steps to train (reproducible with --seed and --threads)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, sampling and the validation split")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help=f"patches per step (default {DEFAULT_BATCH})")
    p.add_argument("--patch", type=int, default=DEFAULT_PATCH, help=f"output patch edge (default {DEFAULT_PATCH})")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                   help="share of each class's labelled voxels held out for validation as whole strokes, at most "
                   f"0.2 (default {DEFAULT_VAL_FRACTION:g}; none for a class with fewer than 3 strokes; 0 turns "
                   "validation off); after early stopping, training continues on all labels")
    p.add_argument("--prior-shift", choices=PRIOR_MODES, default="auto",
                   help="after training, estimate the scan's class priors on unlabelled voxels (EM) and fold them "
                   "into the output bias: on, off, or auto (default: on for sparse annotations such as "
                   "scribbles, off for full slices, whose class mix is already the scan's)")
    p.add_argument("--no-prior-shift", dest="prior_shift", action="store_const", const="off",
                   help="the same as --prior-shift off")
    p.add_argument("--unlabelled", choices=MODES, default=DEFAULT_MODE,
                   help=f"use of the unlabelled voxels (default {DEFAULT_MODE}): pseudo: confident pseudo-labels on "
                   "unlabelled slabs under random flips/rotations; windows: the same on the training windows; "
                   "entropy: entropy minimisation; none: labelled voxels only")
    p.add_argument("--teacher", choices=TEACHERS, default=DEFAULT_TEACHER,
                   help=f"dense pseudo-labels for sparse annotations (default {DEFAULT_TEACHER}): forest: a random "
                   "forest on filter features, fitted on the strokes, labels the unlabelled voxels of the labelled "
                   "planes (its argmax; the most confident --teacher-keep share of each class kept) and the network "
                   f"learns from strokes and pseudo-labels; auto: forest when labelled voxels cover less than "
                   f"{SPARSE_FRACTION:g} of the labelled planes (scribbles), else off; off: labelled voxels only")
    p.add_argument("--teacher-weight", type=float, default=WEIGHT,
                   help=f"weight of the pseudo-label loss against the labelled loss (default {WEIGHT:g})")
    p.add_argument("--teacher-keep", type=float, default=KEEP,
                   help=f"share of each class's pseudo-labelled voxels kept, most confident first, in (0, 1] "
                   f"(default {KEEP:g})")
    p.add_argument("--patience", type=int, default=DEFAULT_PATIENCE,
                   help=f"epochs without validation improvement before stopping (default {DEFAULT_PATIENCE})")
    p.add_argument("--steps-per-epoch", type=int, default=STEPS_PER_EPOCH,
                   help=f"optimiser steps between validations (default {STEPS_PER_EPOCH})")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (default: the CPUs this process may use, less those other processes "
                   "keep busy now)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle in MODEL_DIR")
    p.set_defaults(handler=_train)


class TrainingBar:
    """A tqdm bar for training: steps (or seconds of the budget) with loss/accuracy in the postfix."""

    def __init__(self, *, unit: str = "step", disable: bool | None = None) -> None:
        self._unit = unit
        self._disable = (not sys.stderr.isatty()) if disable is None else disable
        self._bar: Any = None
        self._values: dict[str, float] = {}
        self._voxels = 0
        self._t0 = 0.0

    def start(self, stage: str, total: int) -> None:
        from tqdm import tqdm

        self._t0, self._voxels = time.perf_counter(), 0
        self._bar = tqdm(total=total, desc=stage, unit=self._unit, disable=self._disable, file=sys.stderr)

    def metrics(self, values: dict[str, Any]) -> None:
        self._values.update({k: float(v) for k, v in values.items() if isinstance(v, int | float)})

    def advance(self, n: int = 1, *, voxels: int = 0) -> None:
        if self._bar is None:
            return
        self._voxels += voxels
        rate = self._voxels / max(time.perf_counter() - self._t0, 1e-9)
        parts = [f"{k} {v:.3f}" for k, v in self._values.items()]
        self._bar.set_postfix_str(", ".join([*parts, f"{rate / 1e3:.1f} kvox/s"]), refresh=False)
        self._bar.update(n)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _train(args: argparse.Namespace) -> int:
    from pipeline.io.store import open_image
    from pipeline.models import DEFAULT_ARCH
    from pipeline.train.annotations import load_annotations, parse_slice_spec
    from pipeline.train.loop import train

    if len(args.paths) == 2:
        source, model_dir = Path(args.paths[0]), Path(args.paths[1])
    elif len(args.paths) == 1 and args.slices:
        source, model_dir = None, Path(args.paths[0])
    elif len(args.paths) == 1:
        raise ConfigError("give ANNOTATIONS before MODEL_DIR, or slice images with --slice AXIS:INDEX:FILE")
    else:
        raise ConfigError(f"too many paths {[str(p) for p in args.paths]}; usage: {USAGE}")
    try:
        params = json.loads(args.params)
    except ValueError as exc:
        raise ConfigError(f"--params is not valid JSON ({exc}); e.g. '{{\"channels\": 8}}'") from None
    if not isinstance(params, dict):
        raise ConfigError("--params must be a JSON object, e.g. '{\"channels\": 8}'")
    slices = [parse_slice_spec(s) for s in args.slices]
    image = open_image(args.scan, kind="scan")
    annotations = load_annotations(source, image.shape, slices=slices,
                                   classes=len(args.classes) if args.classes else None)
    r = train(
        args.scan, annotations, model_dir, arch=args.arch or DEFAULT_ARCH, params=params,
        classes=args.classes or (list(annotations.names) or None),
        minutes=args.minutes, epochs=args.epochs, seed=args.seed, device=args.device, batch_size=args.batch_size,
        patch=args.patch, val_fraction=args.val_fraction, patience=args.patience, steps_per_epoch=args.steps_per_epoch,
        threads=args.threads, overwrite=args.overwrite, unlabelled=args.unlabelled,
        prior_shift=args.prior_shift, teacher=args.teacher, teacher_weight=args.teacher_weight,
        teacher_keep=args.teacher_keep, reporter=TrainingBar(unit="step" if args.epochs else "s"),
    )
    print(summary_line(r))
    return 0


def summary_line(r: TrainResult) -> str:
    """One line: where, what, how long, validation metrics."""
    m, prov = r.metrics, r.provenance
    epochs = f"{r.epochs} epoch{'s' * (r.epochs != 1)}"
    validated = r.steps - int(m.get("final_steps") or 0)
    head = (f"wrote {r.bundle_path}: {prov.get('arch')} (halo {r.halo}, {prov.get('parameters')} parameters), "
            f"{len(r.classes)} classes, {epochs} / {validated} steps in {r.seconds:.1f}s "
            f"({m.get('stopped')})")
    if m.get("final_steps"):
        head += f", then {m['final_steps']} steps on all {m.get('final_voxels')} labelled voxels"
    if m.get("pseudo_voxels"):
        head += "; pseudo-labels from the forest teacher: " + " / ".join(str(v) for v in m["pseudo_voxels"])
    if m.get("prior_shift"):
        head += "; scan class priors " + " / ".join(f"{v:.3f}" for v in m["prior_scan"]) + " (unlabelled voxels, EM)"
    if "val_accuracy" not in m:
        return f"{head}; no validation (fewer than 3 strokes per class or --val-fraction 0)"
    ious = ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} n/a" for k, v in m["val_iou"].items())
    strokes = sum((m.get("val_strokes") or {}).values())
    return (f"{head}; validation on {m['val_voxels']} held-out voxels ({strokes} strokes): accuracy "
            f"{m['val_accuracy']:.3f}, mean IoU {m['val_mean_iou']:.3f} ({ious})")

