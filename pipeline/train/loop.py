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

Recipe: class-balanced patch centres (a class, then one of its labelled voxels, then a jittered
window around it); augmentations valid for tomograms (flips on every axis, 90 degree rotations
about z, the tomographic axis; small intensity scale/offset and Gaussian noise), identical for
input and labels; masked cross-entropy on labelled voxels only; Adam; validation on held-out
annotated voxels, split spatially by tiles of ``VAL_TILE`` voxels (whole tiles go to validation,
so held-out voxels are not interleaved with training voxels); the learning rate halves when
validation stalls, training stops early after ``patience`` epochs without improvement, and the
best weights (lowest validation loss) are kept. An *epoch* is ``steps_per_epoch`` optimiser steps
followed by validation.

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
import torch.nn.functional as F

from pipeline import __version__
from pipeline.core import interrupt
from pipeline.core.errors import ConfigError, InputError, OutputExistsError
from pipeline.core.geometry import Box
from pipeline.core.metrics import scores
from pipeline.core.normalize import Normalization, apply_affine
from pipeline.core.progress import NullReporter, Reporter
from pipeline.core.tiling import Block
from pipeline.io.bundle import from_model, save_bundle
from pipeline.io.store import open_image, read_padded
from pipeline.models import DEFAULT_ARCH, StridefreeModel, build_model
from pipeline.segment.predict import resolve_device
from pipeline.train.annotations import AXES, Annotations, load_annotations

logger = logging.getLogger(__name__)

DEFAULT_MINUTES = 5.0
DEFAULT_NORMALIZATION = "zscore"  # zero-centred input: ~2x lower loss than percentile 0..1 at equal steps
DEFAULT_BATCH = 4
DEFAULT_PATCH = 48
DEFAULT_PATIENCE = 6
DEFAULT_LR = 3e-3
STEPS_PER_EPOCH = 50
VAL_TILE = 32
PLATEAU = 3  # epochs without improvement before the learning rate halves
MIN_LR = 1e-5
SAVE_RESERVE_S = 1.0  # seconds kept free at the end of a time budget to write the bundle
AUG_SCALE, AUG_OFFSET, AUG_NOISE = 0.1, 0.05, 0.03  # in normalised units (percentile range = 1)


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


@dataclass
class _Plane:
    """One labelled plane, canonical layout (plane normal first), cropped to its labels.

    ``slab``: (1 + 2h, A + 2h, B + 2h) raw scan values around the region ``A x B`` that starts
    at ``origin`` in plane coordinates. ``train``/``val``: (A, B) int64 class index (label - 1),
    -1 where not used.
    """

    axis: int
    index: int
    origin: tuple[int, int]
    slab: np.ndarray[Any, Any]
    train: np.ndarray[Any, Any]
    val: np.ndarray[Any, Any]
    val_tiles: list[tuple[int, int, int, int]]


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
    val_fraction: float = 0.2,
    patience: int = DEFAULT_PATIENCE,
    lr: float = DEFAULT_LR,
    normalization: Normalization | None = None,
    steps_per_epoch: int = STEPS_PER_EPOCH,
    threads: int | None = None,
    reporter: Reporter | None = None,
    overwrite: bool = False,
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
        val_fraction: share of labelled voxels held out (whole tiles), in ``[0, 0.9]``.
        patience: epochs without validation improvement before stopping.
        normalization: how the bundle scales the scan (default: z-score with the scan's global
            mean and standard deviation).
        threads: torch CPU threads (default :func:`default_threads`: the CPUs this process may
            use, less the current load). Weights are reproducible for a fixed thread count.
        reporter: progress (steps, or seconds of the ``minutes`` budget); if it also has a
            ``metrics(dict)`` method it receives ``loss``/``acc`` every step and
            ``val acc``/``val mIoU`` every epoch.

    Returns:
        :class:`TrainResult`.
    """
    t_start, cpu_start = time.perf_counter(), time.process_time()
    started = _now()
    reporter = reporter or NullReporter()
    out = Path(output_dir)
    _check_options(minutes=minutes, epochs=epochs, batch_size=batch_size, patch=patch,
                   val_fraction=val_fraction, patience=patience, lr=lr, steps_per_epoch=steps_per_epoch)
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
        size = _patch_size(patch, shape, ann)
        planes = [_read_plane(image.array, shape, pl.axis, pl.index, pl.labels, h, size) for pl in ann.planes]
        _split(planes, val_fraction, rng, len(names))
        sampler = _Sampler(planes, len(names), size, rng)
        n_val = sum(int((q.val >= 0).sum()) for q in planes)
        logger.info("training %s (halo %d, %d parameters) on %d planes: %d training, %d validation voxels",
                    arch, h, model.n_parameters(), len(planes), sampler.n_train, n_val)
        loop = _Loop(model, planes, sampler, offset=offset, scale=scale, device=torch_device, lr=lr,
                     batch_size=batch_size, rng=rng, classes=len(names))
        deadline = t_start + minutes * 60.0 if minutes is not None else math.inf
        history = loop.run(start=t_start, deadline=deadline, epochs=epochs, steps_per_epoch=steps_per_epoch,
                           patience=patience, reporter=reporter, names=names)
        model.load_state_dict(loop.best_state)
        model = model.cpu().eval()
    seconds = time.perf_counter() - t_start
    metrics = {**history, "train_voxels": sampler.n_train}
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
                   "val_tile": VAL_TILE},
        "metrics": metrics,
        "studios_version": __version__,
        "torch_version": torch.__version__,
    }
    bundle = from_model(model, classes=names, normalization=normalization, provenance=provenance)
    path = save_bundle(bundle, out, overwrite=overwrite)
    return TrainResult(bundle_path=path, metrics=metrics, seconds=seconds, epochs=loop.epochs, steps=loop.steps,
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


def _patch_size(patch: int, shape: tuple[int, ...], ann: Annotations) -> int:
    dims = [s for pl in ann.planes for a, s in enumerate(shape) if a != pl.axis]
    return max(1, min(int(patch), *dims))


def default_threads() -> int:
    """CPUs this process may use, less those other processes keep busy (1-minute load average).

    Oversubscribed OpenMP threads spin-wait: on a 2-core machine with a load of 5, two training
    threads ran 3-5x slower per step than one. At least 1.
    """
    from pipeline.compute.hosts import cpu_count

    n = cpu_count()
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


def _read_plane(array: Any, shape: tuple[int, ...], axis: int, index: int, labels: np.ndarray[Any, Any],
                h: int, size: int) -> _Plane:
    """Read the scan around one labelled plane (edge-padded like inference), cropped to its labels."""
    dims = [shape[a] for a in range(3) if a != axis]
    rows, cols = np.nonzero(labels)
    lo, hi = [], []
    for coords, n in ((rows, dims[0]), (cols, dims[1])):
        a0, a1 = max(0, int(coords.min()) - size + 1), min(n, int(coords.max()) + size)
        if a1 - a0 < size:  # grow to at least one patch, inside the plane
            a0 = max(0, min(a0, a1 - size))
            a1 = min(n, a0 + size)
        lo.append(a0)
        hi.append(a1)
    offset = [0, 0, 0]
    extent = [0, 0, 0]
    other = [a for a in range(3) if a != axis]
    offset[axis], extent[axis] = index, 1
    for k, a in enumerate(other):
        offset[a], extent[a] = lo[k], hi[k] - lo[k]
    write = Box(tuple(offset), tuple(extent))
    data = read_padded(array, Block(index=(0, 0, 0), write=write, read=write.grow(h)), shape)
    crop = labels[lo[0] : hi[0], lo[1] : hi[1]].astype(np.int64) - 1
    return _Plane(axis=axis, index=index, origin=(lo[0], lo[1]), slab=np.ascontiguousarray(np.moveaxis(data, axis, 0)),
                  train=crop, val=np.full_like(crop, -1), val_tiles=[])


def _split(planes: list[_Plane], fraction: float, rng: np.random.Generator, k: int) -> None:
    """Move whole tiles of labelled voxels to validation until ``fraction`` of them is held out.

    Every class with labels keeps some training voxels; tiles are ``VAL_TILE`` square.
    """
    tiles = []
    for i, pl in enumerate(planes):
        a, b = pl.train.shape
        for u in range(0, a, VAL_TILE):
            for v in range(0, b, VAL_TILE):
                counts = np.bincount(pl.train[u : u + VAL_TILE, v : v + VAL_TILE].ravel() + 1, minlength=k + 1)[1:]
                if counts.any():
                    tiles.append((i, u, v, counts))
    if fraction <= 0 or len(tiles) < 2:
        return
    total = np.sum([t[3] for t in tiles], axis=0)
    order = rng.permutation(len(tiles))
    chosen: list[int] = []
    held = np.zeros(k, dtype=np.int64)
    for j in order:
        if held.sum() >= fraction * total.sum():
            break
        chosen.append(int(j))
        held += tiles[j][3]
    for c in range(k):  # every labelled class keeps training examples
        while total[c] and held[c] >= total[c]:
            j = max(chosen, key=lambda t: tiles[t][3][c])
            chosen.remove(j)
            held -= tiles[j][3]
    for j in chosen:
        i, u, v, _ = tiles[j]
        pl = planes[i]
        window = (slice(u, u + VAL_TILE), slice(v, v + VAL_TILE))
        pl.val[window] = pl.train[window]
        pl.train[window] = -1
        pl.val_tiles.append((u, v, min(VAL_TILE, pl.train.shape[0] - u), min(VAL_TILE, pl.train.shape[1] - v)))


class _Sampler:
    """Class-balanced training windows: class -> labelled voxel -> jittered window around it."""

    def __init__(self, planes: list[_Plane], k: int, size: int, rng: np.random.Generator) -> None:
        self.planes, self.size, self.rng = planes, size, rng
        self.by_class: list[np.ndarray[Any, Any]] = []
        for c in range(k):
            parts = [np.column_stack([np.full(len(rc), i), rc]).astype(np.int32) for i, pl in enumerate(planes)
                     if len(rc := np.argwhere(pl.train == c))]
            self.by_class.append(np.concatenate(parts) if parts else np.zeros((0, 3), np.int32))
        self.present = [c for c in range(k) if len(self.by_class[c])]
        self.n_train = int(sum(len(x) for x in self.by_class))
        if not self.present:
            raise InputError("no labelled voxel is left for training; label more voxels")

    def window(self) -> tuple[int, int, int]:
        """(plane, u0, v0) of a ``size x size`` output window."""
        cls = self.present[int(self.rng.integers(len(self.present)))]
        pool = self.by_class[cls]
        i, u, v = pool[int(self.rng.integers(len(pool)))]
        pl = self.planes[int(i)]
        s, j = self.size, max(1, self.size // 4)
        u0 = int(np.clip(u - s // 2 + self.rng.integers(-j, j + 1), 0, pl.train.shape[0] - s))
        v0 = int(np.clip(v - s // 2 + self.rng.integers(-j, j + 1), 0, pl.train.shape[1] - s))
        return int(i), u0, v0


def _patch(pl: _Plane, u0: int, v0: int, su: int, sv: int, h: int, labels: np.ndarray[Any, Any]) -> tuple[
        np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Input (original axis order) and target (1 thick on the plane axis) for an output window."""
    x = pl.slab[:, u0 : u0 + su + 2 * h, v0 : v0 + sv + 2 * h]
    y = labels[None, u0 : u0 + su, v0 : v0 + sv]
    return np.moveaxis(x, 0, pl.axis), np.moveaxis(y, 0, pl.axis)


class Adam:
    """Adam (Kingma & Ba 2015), the same update as ``torch.optim.Adam`` with default options.

    Written out because the first ``torch.optim`` optimiser of a process imports
    ``torch._dynamo`` (3 to 15 seconds on a small machine), which every ``studios train`` would pay.
    """

    def __init__(self, params: Iterator[torch.nn.Parameter], *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.betas, self.eps, self.t = lr, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1.0 - b1**self.t, 1.0 - b2**self.t
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            if p.grad is None:
                continue
            m.mul_(b1).add_(p.grad, alpha=1.0 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1.0 - b2)
            p.addcdiv_(m, (v.sqrt() / math.sqrt(c2)).add_(self.eps), value=-self.lr / c1)


class _Loop:
    """Optimiser steps, validation, learning-rate halving, early stopping, best weights."""

    def __init__(self, model: StridefreeModel, planes: list[_Plane], sampler: _Sampler, *, offset: float,
                 scale: float, device: torch.device, lr: float, batch_size: int, rng: np.random.Generator,
                 classes: int) -> None:
        self.model, self.planes, self.sampler = model, planes, sampler
        self.offset, self.scale, self.device, self.rng = offset, scale, device, rng
        self.batch_size, self.k, self.lr = batch_size, classes, lr
        self.opt = Adam(model.parameters(), lr=lr)
        self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.epochs = self.steps = 0
        self.has_val = any(pl.val_tiles for pl in planes)

    def _augment(self, x: np.ndarray[Any, Any], y: np.ndarray[Any, Any]) -> tuple[
            np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        for axis in range(3):
            if self.rng.random() < 0.5:
                x, y = np.flip(x, axis), np.flip(y, axis)
        k = int(self.rng.integers(4))
        if k:
            x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k, axes=(1, 2))
        x = apply_affine(x, self.offset, self.scale)
        x *= np.float32(1.0 + self.rng.uniform(-AUG_SCALE, AUG_SCALE))
        x += np.float32(self.rng.uniform(-AUG_OFFSET, AUG_OFFSET))
        sigma = self.rng.uniform(0.0, AUG_NOISE)
        x += self.rng.normal(0.0, sigma, size=x.shape).astype(np.float32)
        return x, np.ascontiguousarray(y)

    def step(self) -> tuple[float, int, int]:
        """One optimiser step; returns (loss, correct, supervised voxels)."""
        self.model.train()
        h, s = self.model.halo, self.sampler.size
        groups: dict[tuple[int, ...], list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]]] = {}
        for _ in range(self.batch_size):
            i, u0, v0 = self.sampler.window()
            pl = self.planes[i]
            x, y = self._augment(*_patch(pl, u0, v0, s, s, h, pl.train))
            groups.setdefault(x.shape, []).append((x, y))
        self.opt.zero_grad(set_to_none=True)
        n = sum(int((y >= 0).sum()) for g in groups.values() for _, y in g)
        total, correct = 0.0, 0
        for group in groups.values():
            xt = torch.from_numpy(np.stack([g[0] for g in group])[:, None]).to(self.device)
            yt = torch.from_numpy(np.stack([g[1] for g in group])).to(self.device)
            logits = self.model(xt)
            loss = F.cross_entropy(logits, yt, ignore_index=-1, reduction="sum") / max(n, 1)
            loss.backward()
            total += float(loss.detach())
            with torch.no_grad():
                correct += int(((logits.argmax(1) == yt) & (yt >= 0)).sum())
        self.opt.step()
        self.steps += 1
        return total, correct, n

    @torch.no_grad()
    def validate(self) -> tuple[float, np.ndarray[Any, Any]]:
        """(mean loss, K x K confusion matrix truth x prediction) on the held-out tiles."""
        self.model.eval()
        h = self.model.halo
        confusion = np.zeros((self.k, self.k), dtype=np.int64)
        loss, n = 0.0, 0
        for pl in self.planes:
            for u0, v0, su, sv in pl.val_tiles:
                x, y = _patch(pl, u0, v0, su, sv, h, pl.val)
                xt = torch.from_numpy(apply_affine(x, self.offset, self.scale)[None, None]).to(self.device)
                yt = torch.from_numpy(np.ascontiguousarray(y)[None]).to(self.device)
                logits = self.model(xt)
                loss += float(F.cross_entropy(logits, yt, ignore_index=-1, reduction="sum"))
                mask = yt >= 0
                n += int(mask.sum())
                pred = logits.argmax(1)[mask].cpu().numpy()
                truth = yt[mask].cpu().numpy()
                confusion += np.bincount(truth * self.k + pred, minlength=self.k * self.k).reshape(self.k, self.k)
        return loss / max(n, 1), confusion

    def run(self, *, start: float, deadline: float, epochs: int | None, steps_per_epoch: int, patience: int,
            reporter: Reporter, names: Sequence[str]) -> dict[str, Any]:
        """Train until ``epochs``, the ``deadline`` (``time.perf_counter()`` seconds; the last
        validation is finished before it) or early stopping; returns the metrics of the best epoch."""
        by_time = epochs is None
        reporter.start("train", int(math.ceil(deadline - start)) if by_time else epochs * steps_per_epoch)  # type: ignore[operator]
        reported, reserve = 0, SAVE_RESERVE_S
        curve: list[float] = []
        best: dict[str, Any] = {}
        best_score, since_best, stopped = -math.inf, 0, "epochs"
        try:
            while epochs is None or self.epochs < epochs:
                run_loss, run_correct, run_n, run_steps, out_of_time = 0.0, 0, 0, 0, False
                for _ in range(steps_per_epoch):
                    interrupt.check(f"training stopped in epoch {self.epochs + 1}; no model was written, "
                                    "run the same command to train again")
                    loss, correct, n = self.step()
                    run_steps += 1
                    run_loss, run_correct, run_n = run_loss + loss, run_correct + correct, run_n + n
                    now = time.perf_counter()
                    if by_time:
                        seconds = min(int(now - start), int(math.ceil(deadline - start)))
                        reporter.advance(seconds - reported, voxels=n)
                        reported = seconds
                    else:
                        reporter.advance(1, voxels=n)
                    _metrics(reporter, {"loss": loss, "acc": correct / max(n, 1)})
                    if now + reserve >= deadline:
                        out_of_time = True
                        break
                self.epochs += 1
                curve.append(run_loss / run_steps)
                entry = {"epoch": self.epochs, "train_loss": curve[-1], "train_accuracy": run_correct / max(run_n, 1)}
                t_val = time.perf_counter()
                if self.has_val:
                    vloss, confusion = self.validate()
                    entry.update(_scores(confusion, names), val_loss=vloss)
                    _metrics(reporter, {"val acc": entry["val_accuracy"], "val mIoU": entry["val_mean_iou"]})
                    # validation loss, not mIoU: IoU of a rare class on a few held-out voxels is too noisy
                    score = -vloss
                else:
                    score = -curve[-1]
                reserve = time.perf_counter() - t_val + SAVE_RESERVE_S
                logger.info("epoch %d: %s", self.epochs, {k: round(v, 4) if isinstance(v, float) else v
                                                           for k, v in entry.items()})
                if score > best_score + 1e-4 * abs(best_score) or not best:
                    best_score, since_best, best = score, 0, entry
                    self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                else:
                    since_best += 1
                    if since_best % PLATEAU == 0:
                        self.opt.lr = max(MIN_LR, self.opt.lr * 0.5)
                if out_of_time or time.perf_counter() + reserve >= deadline:
                    stopped = "time"
                    break
                if self.has_val and since_best >= patience:
                    stopped = "early-stopping"
                    break
        finally:
            reporter.finish()
        metrics = {k: v for k, v in best.items() if k.startswith("val_")}
        metrics.update(
            best_epoch=best.get("epoch", 0), stopped=stopped, epochs=self.epochs, steps=self.steps,
            loss_first=curve[0] if curve else None, loss_last=curve[-1] if curve else None,
            loss_curve=[round(v, 5) for v in curve],
            train_accuracy=best.get("train_accuracy"),
        )
        return metrics


def _scores(confusion: np.ndarray[Any, Any], names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class IoU (None where the class is absent from validation) and their mean."""
    summary = scores(confusion, names)
    iou = {c["name"]: (c["iou"] if c["support"] else None) for c in summary["per_class"]}
    present = [v for v in iou.values() if v is not None]
    return {
        "val_accuracy": summary["accuracy"] or 0.0,
        "val_mean_iou": float(np.mean(present)) if present else 0.0,
        "val_iou": iou,
        "val_voxels": summary["voxels"],
    }


def _metrics(reporter: Reporter, values: Mapping[str, Any]) -> None:
    hook = getattr(reporter, "metrics", None)
    if callable(hook):
        hook(dict(values))


__all__ = ["AXES", "DEFAULT_ARCH", "TrainResult", "train"]
