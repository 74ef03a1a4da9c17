"""Class priors of the scan from its unlabelled voxels: EM re-estimation and an output-bias shift.

Class-balanced sampling of a few strokes teaches the model a prior near uniform (a third each for
3 classes), while a tomogram is mostly matrix: on scribbles the rare classes are then
over-predicted (a 128^3 phantom: 128 k voxels called pore for 43 k true ones). The unlabelled
voxels tell the real mix. After training, the model's posteriors on unlabelled slabs
(:class:`pipeline.train.unlabelled.UnlabelledPool`) give the scan's class priors by the EM of
Saerens, Latinne & Decaestecker (2002), "Adjusting the outputs of a classifier to new a priori
probabilities"::

    q_i(c) ~ p_i(c) * pi(c) / pi_train(c)      pi(c) <- mean_i q_i(c)

with ``pi_train`` the class mix of the voxels the loss saw. The correction
``log(pi / pi_train)`` is added to the bias of the model's output layer, so the bundle is the same
stride-free network (blockwise output still equals whole-volume output) and needs nothing at
inference.

The shift is for *sparse* annotations. Full slices are a sample of the scan's voxels, so their
class mix already estimates the scan's, and the EM estimate (from a model's imperfect
posteriors) only adds its own error: on one full slice it said 0.7 % pore for a true 2.0 %, and
the unshifted weights scored higher on every phantom measured (docs/accuracy.md). So
``prior_shift="auto"`` (the default) shifts only when the annotations are sparse, by the same
rule as the forest teacher (:func:`pipeline.train.teacher.labelled_fraction`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.errors import ConfigError
from pipeline.core.normalize import apply_affine
from pipeline.train.annotations import Annotations
from pipeline.train.teacher import SPARSE_FRACTION, labelled_fraction
from pipeline.train.unlabelled import UnlabelledPool

logger = logging.getLogger(__name__)

EM_ITERATIONS = 100
MIN_PRIOR = 1e-4
MODES = ("auto", "on", "off")


def use_prior_shift(mode: bool | str, ann: Annotations) -> bool:
    """Whether to shift the priors: ``"on"``/True, ``"off"``/False, ``"auto"``: sparse annotations only."""
    if isinstance(mode, bool):
        return mode
    if mode not in MODES:
        raise ConfigError(f"prior shift {mode!r} must be one of {', '.join(MODES)}")
    if mode == "auto":
        return labelled_fraction(ann) < SPARSE_FRACTION
    return mode == "on"


def em_priors(probs: np.ndarray[Any, Any], train_prior: np.ndarray[Any, Any],
              iterations: int = EM_ITERATIONS) -> np.ndarray[Any, Any]:
    """Saerens EM: (K, N) float posteriors under ``train_prior`` (K,) -> (K,) priors of the N voxels."""
    pt = np.maximum(np.asarray(train_prior, np.float64), MIN_PRIOR)
    pt = pt / pt.sum()
    p = np.asarray(probs, np.float64)
    pi = pt.copy()
    for _ in range(int(iterations)):
        q = p * (pi / pt)[:, None]
        q /= np.maximum(q.sum(0, keepdims=True), 1e-300)
        new = np.maximum(q.mean(1), MIN_PRIOR)
        new /= new.sum()
        if np.abs(new - pi).max() < 1e-7:
            pi = new
            break
        pi = new
    return pi


@torch.no_grad()
def pool_posteriors(model: torch.nn.Module, pool: UnlabelledPool, *, offset: float, scale: float,
                    device: torch.device) -> np.ndarray[Any, Any]:
    """(K, N) float64 posteriors of ``model`` on every output voxel of the pool's slabs."""
    model.eval()
    out = []
    for pl in pool.slabs:
        x = apply_affine(np.ascontiguousarray(np.moveaxis(pl.slab, 0, pl.axis)), offset, scale)
        p = F.softmax(model(torch.from_numpy(x[None, None]).to(device)), dim=1)[0]
        out.append(p.reshape(p.shape[0], -1).double().cpu().numpy())
    return np.concatenate(out, axis=1)


def output_bias(model: torch.nn.Module, k: int) -> torch.nn.Parameter | None:
    """The bias of the output layer: the last registered ``(k,)`` bias whose shift moves every
    output logit by exactly that shift (checked on a small input); None if there is none."""
    candidates: list[torch.nn.Parameter] = []
    for m in model.modules():
        b = getattr(m, "bias", None)
        if isinstance(b, torch.nn.Parameter) and tuple(b.shape) == (k,):
            candidates.append(b)
    if not candidates:
        return None
    bias = candidates[-1]
    halo = int(getattr(model, "halo", 0))
    x = torch.zeros((1, 1, 1 + 2 * halo, 2 + 2 * halo, 2 + 2 * halo), device=bias.device)
    delta = torch.arange(1, k + 1, dtype=bias.dtype, device=bias.device) * 0.125
    with torch.no_grad():
        was = model.training
        model.eval()
        before = model(x)
        bias.add_(delta)
        after = model(x)
        bias.sub_(delta)
        model.train(was)
    ok = torch.allclose(after - before, delta.view(1, k, 1, 1, 1).expand_as(before), atol=1e-4)
    return bias if bool(ok) else None


def shift_priors(model: torch.nn.Module, pool: UnlabelledPool, train_counts: np.ndarray[Any, Any], *,
                 offset: float, scale: float, device: torch.device) -> dict[str, Any]:
    """Estimate the scan's class priors on ``pool`` and fold ``log(pi / pi_train)`` into the output bias.

    ``train_counts``: (K,) supervised voxels per class seen by the loss. Returns what was done
    (``prior_train``, ``prior_scan``, ``prior_shift``: the bias change, or None when the model
    has no plain output bias or a class was never supervised).
    """
    k = len(train_counts)
    info: dict[str, Any] = {"prior_train": None, "prior_scan": None, "prior_shift": None}
    if np.any(np.asarray(train_counts) <= 0):
        logger.info("class priors not adjusted: a class has no supervised voxel")
        return info
    pt = np.asarray(train_counts, np.float64) / float(np.sum(train_counts))
    pi = em_priors(pool_posteriors(model, pool, offset=offset, scale=scale, device=device), pt)
    info.update(prior_train=[round(float(v), 5) for v in pt], prior_scan=[round(float(v), 5) for v in pi])
    bias = output_bias(model, k)
    if bias is None:
        logger.warning("class priors estimated %s but not applied: the model has no plain output bias", info)
        return info
    shift = np.log(pi / pt)
    with torch.no_grad():
        bias.add_(torch.as_tensor(shift, dtype=bias.dtype, device=bias.device))
    info["prior_shift"] = [round(float(v), 5) for v in shift]
    logger.info("class priors: trained on %s, scan estimate %s", info["prior_train"], info["prior_scan"])
    return info
