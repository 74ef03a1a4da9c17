"""Train a stride-free model from sparse annotations and write a model bundle.

The stride-free trick: a model with halo ``h`` computes an output voxel from the input within
``h`` of it, so training computes outputs only where labels are. For a labelled plane (a slice
along z, y or x) an output patch is one voxel thick, ``1 x P x P``, and needs an input only
``(1 + 2h) x (P + 2h) x (P + 2h)``; every computed output is on the labelled plane::

        input  (1 + 2h) thick               output 1 thick, on the annotated slice
    +---------------------------+
    |   h   context             |
    |===========================|  <- labelled plane: P x P outputs, masked loss
    |   h   context             |
    +---------------------------+

Inputs are read from the scan with the inference border rule (edge replication where the read
crosses the volume border, see :mod:`pipeline.segment.predict`) and normalised with the bundle's
global affine map of the scan statistics, so training sees exactly what inference will.

Recipe (modules of :mod:`pipeline.train`):

* :mod:`~pipeline.train.sampling`: class-balanced patch centres (a class, then one of its
  labelled voxels, then a jittered window around it); augmentations valid for tomograms (flips
  on every axis, 90 degree rotations about z, the tomographic axis; small intensity scale/offset
  and Gaussian noise), identical for input and labels; masked cross-entropy on labelled voxels;
* :mod:`~pipeline.train.validation`: whole strokes (connected components per class) held out,
  at most 20 % of each class's labelled voxels, none for a class with fewer than 3 strokes;
* :mod:`~pipeline.train.fit`: Adam (:mod:`~pipeline.train.optim`), learning rate halved when
  validation stalls, early stopping, best weights, then training continues on ALL labels;
* :mod:`~pipeline.train.teacher`: for sparse annotations (scribbles: labelled voxels under half of
  the labelled planes' area), a random forest on fixed filter features, fitted on the training
  strokes, pseudo-labels every unlabelled voxel of the labelled planes; the network learns from
  strokes and pseudo-labels (``teacher="auto"``, the default; off for full slices);
* :mod:`~pipeline.train.priors`: the unlabelled voxels give the scan's class priors (EM on the
  model's posteriors), folded into the output bias (``prior_shift="auto"``, the default: for
  sparse annotations only);
* :mod:`~pipeline.train.unlabelled`: optional losses on unlabelled voxels (confident
  pseudo-labels under random symmetries, or entropy minimisation); off by default
  (``unlabelled="none"``): they did not win by measurement on scribbles.

Reproducibility: the same seed, inputs and ``epochs`` (no ``minutes``) give the same weights on
the same machine, thread count and torch build. A wall-clock budget (``minutes``) stops after a
machine-dependent number of steps.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import __version__
from pipeline.core.errors import ConfigError, InputError, OutputExistsError
from pipeline.core.normalize import Normalization
from pipeline.core.progress import NullReporter, Reporter
from pipeline.io.bundle import from_model, save_bundle
from pipeline.io.store import open_image
from pipeline.models import DEFAULT_ARCH, build_model
from pipeline.segment.predict import resolve_device
from pipeline.train.annotations import AXES, Annotations, load_annotations
from pipeline.train.fit import FINAL_SHARE, Fit
from pipeline.train.optim import Adam
from pipeline.train.priors import MODES as PRIOR_MODES
from pipeline.train.priors import shift_priors, use_prior_shift
from pipeline.train.sampling import Sampler, patch_size, read_plane
from pipeline.train.teacher import DEFAULT_MODE as DEFAULT_TEACHER
from pipeline.train.teacher import KEEP as TEACHER_KEEP
from pipeline.train.teacher import MODES as TEACHERS
from pipeline.train.teacher import WEIGHT as TEACHER_WEIGHT
from pipeline.train.teacher import labelled_fraction, pseudo_labels, use_teacher
from pipeline.train.unlabelled import DEFAULT_MODE, MODES, POOL, UnlabelledPool
from pipeline.train.validation import MAX_FRACTION, MIN_STROKES, split_strokes

logger = logging.getLogger(__name__)

DEFAULT_MINUTES = 5.0
DEFAULT_NORMALIZATION = "zscore"  # zero-centred input: ~2x lower loss than percentile 0..1 at equal steps
DEFAULT_BATCH = 4
DEFAULT_PATCH = 48
DEFAULT_PATIENCE = 12  # 6 stopped 3 full slices at epoch 14 from best epoch 8: 0.939; 12: 0.956 (docs/accuracy.md)
DEFAULT_LR = 3e-3
STEPS_PER_EPOCH = 50
DEFAULT_VAL_FRACTION = MAX_FRACTION
PRIOR_RESERVE_S = 15.0  # seconds of a time budget kept for the class-prior estimate
PRIOR_SLABS = 24  # unlabelled slabs for the class-prior estimate when no unlabelled loss needs more


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` made.

    Attributes:
        bundle_path: the bundle folder written.
        metrics: validation metrics of the kept weights (``val_accuracy``, ``val_mean_iou``,
            ``val_iou`` per class name, ``val_loss``, ``val_voxels``) and the training summary
            (``train_voxels``, ``loss_first``, ``loss_last``, ``loss_curve`` per epoch,
            ``best_epoch``, ``stopped``: "epochs", "time" or "early-stopping").
        seconds: wall-clock training time.
        epochs: epochs run. steps: optimiser steps run.
    """

    bundle_path: Path
    metrics: dict[str, Any]
    seconds: float
    epochs: int
    steps: int
    classes: tuple[str, ...] = ()
    halo: int = 0
    provenance: dict[str, Any] = field(default_factory=dict, repr=False)


def train(
    scan: str | os.PathLike[str],
    annotations: Annotations | str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    arch: str = DEFAULT_ARCH,
    params: Mapping[str, Any] | None = None,
    classes: Sequence[str] | None = None,
    minutes: float | None = None,
    epochs: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    batch_size: int = DEFAULT_BATCH,
    patch: int = DEFAULT_PATCH,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    patience: int = DEFAULT_PATIENCE,
    lr: float = DEFAULT_LR,
    normalization: Normalization | None = None,
    steps_per_epoch: int = STEPS_PER_EPOCH,
    threads: int | None = None,
    reporter: Reporter | None = None,
    overwrite: bool = False,
    unlabelled: str = DEFAULT_MODE,
    prior_shift: bool | str = "auto",
    teacher: str = DEFAULT_TEACHER,
    teacher_weight: float = TEACHER_WEIGHT,
    teacher_keep: float = TEACHER_KEEP,
) -> TrainResult:
    """Train ``arch`` on ``annotations`` of ``scan`` and save the bundle to ``output_dir``.

    Args:
        scan: an ingested scan (``studios ingest``); its global statistics normalise the input.
        annotations: validated :class:`Annotations` or a path for :func:`load_annotations`.
        output_dir: bundle folder to create (refused if it holds a model, unless ``overwrite``).
        arch, params: registered architecture and its parameters (``classes``/``in_channels``
            are set from the data).
        classes: class names for labels 1..K (default ``class1``..``classK``).
        minutes: wall-clock budget; epochs: number of epochs. Training stops at whichever
            comes first, or early; with neither, the budget is ``DEFAULT_MINUTES``.
        seed: seeds weights, sampling, augmentation and the validation split.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        batch_size, patch: patches per step and output patch edge ``P`` (in-plane).
        val_fraction: share of each class's labelled voxels held out as whole strokes, in
            ``[0, 0.9]``; capped at ``MAX_FRACTION`` (0.2). 0 turns validation off.
        patience: epochs without validation improvement before stopping.
        normalization: how the bundle scales the scan (default: z-score with the scan's global
            mean and standard deviation).
        threads: torch CPU threads (default :func:`default_threads`: the CPUs this process may
            use, less the current load). Weights are reproducible for a fixed thread count.
        reporter: progress (steps, or seconds of the ``minutes`` budget); if it also has a
            ``metrics(dict)`` method it receives ``loss``/``acc`` every step and
            ``val acc``/``val mIoU`` every epoch.
        unlabelled: how the unlabelled voxels are used, one of
            :data:`pipeline.train.unlabelled.MODES` (``pseudo``: confident pseudo-labels on
            unlabelled slabs under random symmetries; ``windows``: the same on the training
            windows; ``entropy``; ``none``, the default).
        prior_shift: ``"on"``/True: after training, estimate the scan's class priors on unlabelled
            slabs (EM) and fold the correction into the output bias (:mod:`pipeline.train.priors`);
            ``"off"``/False: keep the training priors; ``"auto"`` (default): on for sparse
            annotations (scribbles), off for full slices, whose class mix is the scan's.
        teacher: ``auto`` (forest pseudo-labels when the annotations are sparse), ``forest``
            (always) or ``off`` (:mod:`pipeline.train.teacher`); teacher_weight: weight of the
            pseudo-label loss against the labelled loss (>= 0); teacher_keep: share of each
            class's pseudo-labelled voxels kept, most confident first, in (0, 1].

    Returns:
        :class:`TrainResult`.
    """
    t_start, cpu_start = time.perf_counter(), time.process_time()
    started = _now()
    reporter = reporter or NullReporter()
    out = Path(output_dir)
    _check_options(minutes=minutes, epochs=epochs, batch_size=batch_size, patch=patch,
                   val_fraction=val_fraction, patience=patience, lr=lr, steps_per_epoch=steps_per_epoch,
                   unlabelled=unlabelled, teacher=teacher, teacher_weight=teacher_weight, teacher_keep=teacher_keep,
                   prior_shift=prior_shift)
    image = open_image(scan, kind="scan")
    shape = tuple(int(s) for s in image.shape)
    if len(shape) != 3:
        raise InputError(f"{scan}: has shape {shape}; training needs a (z, y, x) scan")
    if isinstance(annotations, Annotations):
        ann = annotations
        if ann.shape != shape:
            raise InputError(f"{ann.source}: annotations are for shape {ann.shape} but the scan is {shape}; "
                             "annotate the scan you train on")
    else:
        ann = load_annotations(annotations, shape, classes=len(classes) if classes else None)
    names = _class_names(classes, ann)
    if (out / "model.json").exists() and not overwrite:
        raise OutputExistsError(f"{out}: already holds a model; pass --overwrite to replace it")
    if out.resolve() == Path(scan).resolve() or Path(scan).resolve() in out.resolve().parents:
        raise InputError(f"{out}: lies inside the scan {scan}; choose a model folder outside it")
    torch_device = resolve_device(device)
    if minutes is None and epochs is None:
        minutes = DEFAULT_MINUTES
    normalization = normalization or Normalization(method=DEFAULT_NORMALIZATION)
    offset, scale = normalization.affine(image.stats)
    rng = np.random.default_rng(seed)

    with _torch_settings(threads, torch_device) as n_threads:
        torch.manual_seed(seed)
        p = {**dict(params or {}), "classes": len(names), "in_channels": 1}
        model = build_model(arch, p).to(torch_device)
        h = model.halo
        size = patch_size(patch, shape, ann)
        planes = [read_plane(image.array, shape, pl.axis, pl.index, pl.labels, h, size) for pl in ann.planes]
        split = split_strokes(planes, val_fraction, rng, len(names), size)
        teach = use_teacher(teacher, ann)
        shift = use_prior_shift(prior_shift, ann)
        taught = (pseudo_labels(image.array, shape, planes, len(names), offset=offset, scale=scale, seed=seed,
                                threads=n_threads, keep=teacher_keep) if teach else {"teacher": "off"})
        sampler = Sampler(planes, len(names), size, rng)
        n_val = int(sum(split["held"]))
        logger.info("training %s (halo %d, %d parameters) on %d planes: %d training, %d validation voxels "
                    "(%s strokes held out per class)", arch, h, model.n_parameters(), len(planes), sampler.n_train,
                    n_val, split["held_strokes"])
        axes = sorted({pl.axis for pl in ann.planes})
        pool = None
        if unlabelled in ("pseudo", "entropy") or shift:
            pool = UnlabelledPool(image.array, shape, axes, h, size, rng,
                                  n=POOL if unlabelled in ("pseudo", "entropy") else PRIOR_SLABS)
        fit = Fit(model, planes, sampler, offset=offset, scale=scale, device=torch_device, lr=lr,
                  batch_size=batch_size, rng=rng, classes=len(names), unlabelled=unlabelled, pool=pool,
                  warmup=steps_per_epoch, pseudo_weight=teacher_weight if teach else 0.0)

        def on_all_labels() -> Sampler:
            for q in planes:
                q.merge_validation()
            return Sampler(planes, len(names), size, rng)

        if minutes is not None:
            deadline = t_start + minutes * 60.0 - (min(PRIOR_RESERVE_S, 5.0 * minutes) if shift else 0.0)
        else:
            deadline = math.inf
        history = fit.run(start=t_start, deadline=deadline, epochs=epochs, steps_per_epoch=steps_per_epoch,
                          patience=patience, reporter=reporter, names=names, on_all_labels=on_all_labels)
        model.load_state_dict(fit.best_state)
        priors = (shift_priors(model, pool, fit.class_counts, offset=offset, scale=scale, device=torch_device)
                  if shift and pool is not None else {})
        model = model.cpu().eval()
    seconds = time.perf_counter() - t_start
    metrics = {**history, "train_voxels": sampler.n_train, "final_voxels": fit.sampler.n_train,
               "val_held": {name: split["held"][k] for k, name in enumerate(names)},
               "val_strokes": {name: split["held_strokes"][k] for k, name in enumerate(names)}, **priors,
               "labelled_fraction": round(labelled_fraction(ann), 5), **taught}
    provenance = {
        "kind": "trained",
        "scan": str(Path(scan).resolve()),
        "scan_shape": list(shape),
        "annotations": ann.to_json(),
        "class_counts": {name: ann.counts[k] if k < len(ann.counts) else 0 for k, name in enumerate(names)},
        "seed": seed,
        "started": started,
        "finished": _now(),
        "seconds": round(seconds, 2),
        "cpu_seconds": round(time.process_time() - cpu_start, 2),
        "arch": model.arch,
        "params": model.params(),
        "parameters": model.n_parameters(),
        "flops_per_voxel": model.flops_per_voxel(),
        "device": str(torch_device),
        "threads": n_threads,
        "recipe": {"batch_size": batch_size, "patch": size, "lr": lr, "val_fraction": val_fraction,
                   "patience": patience, "steps_per_epoch": steps_per_epoch, "minutes": minutes, "epochs": epochs,
                   "val_split": "strokes", "val_max_fraction": MAX_FRACTION, "val_min_strokes": MIN_STROKES,
                   "final_share": FINAL_SHARE, "unlabelled": unlabelled, "prior_shift": shift,
                   "teacher": teacher, "teacher_weight": teacher_weight, "teacher_keep": teacher_keep},
        "metrics": metrics,
        "studios_version": __version__,
        "torch_version": torch.__version__,
    }
    bundle = from_model(model, classes=names, normalization=normalization, provenance=provenance)
    path = save_bundle(bundle, out, overwrite=overwrite)
    return TrainResult(bundle_path=path, metrics=metrics, seconds=seconds, epochs=fit.epochs,
                       steps=fit.steps,
                       classes=names, halo=model.halo, provenance=provenance)


# --------------------------------------------------------------------------- setup


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _check_options(**opts: Any) -> None:
    minutes, epochs = opts["minutes"], opts["epochs"]
    if minutes is not None and not (math.isfinite(minutes) and minutes > 0):
        raise ConfigError(f"--minutes {minutes} must be a positive number")
    if epochs is not None and int(epochs) < 1:
        raise ConfigError(f"--epochs {epochs} must be at least 1")
    for key in ("batch_size", "patience", "steps_per_epoch"):
        if int(opts[key]) < 1:
            raise ConfigError(f"{key} {opts[key]} must be at least 1")
    if int(opts["patch"]) < 4:
        raise ConfigError(f"patch {opts['patch']} must be at least 4")
    if not 0.0 <= float(opts["val_fraction"]) <= 0.9:
        raise ConfigError(f"val_fraction {opts['val_fraction']} must lie in [0, 0.9]")
    if not opts["lr"] > 0:
        raise ConfigError(f"lr {opts['lr']} must be positive")
    if opts["unlabelled"] not in MODES:
        raise ConfigError(f"unlabelled {opts['unlabelled']!r} must be one of {', '.join(MODES)}")
    if not isinstance(opts["prior_shift"], bool) and opts["prior_shift"] not in PRIOR_MODES:
        raise ConfigError(f"prior shift {opts['prior_shift']!r} must be one of {', '.join(PRIOR_MODES)}")
    if opts["teacher"] not in TEACHERS:
        raise ConfigError(f"teacher {opts['teacher']!r} must be one of {', '.join(TEACHERS)}")
    if not (math.isfinite(float(opts["teacher_weight"])) and float(opts["teacher_weight"]) >= 0):
        raise ConfigError(f"teacher weight {opts['teacher_weight']} must be a number >= 0")
    if not 0.0 < float(opts["teacher_keep"]) <= 1.0:
        raise ConfigError(f"teacher keep {opts['teacher_keep']} must lie in (0, 1]")


def _class_names(classes: Sequence[str] | None, ann: Annotations) -> tuple[str, ...]:
    if classes is None:
        return tuple(f"class{k}" for k in range(1, ann.n_classes + 1))
    names = tuple(str(c) for c in classes)
    if len(set(names)) != len(names) or any(not n for n in names):
        raise ConfigError(f"class names {list(names)} must be distinct and non-empty")
    if ann.n_classes > len(names):
        raise InputError(f"{ann.source}: labels go up to {ann.n_classes} but only {len(names)} class names are given; "
                         f"name {ann.n_classes} classes")
    if len(names) < 2:
        raise ConfigError("at least 2 classes are needed to train a segmentation model")
    for k in range(ann.n_classes + 1, len(names) + 1):
        logger.warning("%s: class %d (%s) has no labelled voxel; the model cannot learn it",
                       ann.source, k, names[k - 1])
    return names


def default_threads() -> int:
    """CPUs this process may use, less those other processes keep busy now. At least 1.

    Oversubscribed OpenMP threads spin-wait: on a 2-core machine with a load of 5, two training
    threads ran 3-5x slower per step than one. "Now" is a quarter-second sample of
    ``/proc/stat`` (:func:`~pipeline.compute.hosts.busy_cpus`): the 1-minute load average,
    used before, still counted a job that had ended seconds earlier, so a training started
    right after another one ran on 1 of 2 idle cores. The load average is the fallback.
    """
    from pipeline.compute.hosts import busy_cpus, cpu_count

    n = cpu_count()
    measured = busy_cpus()
    if measured is not None:
        busy = int(measured + 0.5)
    else:
        try:
            busy = int(os.getloadavg()[0])
        except (AttributeError, OSError):  # pragma: no cover - platforms without getloadavg
            busy = 0
    return max(1, min(n, n - busy))


@contextlib.contextmanager
def _torch_settings(threads: int | None, device: torch.device) -> Iterator[int]:
    """Thread count (restored afterwards) and deterministic cuDNN on CUDA."""
    saved = torch.get_num_threads()
    saved_cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    n = int(threads) if threads else default_threads()
    try:
        torch.set_num_threads(max(1, n))
        if device.type == "cuda":
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        yield n
    finally:
        torch.set_num_threads(saved)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved_cudnn


__all__ = ["AXES", "DEFAULT_ARCH", "Adam", "TrainResult", "default_threads", "train"]
