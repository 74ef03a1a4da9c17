"""Fibre orientation from the structure tensor, block by block (torch: CPU or GPU).

For the class mask ``m`` (float, 1 = fibre) the gradient is taken with derivative-of-Gaussian
filters of ``sigma`` (noise scale), the outer products are smoothed by a Gaussian of ``rho``
(integration scale), and the fibre direction at a voxel is the eigenvector of the smallest
eigenvalue of the 3x3 tensor (the direction along which the mask changes least). All filters
are separable 1D convolutions truncated at ``ceil(4 s)``; they run "valid" on an input that
is edge-padded (the border rule of :func:`pipeline.io.store.read_padded`), so the block halo
is ``ceil(4 sigma) + ceil(4 rho)`` and a block's result equals the whole-volume result up to
float rounding (tests/test_analyse_orientation.py). A torch implementation (sums of shifted
slices) runs on GPUs; on the CPU the same filters run with scipy (faster there); float64 by
default. (Not the ``structure-tensor`` package: it has no halo-exact block mode and no torch path.)

Statistics over the class voxels: the second-order orientation tensor ``A = <p p^T>`` (sums
of ``p_i p_j``, exact to rounding in any block order), histograms of the polar angle (from the
z axis, 0-90 degrees) and the azimuth (in the y-x plane from x towards y, 0-180 degrees).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

POLAR_BINS = 18  # 5 degrees
AZIMUTH_BINS = 36  # 5 degrees


def halo_for(sigma: float, rho: float) -> int:
    """Voxels of context per side the structure tensor needs."""
    return math.ceil(4 * sigma) + math.ceil(4 * rho)


def _kernels(s: float, *, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    r = math.ceil(4 * s)
    x = torch.arange(-r, r + 1, dtype=dtype, device=device)
    g = torch.exp(-0.5 * (x / s) ** 2)
    g = g / g.sum()
    dg = -x / s**2 * g
    return g, dg


def _conv(t: torch.Tensor, k: torch.Tensor, axis: int) -> torch.Tensor:
    """'valid' convolution of a (Z, Y, X) tensor with 1D kernel ``k`` along ``axis``.

    A sum of shifted slices in a fixed order: every output voxel is computed by the same
    operations whatever the block shape (bit-identical blocks), and it vectorises on any device
    (faster than ``conv3d`` with (n, 1, 1) kernels on CPUs).
    """
    n = len(k)
    length = t.shape[axis] - n + 1
    kf = k.flip(0)
    out = kf[0] * t.narrow(axis, 0, length)
    for j in range(1, n):
        out = out.add_(t.narrow(axis, j, length), alpha=float(kf[j]))
    return out


def _structure_tensor_scipy(mask: np.ndarray, sigma: float, rho: float) -> torch.Tensor:
    """The CPU path: the same separable filters with ``scipy.ndimage.convolve1d`` (float64; a
    fixed summation order per output voxel), cropped to the valid part."""
    from scipy import ndimage

    g, dg = (k.numpy() for k in _kernels(sigma, dtype=torch.float64, device=torch.device("cpu")))
    G = _kernels(rho, dtype=torch.float64, device=torch.device("cpu"))[0].numpy()

    def conv(a: np.ndarray, k: np.ndarray, axis: int) -> np.ndarray:
        r = len(k) // 2
        out = ndimage.convolve1d(a, k, axis=axis, mode="nearest")
        return out[tuple(slice(r, out.shape[b] - r) if b == axis else slice(None) for b in range(3))]

    t = np.ascontiguousarray(mask, dtype=np.float64)
    grads = []
    for a in range(3):
        v = t
        for b in range(3):
            v = conv(v, dg if a == b else g, b)
        grads.append(v)
    out = np.empty((*[s - 2 * (len(G) // 2) for s in grads[0].shape], 3, 3))
    for a in range(3):
        for b in range(a, 3):
            v = grads[a] * grads[b]
            for c in range(3):
                v = conv(v, G, c)
            out[..., a, b] = out[..., b, a] = v
    return torch.from_numpy(out)


def structure_tensor(mask: np.ndarray, sigma: float, rho: float, *, device: str = "cpu",
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Structure tensor of a padded (Z+2h, Y+2h, X+2h) block, ``h = halo_for(sigma, rho)``.

    ``device="cpu"`` (float64) runs the filters with scipy (several times faster than torch
    on CPUs); any other device (``cuda``, ``cuda:N``, ``torch-cpu`` for torch on the CPU) runs
    them in torch. Both give the same values to float rounding (tested).

    Returns:
        (Z, Y, X, 3, 3) tensor of ``dtype`` for the inner voxels.
    """
    if device == "cpu" and dtype == torch.float64:
        return _structure_tensor_scipy(mask, sigma, rho)
    dev = torch.device("cpu" if device == "torch-cpu" else device)
    t = torch.as_tensor(np.ascontiguousarray(mask), dtype=dtype, device=dev)
    g, dg = _kernels(sigma, dtype=dtype, device=dev)
    grads = []
    for a in range(3):
        v = t
        for b in range(3):
            v = _conv(v, dg if a == b else g, b)
        grads.append(v)
    G, _ = _kernels(rho, dtype=dtype, device=dev)
    out = torch.empty((*[s - 2 * math.ceil(4 * rho) for s in grads[0].shape], 3, 3), dtype=dtype, device=dev)
    for a in range(3):
        for b in range(a, 3):
            v = grads[a] * grads[b]
            for c in range(3):
                v = _conv(v, G, c)
            out[..., a, b] = v
            out[..., b, a] = v
    return out


def directions(tensor: torch.Tensor) -> torch.Tensor:
    """Unit fibre directions (..., 3) of (..., 3, 3) tensors, sign chosen so that ``p_z >= 0``."""
    if tensor.device.type == "cpu":  # numpy's batched 3x3 eigh is faster than torch's on CPUs
        vecs = torch.from_numpy(np.linalg.eigh(tensor.numpy())[1])
    else:
        vecs = torch.linalg.eigh(tensor)[1]
    p = vecs[..., :, 0]
    return p * torch.where(p[..., :1] < 0, -1.0, 1.0).to(p.dtype)


@dataclass
class OrientationStats:
    """Running sums over class voxels (merge blocks in any order)."""

    voxels: int = 0
    outer: Any = None  # (3, 3) float64 sum of p p^T
    polar: Any = None  # (POLAR_BINS,) int64
    azimuth: Any = None  # (AZIMUTH_BINS,) int64

    def add(self, p: np.ndarray) -> None:
        """``p``: (N, 3) unit directions (z, y, x) of class voxels."""
        p = np.asarray(p, dtype=np.float64)
        outer = p.T @ p
        polar = np.degrees(np.arccos(np.clip(np.abs(p[:, 0]), 0.0, 1.0)))
        azimuth = np.degrees(np.arctan2(p[:, 1], p[:, 2])) % 180.0
        hp = np.histogram(polar, bins=POLAR_BINS, range=(0, 90))[0]
        ha = np.histogram(azimuth, bins=AZIMUTH_BINS, range=(0, 180))[0]
        self.voxels += len(p)
        self.outer = outer if self.outer is None else self.outer + outer
        self.polar = hp if self.polar is None else self.polar + hp
        self.azimuth = ha if self.azimuth is None else self.azimuth + ha

    def merge(self, other: OrientationStats) -> None:
        if other.voxels:
            self.voxels += other.voxels
            self.outer = other.outer if self.outer is None else self.outer + other.outer
            self.polar = other.polar if self.polar is None else self.polar + other.polar
            self.azimuth = other.azimuth if self.azimuth is None else self.azimuth + other.azimuth

    def to_json(self) -> dict[str, Any]:
        """``tensor`` A (3x3, z/y/x), its eigenvalues (descending) and main direction, histograms."""
        if not self.voxels:
            return {"voxels": 0, "tensor": None, "eigenvalues": None, "main_direction": None,
                    "polar": None, "azimuth": None}
        a = self.outer / self.voxels
        w, v = np.linalg.eigh(a)
        main = v[:, -1] * (1 if v[0, -1] >= 0 else -1)
        return {
            "voxels": int(self.voxels),
            "tensor": np.round(a, 6).tolist(),
            "eigenvalues": np.round(w[::-1], 6).tolist(),
            "main_direction": np.round(main, 6).tolist(),
            "polar": {"edges_deg": np.linspace(0, 90, POLAR_BINS + 1).tolist(), "counts": self.polar.tolist()},
            "azimuth": {"edges_deg": np.linspace(0, 180, AZIMUTH_BINS + 1).tolist(), "counts": self.azimuth.tolist()},
        }


__all__ = ["AZIMUTH_BINS", "POLAR_BINS", "OrientationStats", "directions", "halo_for", "structure_tensor"]
