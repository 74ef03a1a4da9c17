"""Learning from the unlabelled voxels: confident pseudo-labels under the cube's symmetries.

Stride-free models make unlabelled patches cheap: a one-voxel-thick output patch ``P x P`` needs
an input of only ``(1 + 2h) x (P + 2h) x (P + 2h)``, read anywhere in the scan. Each step (after a
warm-up) draws unlabelled slabs from a pool read once at the start and adds a consistency loss
(FixMatch, Sohn et al. 2020, adapted to dense outputs):

1. *teacher*: the current model, without augmentation and without gradients, predicts class
   probabilities on the slab; voxels whose top probability is at least ``threshold`` get that
   class as pseudo-label, the others are ignored;
2. *student*: the same slab under a random symmetry (a flip on every axis and a 90-degree
   rotation about z: 32 of the cube's 48 symmetries, those valid for tomograms) and intensity
   jitter (scale, offset, noise) must predict the transformed pseudo-labels (cross-entropy
   averaged over all output voxels, weighted by ``weight``).

The modes (``--unlabelled``): ``pseudo`` (this), ``windows`` (the same on the unlabelled voxels of
the labelled training windows, no extra slabs), ``entropy`` (minimise the prediction entropy of
augmented unlabelled slabs) and ``none`` (the default). Measured on scribbles of a 128^3
phantom at equal optimiser steps (docs/accuracy.md, "Scribbles"), ``pseudo`` and ``windows``
scored below ``none`` (mean IoU 0.794 / 0.794 against 0.836): the confident pseudo-labels are
dominated by the matrix and wear the rare pores away, so ``none`` stays the default until a
variant wins by measurement. What did win is :mod:`pipeline.train.priors` (class priors of the
scan from the unlabelled voxels, on by default) and, for scribbles, dense pseudo-labels from a
feature teacher (:mod:`pipeline.train.teacher`, on by default for sparse annotations).
Inference is unchanged: the same stride-free network, so blockwise output still equals
whole-volume output.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.normalize import apply_affine
from pipeline.train.sampling import Plane, apply_symmetry, intensity, read_region, symmetry

MODES = ("pseudo", "windows", "entropy", "none")
DEFAULT_MODE = "none"  # measured best at equal steps on scribbles (docs/accuracy.md)
POOL = 48  # unlabelled slabs read at the start
THRESHOLD = 0.9
WEIGHT = 1.0


class UnlabelledPool:
    """Random one-voxel-thick output windows (with their input halo) across the labelled axes.

    ``slabs``: :class:`Plane` objects with all labels -1, ``slab`` of shape
    ``(1 + 2h, size + 2h, size + 2h)`` raw scan values, plane normal first.
    """

    def __init__(self, array: Any, shape: tuple[int, ...], axes: list[int], h: int, size: int,
                 rng: np.random.Generator, n: int = POOL) -> None:
        self.size, self.rng = size, rng
        self.slabs: list[Plane] = []
        for _ in range(n):
            axis = axes[int(rng.integers(len(axes)))]
            dims = [shape[a] for a in range(3) if a != axis]
            s = min(size, *dims)
            origin = (int(rng.integers(dims[0] - s + 1)), int(rng.integers(dims[1] - s + 1)))
            self.slabs.append(read_region(array, shape, axis, int(rng.integers(shape[axis])), origin, (s, s), h))

    def draw(self) -> Plane:
        return self.slabs[int(self.rng.integers(len(self.slabs)))]


def unlabelled_loss(mode: str, model: torch.nn.Module, pool: UnlabelledPool, n: int, *, offset: float,
                    scale: float, device: torch.device, rng: np.random.Generator,
                    threshold: float = THRESHOLD, weight: float = WEIGHT) -> tuple[torch.Tensor, float]:
    """The unlabelled term for ``n`` slabs of ``pool``; returns ``(loss, share of confident voxels)``.

    The loss is a scalar tensor with a graph through ``model`` (call ``backward`` on it).
    """
    groups: dict[tuple[tuple[int, ...], ...], list[tuple[np.ndarray[Any, Any], Any]]] = {}
    for _ in range(n):
        pl = pool.draw()
        x, g = np.moveaxis(pl.slab, 0, pl.axis), symmetry(rng)
        groups.setdefault((x.shape, apply_symmetry(x, g).shape), []).append((x, g))
    total = torch.zeros((), device=device)
    confident, voxels = 0, 0
    for members in groups.values():
        xs, gs = [m[0] for m in members], [m[1] for m in members]
        student = np.stack([intensity(apply_symmetry(x, g), offset, scale, rng) for x, g in members])
        xt = torch.from_numpy(student[:, None]).to(device)
        if mode == "entropy":
            p = F.log_softmax(model(xt), dim=1)
            loss = -(p.exp() * p).sum(1).mean()
        else:
            clean = np.stack([apply_affine(np.ascontiguousarray(x), offset, scale) for x in xs])
            with torch.no_grad():
                model.eval()
                prob = F.softmax(model(torch.from_numpy(clean[:, None]).to(device)), dim=1)
                model.train()
                conf, label = prob.max(1)
                label[conf < threshold] = -1
            lab = label.cpu().numpy()
            target = np.stack([np.ascontiguousarray(apply_symmetry(y, g)) for y, g in zip(lab, gs, strict=True)])
            logits = model(xt)
            tt = torch.from_numpy(target).to(device)
            loss = F.cross_entropy(logits, tt, ignore_index=-1, reduction="sum") / tt.numel()
            confident += int((tt >= 0).sum())
            voxels += tt.numel()
        total = total + loss * (len(xs) / n)
    return total * weight, confident / max(voxels, 1)

