"""A block's post-processing in one pass over its logits: labels, statistics, probabilities.

:func:`post_block` replaces ``to_labels(probs)``, the probability part of ``block_stats`` and
``quantize(probs)`` on the numpy probabilities of :func:`~pipeline.segment.predict.forward`
(several full passes and copies of a (K, Z, Y, X) float32 array). It works on the logits
tensor where the forward left them (CPU or GPU), classes last:

- the softmax is :func:`~pipeline.segment.predict.softmax_classes_last`, bit for bit the
  probabilities the whole-volume reference computes;
- one ``max`` over the class axis gives the labels (first maximum on ties, as ``np.argmax``,
  so labels equal ``to_labels(reference)`` bit for bit) and the confidence;
- the confidence histogram and the entropy are reduced on the device; only uint8 labels (and
  uint8 probabilities when written) and a few numbers leave it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.segment.ledger import CONF_BINS
from pipeline.segment.predict import softmax_classes_last


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
