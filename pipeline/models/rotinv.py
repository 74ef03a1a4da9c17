"""Dilated residual CNN whose 3x3x3 kernels are invariant under the 48 symmetries of the cube.

Same topology as :class:`~pipeline.models.dilated.DilatedResNet`::

    x -> iconv3x3x3(d=1) -> ReLU                                  stem, C channels
      -> [iconv3x3x3(d=d_i) -> ReLU, + crop(skip, d_i)] for d_i   residual dilated blocks
      -> conv1x1x1 -> ReLU -> conv1x1x1                           per-voxel head, K logits

but every 3x3x3 kernel is tied under the full octahedral group O_h (axis permutations x axis
flips, 48 elements). The 27 kernel taps fall into four orbits by how many of their offsets are
non-zero: centre (1 tap), faces (6), edges (12), corners (8). Each ``(out, in)`` kernel therefore
has 4 free weights, and the full kernel is gathered from them at forward time.

Because every kernel is invariant and every feature is a scalar field, the network commutes with
the group: ``model(g(x)) == g(model(x))`` for each of the 48 cube symmetries ``g`` acting on the
three spatial axes. Halo ``h = 1 + sum(dilations)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.dilated import DilatedResNet

#: Number of orbits of the 27 taps of a 3x3x3 kernel under the 48 cube symmetries.
N_ORBITS = 4


def cube_orbit_index() -> torch.Tensor:
    """``(3, 3, 3)`` int64: orbit id of each tap (0 centre, 1 face, 2 edge, 3 corner)."""
    offsets = torch.arange(3) - 1
    dz, dy, dx = torch.meshgrid(offsets, offsets, offsets, indexing="ij")
    return (dz != 0).long() + (dy != 0).long() + (dx != 0).long()


class InvariantConv3d(nn.Module):
    """Valid 3x3x3 convolution with a kernel tied under the 48 cube symmetries.

    Parameters: ``weight`` ``(C_out, C_in, 4)`` (one value per tap orbit) and ``bias``
    ``(C_out,)``. The orbit index is a non-persistent buffer, so ``state_dict`` holds only
    those two tensors.

    Args:
        in_channels: C_in.
        out_channels: C_out.
        dilation: tap spacing d; the layer crops ``d`` voxels per side.
    """

    orbit_index: torch.Tensor

    def __init__(self, in_channels: int, out_channels: int, dilation: int = 1) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.dilation = int(dilation)
        self.weight = nn.Parameter(torch.empty(self.out_channels, self.in_channels, N_ORBITS))
        self.bias = nn.Parameter(torch.empty(self.out_channels))
        self.register_buffer("orbit_index", cube_orbit_index().reshape(-1), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform init with the same per-tap bound as ``nn.Conv3d`` (``1/sqrt(C_in * 27)``)."""
        bound = 1.0 / math.sqrt(self.in_channels * 27)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def kernel(self) -> torch.Tensor:
        """The full ``(C_out, C_in, 3, 3, 3)`` kernel, same dtype/device as ``weight``."""
        full = self.weight[..., self.orbit_index]
        return full.reshape(self.out_channels, self.in_channels, 3, 3, 3)

    def flops_per_voxel(self) -> int:
        """2 x multiply-adds per output voxel (the gathered kernel is dense)."""
        return 2 * self.in_channels * self.out_channels * 27

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C_in, Z, Y, X)`` -> ``(N, C_out, Z-2d, Y-2d, X-2d)``, dtype of ``x``."""
        return F.conv3d(x, self.kernel(), self.bias, dilation=self.dilation)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, dilation={self.dilation}, orbits={N_ORBITS}"


class RotInvDilatedNet(DilatedResNet):
    """Stride-free dilated residual network, equivariant to the 48 cube symmetries.

    The topology of :class:`~pipeline.models.dilated.DilatedResNet` with every 3x3x3 kernel
    an :class:`InvariantConv3d`. Args as for ``DilatedResNet``; the default dilations are
    ``(1, 2, 4, 1)``.
    """

    arch = "rotinv_dilated"

    def __init__(
        self,
        *,
        in_channels: int = 1,
        classes: int = 2,
        channels: int = 16,
        dilations: Sequence[int] = (1, 2, 4, 1),
        head: int = 16,
        residual: bool = True,
    ) -> None:
        super().__init__(
            in_channels=in_channels, classes=classes, channels=channels, dilations=dilations, head=head,
            residual=residual,
        )

    def conv(self, in_channels: int, out_channels: int, dilation: int) -> nn.Module:
        return InvariantConv3d(in_channels, out_channels, dilation)

    def flops_per_voxel(self) -> int:
        """Head convolutions (counted by the base class) plus the dense gathered 3x3x3 kernels."""
        tied = sum(m.flops_per_voxel() for m in self.modules() if isinstance(m, InvariantConv3d))
        return super().flops_per_voxel() + tied
