"""Fixed Gaussian filter bank + per-voxel MLP: a classic "random-forest features" model in torch.

For each input channel and each scale ``sigma`` the model computes, with separable valid
Gaussian-derivative filters (three valid 1D passes per output, i.e. ``conv3d`` kernels of shapes
``(k, 1, 1)``, ``(1, k, 1)``, ``(1, 1, k)``, ``k = 2r + 1``, ``r = ceil(truncate * sigma)``)::

    smoothed intensity                          G_sigma * x
    gradient magnitude          sigma   * |grad (G_sigma * x)|
    Laplacian of Gaussian       sigma^2 * trace H
    Hessian eigenvalues         sigma^2 * eig(H), ascending (3 features)

(derivatives are scale-normalised so their magnitudes are comparable across scales). All
features are cropped to the valid region of the largest scale and stacked with the centre-cropped
raw input, ``F = C_in * (1 + 6 * len(sigmas))`` channels, then a per-voxel MLP of ``1x1x1``
convolutions maps them to K logits::

    features -> [conv1x1x1 -> ReLU] x layers -> conv1x1x1    (hidden width ``hidden``)

Only the MLP is trainable; the filter taps are non-persistent buffers, so ``state_dict`` holds
only the MLP. Halo ``h = max_i ceil(truncate * sigma_i)``.

Every feature is invariant under the 48 symmetries of the cube (axis permutations and flips):
the same 1D taps are used on every axis, the first-derivative taps are odd and the others even,
so a symmetry only permutes/negates gradient components and conjugates the Hessian by a signed
permutation, leaving the magnitude, trace and eigenvalues unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.base import StridefreeModel, center_crop

#: Features per input channel and scale: smoothed, |gradient|, LoG, 3 Hessian eigenvalues.
FEATURES_PER_SCALE = 6
#: 1D passes per scale: 3 along Z, 6 along Y, 10 along X (shared intermediate results).
PASSES_PER_SCALE = 19


def gaussian_radius(sigma: float, truncate: float) -> int:
    """Filter radius ``r = ceil(truncate * sigma)`` (robust to float noise such as 3.0000000004)."""
    return max(1, math.ceil(truncate * sigma - 1e-9))


def gaussian_taps(sigma: float, radius: int) -> torch.Tensor:
    """``(3, 2r+1)`` float64 correlation taps for the Gaussian and its 1st and 2nd derivatives.

    Row ``o`` applied as a correlation (``out[i] = sum_t w[t] f[i + t]``, as ``conv3d`` does)
    gives the order-``o`` derivative of the smoothed signal. The sampled derivative kernels are
    corrected so that they differentiate polynomials up to degree 2 exactly: row 0 sums to 1;
    row 1 is odd with ``sum t w = 1``; row 2 is even, sums to 0 and has ``sum t^2/2 w = 1``.
    """
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    s2 = float(sigma) ** 2
    g0 = torch.exp(-0.5 * t * t / s2)
    g0 = g0 / g0.sum()
    g1 = t / s2 * g0
    g1 = g1 / (t * g1).sum()
    g2 = (t * t / (s2 * s2) - 1.0 / s2) * g0
    g2 = g2 - g2.sum() * g0
    g2 = g2 / (0.5 * t * t * g2).sum()
    return torch.stack([g0, g1, g2])


#: Kernel length from which :func:`_pass` uses oneDNN ``conv2d`` on CPU rather than ``conv3d``.
CONV2D_FROM = 16


def _pass(x: torch.Tensor, taps: torch.Tensor, axis: int) -> torch.Tensor:
    """Valid 1D correlation of ``(B, 1, Z, Y, X)`` along spatial ``axis`` (0, 1, 2) with each row
    of ``taps`` ``(M, k)``: returns ``(B, M, ...)`` with that axis shortened by ``k - 1``.

    Short kernels (and every kernel off the CPU) run as a ``conv3d`` with a ``(k, 1, 1)``-like
    kernel. On CPU that is an im2col product whose cost grows with ``k``, so long kernels run as
    the same correlation written as a ``conv2d`` over a reshaped view, which oneDNN does several
    times faster. Both give the same values up to rounding.
    """
    b, _, nz, ny, nx = x.shape
    m, k = taps.shape
    if x.device.type != "cpu" or k < CONV2D_FROM:
        shape = [m, 1, 1, 1, 1]
        shape[2 + axis] = k
        return F.conv3d(x, taps.reshape(shape))
    if axis == 0:
        out = F.conv2d(x.reshape(b, 1, nz, ny * nx), taps.reshape(m, 1, k, 1))
        return out.reshape(b, m, nz - k + 1, ny, nx)
    if axis == 1:
        out = F.conv2d(x.reshape(b * nz, 1, ny, nx), taps.reshape(m, 1, k, 1))
        return out.reshape(b, nz, m, ny - k + 1, nx).transpose(1, 2)
    if axis == 2:
        out = F.conv2d(x.reshape(b, 1, nz * ny, nx), taps.reshape(m, 1, 1, k))
        return out.reshape(b, m, nz, ny, nx - k + 1)
    raise ValueError(f"axis must be 0, 1 or 2, not {axis}")


def pointwise(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """Apply a ``1x1x1`` ``conv`` to ``(N, C, Z, Y, X)`` as one batched matrix product.

    Same result as ``conv(x)`` (up to rounding), several times faster than the oneDNN
    ``1x1x1`` convolution on CPU. Returns ``(N, C_out, Z, Y, X)``, dtype of ``x``.
    """
    n, c = x.shape[:2]
    weight = conv.weight.reshape(conv.out_channels, c)
    flat = x.reshape(n, c, -1)
    if conv.bias is None:
        out = torch.matmul(weight, flat)
    else:
        out = torch.baddbmm(conv.bias.reshape(1, -1, 1), weight.expand(n, -1, -1), flat)
    return out.reshape(n, conv.out_channels, *x.shape[2:])


def scale_features(x: torch.Tensor, taps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Six features of one scale.

    Args:
        x: ``(B, 1, Z, Y, X)`` single-channel volumes (float32 or float64).
        taps: ``(3, k)`` Gaussian/derivative taps of :func:`gaussian_taps`, dtype of ``x``.
        sigma: the scale, for scale normalisation.

    Returns:
        ``(B, 6, Z-k+1, Y-k+1, X-k+1)``, dtype of ``x``: smoothed, gradient magnitude, LoG and
        the three Hessian eigenvalues in ascending order.
    """
    z = _pass(x, taps, 0)  # z0, z1, z2
    z0, z1, z2 = z[:, 0:1], z[:, 1:2], z[:, 2:3]
    z0y = _pass(z0, taps, 1)  # z0y0, z0y1, z0y2
    z1y = _pass(z1, taps[:2], 1)  # z1y0, z1y1
    z2y0 = _pass(z2, taps[:1], 1)
    a = _pass(z0y[:, 0:1], taps, 2)  # smoothed, d/dx, d2/dx2
    b = _pass(z0y[:, 1:2], taps[:2], 2)  # d/dy, d2/dydx
    c = _pass(z1y[:, 0:1], taps[:2], 2)  # d/dz, d2/dzdx
    hyy = _pass(z0y[:, 2:3], taps[:1], 2)
    hzy = _pass(z1y[:, 1:2], taps[:1], 2)
    hzz = _pass(z2y0, taps[:1], 2)
    smooth, gx, hxx = a[:, 0:1], a[:, 1:2], a[:, 2:3]
    gy, hyx = b[:, 0:1], b[:, 1:2]
    gz, hzx = c[:, 0:1], c[:, 1:2]
    s1, s2 = float(sigma), float(sigma) ** 2
    grad = s1 * torch.sqrt(gz * gz + gy * gy + gx * gx)
    log = s2 * (hzz + hyy + hxx)
    eig = symmetric3_eigvals(hzz, hyy, hxx, hzy, hzx, hyx)
    return torch.cat([smooth, grad, log, s2 * eig], 1)


def symmetric3_eigvals(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor, e: torch.Tensor, f: torch.Tensor
) -> torch.Tensor:
    """Eigenvalues of the per-voxel symmetric matrices ``[[a, d, e], [d, b, f], [e, f, c]]``.

    Closed form (trigonometric solution of the characteristic cubic), evaluated in float64 and
    cast back: its error is about ``sqrt(eps_64) * spread`` for nearly-degenerate pairs, below
    float32 resolution, and it is much faster than a batched ``torch.linalg.eigvalsh`` on CPU.

    Args:
        a, b, c, d, e, f: matrix entries, each ``(B, 1, Z, Y, X)`` of one floating dtype.

    Returns:
        ``(B, 3, Z, Y, X)``, dtype of ``a``: eigenvalues in ascending order.
    """
    dtype = a.dtype
    a, b, c, d, e, f = (t.to(torch.float64) for t in (a, b, c, d, e, f))
    q = (a + b + c) / 3.0
    a, b, c = a - q, b - q, c - q
    p = torch.sqrt((a * a + b * b + c * c + 2.0 * (d * d + e * e + f * f)) / 6.0)
    scale = torch.where(p > 0, p, torch.ones_like(p))
    a, b, c, d, e, f = (t / scale for t in (a, b, c, d, e, f))
    det = a * (b * c - f * f) - d * (d * c - f * e) + e * (d * f - b * e)
    phi = torch.acos(torch.clamp(0.5 * det, -1.0, 1.0)) / 3.0
    hi = q + 2.0 * p * torch.cos(phi)
    lo = q + 2.0 * p * torch.cos(phi + 2.0 * math.pi / 3.0)
    mid = torch.clamp(q + 2.0 * p * torch.cos(phi - 2.0 * math.pi / 3.0), lo, hi)
    return torch.cat([lo, mid, hi], 1).to(dtype)


class FilterBankMLP(StridefreeModel):
    """Fixed multi-scale Gaussian filter bank followed by a trainable per-voxel MLP.

    Args:
        in_channels: input channels (1 for a tomogram); each is filtered separately.
        classes: K, number of output classes.
        sigmas: Gaussian scales in voxels (each > 0).
        truncate: filter radius in units of sigma; ``r = ceil(truncate * sigma)``.
        hidden: width of the hidden 1x1x1 layers.
        layers: number of hidden ``conv1x1x1 -> ReLU`` layers (0: a linear classifier).
    """

    arch = "filterbank_mlp"

    def __init__(
        self,
        *,
        in_channels: int = 1,
        classes: int = 2,
        sigmas: Sequence[float] = (0.7, 1.6, 3.5),
        truncate: float = 3.0,
        hidden: int = 32,
        layers: int = 2,
    ) -> None:
        super().__init__(in_channels=in_channels, classes=classes)
        self.sigmas = tuple(float(s) for s in sigmas)
        self.truncate = float(truncate)
        self.hidden = int(hidden)
        self.layers = int(layers)
        if not self.sigmas or any(not (s > 0 and math.isfinite(s)) for s in self.sigmas):
            raise ValueError("sigmas must be a non-empty list of positive numbers")
        if not (self.truncate > 0 and math.isfinite(self.truncate)):
            raise ValueError("truncate must be > 0")
        if self.layers < 0 or (self.layers and self.hidden < 1):
            raise ValueError("layers must be >= 0 and hidden >= 1")
        if self.in_channels < 1 or self.classes < 1:
            raise ValueError("in_channels and classes must be >= 1")
        self.radii = tuple(gaussian_radius(s, self.truncate) for s in self.sigmas)
        for i, (sigma, radius) in enumerate(zip(self.sigmas, self.radii, strict=True)):
            # float64 so that a float64 model keeps the exact moment corrections; cast per call
            self.register_buffer(f"taps_{i}", gaussian_taps(sigma, radius), persistent=False)
        self.n_features = self.in_channels * (1 + FEATURES_PER_SCALE * len(self.sigmas))
        mlp: list[nn.Module] = []
        width = self.n_features
        for _ in range(self.layers):
            mlp += [nn.Conv3d(width, self.hidden, 1), nn.ReLU()]
            width = self.hidden
        mlp.append(nn.Conv3d(width, self.classes, 1))
        self.mlp = nn.Sequential(*mlp)

    @property
    def halo(self) -> int:
        return max(self.radii)

    def params(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "classes": self.classes,
            "sigmas": list(self.sigmas),
            "truncate": self.truncate,
            "hidden": self.hidden,
            "layers": self.layers,
        }

    def flops_per_voxel(self) -> int:
        """MLP (counted by the base class) plus the 1D filter passes per output voxel.

        Each scale costs 19 passes of ``2k`` flops per input channel; the 3x3 eigenvalue
        solves and the elementwise feature arithmetic are not counted.
        """
        filters = sum(PASSES_PER_SCALE * 2 * (2 * r + 1) for r in self.radii) * self.in_channels
        return super().flops_per_voxel() + filters

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C_in, Z, Y, X)`` -> ``(N, F, Z-2h, Y-2h, X-2h)``, dtype of ``x``.

        Channel order: for each input channel, the raw (cropped) value, then per scale the six
        features of :func:`scale_features`.
        """
        n, c = x.shape[:2]
        h = self.halo
        v = x.reshape(n * c, 1, *x.shape[2:])
        out = [center_crop(v, h)]
        for i, (sigma, radius) in enumerate(zip(self.sigmas, self.radii, strict=True)):
            taps = getattr(self, f"taps_{i}").to(dtype=x.dtype)
            out.append(scale_features(center_crop(v, h - radius), taps, sigma))
        feats = torch.cat(out, 1)
        return feats.reshape(n, c * feats.shape[1], *feats.shape[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C_in, Z, Y, X)`` float32 -> ``(N, K, Z-2h, Y-2h, X-2h)`` logits.

        The MLP's ``nn.Conv3d`` layers are applied with :func:`pointwise` (same arithmetic).
        """
        h = self.features(x)
        for module in self.mlp:
            h = pointwise(module, h) if isinstance(module, nn.Conv3d) else module(h)
        return h
