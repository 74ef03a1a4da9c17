"""A MONAI 3D U-Net trained on sparse annotations under a wall-clock budget (benchmark baseline).

Not part of the product: ``bench/accuracy.py`` uses it as the strided reference a user would
otherwise reach for. It is given what the studios trainer gets: the same annotations, the same
z-score normalisation, the same tomography-valid augmentations (flips, 90 degree rotations in
the y-x plane, intensity scale/offset and noise), a masked loss on labelled voxels only,
class-balanced patch sampling and the same time budget. Inference is MONAI's
``sliding_window_inference`` with Gaussian blending, the standard way to apply it to a volume.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.train.sampling import AUG_NOISE, AUG_OFFSET, AUG_SCALE  # the studios trainer's augmentation

TRAIN_PATCH = (16, 64, 64)  # (z, y, x); every edge a multiple of 8 (three stride-2 levels)
ROI = (32, 64, 64)
BATCH = 4
LR = 1e-3


@dataclass(frozen=True)
class UNetResult:
    """A trained U-Net and its training summary (``steps``, ``seconds``, ``loss_last``)."""

    net: torch.nn.Module
    params: int
    steps: int
    seconds: float
    loss_last: float
    mean: float
    std: float


def build(classes: int) -> torch.nn.Module:
    """MONAI's residual 3D U-Net, channels 16-32-64-128, strides 2-2-2, two residual units per level."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=1, out_channels=classes, channels=(16, 32, 64, 128),
                strides=(2, 2, 2), num_res_units=2)


def _pad_to(volume: np.ndarray[Any, Any], shape: tuple[int, ...]) -> tuple[np.ndarray[Any, Any], tuple[slice, ...]]:
    """Edge-pad (Z, Y, X) ``volume`` to at least ``shape``; return it and the slices of the original."""
    pads = [(0, max(0, s - n)) for n, s in zip(volume.shape, shape, strict=True)]
    crop = tuple(slice(0, n) for n in volume.shape)
    return np.pad(volume, pads, mode="edge"), crop


def train_unet(volume: np.ndarray[Any, Any], annotations: np.ndarray[Any, Any], *, classes: int, minutes: float,
               seed: int) -> UNetResult:
    """Train on ``annotations`` (uint8 (Z, Y, X), 0 = unlabelled, 1..K) of ``volume`` for ``minutes``."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    mean, std = float(volume.mean()), float(volume.std()) or 1.0
    x_all, _ = _pad_to(((volume - mean) / std).astype(np.float32), TRAIN_PATCH)
    y_all, _ = _pad_to(annotations.astype(np.int64) - 1, TRAIN_PATCH)
    for axis, n in enumerate(annotations.shape):
        index = [slice(None)] * 3
        index[axis] = slice(n, None)
        y_all[tuple(index)] = -1  # edge padding copies labels; they are not annotations
    where = [np.argwhere(y_all == c) for c in range(classes)]
    where = [w for w in where if len(w)]
    net = build(classes)
    params = sum(p.numel() for p in net.parameters())
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-1)
    start = time.perf_counter()
    deadline = start + 60.0 * minutes
    steps, loss_last = 0, float("nan")
    net.train()
    while time.perf_counter() < deadline:
        xs, ys = [], []
        for _ in range(BATCH):
            pts = where[rng.integers(len(where))]
            centre = pts[rng.integers(len(pts))]
            lo = [int(np.clip(c - rng.integers(p), 0, n - p))
                  for c, p, n in zip(centre, TRAIN_PATCH, x_all.shape, strict=True)]
            box = tuple(slice(a, a + p) for a, p in zip(lo, TRAIN_PATCH, strict=True))
            x, y = x_all[box], y_all[box]
            for axis in range(3):
                if rng.random() < 0.5:
                    x, y = np.flip(x, axis), np.flip(y, axis)
            k = int(rng.integers(4))
            x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k, axes=(1, 2))
            x = x * (1 + AUG_SCALE * rng.uniform(-1, 1)) + AUG_OFFSET * rng.uniform(-1, 1)
            x = x + AUG_NOISE * rng.standard_normal(x.shape)
            xs.append(np.ascontiguousarray(x, dtype=np.float32))
            ys.append(np.ascontiguousarray(y))
        xb = torch.from_numpy(np.stack(xs))[:, None]
        yb = torch.from_numpy(np.stack(ys))
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(xb), yb)
        loss.backward()
        opt.step()
        steps += 1
        loss_last = float(loss.detach())
    return UNetResult(net=net.eval(), params=params, steps=steps, seconds=time.perf_counter() - start,
                      loss_last=loss_last, mean=mean, std=std)


def predict_unet(result: UNetResult, volume: np.ndarray[Any, Any]) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """(Z, Y, X) uint8 labels 1..K by Gaussian-blended sliding windows (overlap 0.25)."""
    from monai.inferers import sliding_window_inference

    x, crop = _pad_to(((volume - result.mean) / result.std).astype(np.float32), ROI)
    with torch.inference_mode():
        logits = sliding_window_inference(torch.from_numpy(x)[None, None], roi_size=ROI, sw_batch_size=1,
                                          predictor=result.net, overlap=0.25, mode="gaussian")
    labels = (torch.argmax(torch.as_tensor(logits)[0], dim=0) + 1).to(torch.uint8).numpy()
    return np.ascontiguousarray(labels[crop])
