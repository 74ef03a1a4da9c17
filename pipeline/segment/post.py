"""A block's post-processing in one pass over its logits: labels, statistics, probabilities.

:func:`post_block` replaces ``to_labels(probs)``, the probability part of ``block_stats`` and
``quantize(probs)`` on the numpy probabilities of :func:`~pipeline.segment.predict.forward`
(several full passes and copies of a (K, Z, Y, X) float32 array). It works on the logits
tensor where the forward left them (CPU or GPU), classes last:

- the softmax is :func:`~pipeline.segment.predict.softmax_classes_last`, bit for bit the
  probabilities the whole-volume reference computes;
- labels are the first maximum over classes (as ``np.argmax``, so they equal
  ``to_labels(reference)`` bit for bit), the confidence is the maximum probability;
- on GPUs the confidence histogram and the entropy are reduced on the device, so only uint8
  labels (and uint8 probabilities when written) and a few numbers cross to the host instead
  of the float32 probabilities; on the CPU numpy reduces views of the same probabilities
  (faster there over a 2-4 wide class axis, bench/block_path.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.segment.ledger import CONF_BINS
from pipeline.segment.predict import quantize, softmax_classes_last, to_labels


@dataclass(frozen=True, slots=True)
class BlockPost:
    """What the statistics and the writes of one block need.

    Attributes:
        labels: (Z, Y, X) uint8 labels 1..K.
        probabilities: (K, Z, Y, X) uint8 ``round(255 p)``, or None when not asked for.
        confidence: (CONF_BINS,) float64 histogram of the max class probability over [0, 1].
        entropy_sum: sum over voxels of the class entropy (nats).
    """

    labels: np.ndarray[Any, np.dtype[np.uint8]]
    probabilities: np.ndarray[Any, np.dtype[np.uint8]] | None
    confidence: np.ndarray[Any, np.dtype[np.float64]]
    entropy_sum: float


def post_block(logits: torch.Tensor, *, probabilities: bool = False) -> BlockPost:
    """Labels, confidence histogram, entropy and (optionally) quantised probabilities.

    Args:
        logits: (1, K, Z, Y, X) float32 logits (any memory layout, any device).
        probabilities: also return the uint8 probabilities.
    """
    if logits.ndim != 5 or logits.shape[0] != 1:
        raise ValueError(f"post_block takes (1, K, Z, Y, X) logits, not {tuple(logits.shape)}")
    p = softmax_classes_last(logits)[0]  # (Z, Y, X, K) contiguous float32
    if p.device.type == "cpu":
        return _post_numpy(p.numpy(), probabilities)
    return _post_torch(p, probabilities)


def _post_torch(p: torch.Tensor, probabilities: bool) -> BlockPost:
    """The reductions in torch on ``p``'s device (GPUs): (Z, Y, X, K) probabilities."""
    top, idx = p.max(dim=-1)
    labels = idx.add_(1).to(torch.uint8)
    bins = (top * CONF_BINS).to(torch.int64).clamp_(0, CONF_BINS - 1)
    confidence = torch.bincount(bins.reshape(-1), minlength=CONF_BINS)
    entropy = torch.special.entr(p).sum(dtype=torch.float64)
    quantised = None
    if probabilities:
        q = p.mul(255.0).round_().to(torch.uint8)  # p is in [0, 1]: round(255 p) as quantize() does
        quantised = q.permute(3, 0, 1, 2).cpu().numpy()
    return BlockPost(labels=labels.cpu().numpy(), probabilities=quantised,
                     confidence=confidence.cpu().numpy().astype(np.float64), entropy_sum=float(entropy))


def _post_numpy(p: np.ndarray[Any, Any], probabilities: bool) -> BlockPost:
    """The CPU reductions, on numpy views of the (Z, Y, X, K) probabilities (no copies).

    Over a class axis of 2-4 values, numpy's plane-by-plane maximum and argmax measured faster
    than torch's reductions over the last axis (bench/block_path.py), so the CPU uses them.
    """
    planes = np.moveaxis(p, -1, 0)  # (K, Z, Y, X) view
    labels = to_labels(planes)
    top = planes[0]
    for k in range(1, len(planes)):
        top = np.maximum(top, planes[k])
    conf, _ = np.histogram(top, bins=CONF_BINS, range=(0.0, 1.0))
    plogp = np.log(np.clip(p, 1e-12, 1.0))
    plogp *= p
    entropy = -float(plogp.sum(dtype=np.float64))
    return BlockPost(labels=labels, probabilities=quantize(planes) if probabilities else None,
                     confidence=conf.astype(np.float64), entropy_sum=entropy)
