"""The contract every studios model keeps.

A studios model is a *valid* operator: it takes ``(N, C_in, Z, Y, X)`` float32 and returns
``(N, K, Z - 2h, Y - 2h, X - 2h)`` float32 logits, where ``h`` is its :attr:`halo`, the radius
of its receptive field. It has no stride, no pooling and no normalisation over space, so its
output at a voxel depends only on the input within ``h`` voxels of it. Padding never happens
inside a model: the caller pads the volume border (see :mod:`pipeline.segment.predict`), which is
what makes blockwise output equal to whole-volume output.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn


def center_crop(x: torch.Tensor, amount: int) -> torch.Tensor:
    """Drop ``amount`` voxels on each side of the last three axes of ``(N, C, Z, Y, X)``."""
    if amount == 0:
        return x
    return x[..., amount:-amount, amount:-amount, amount:-amount]


class StridefreeModel(nn.Module):
    """Base class: a registered, stride-free, valid 3D model.

    Subclasses set :attr:`arch` (registry name), build layers from keyword parameters that are
    plain JSON data, and report :attr:`halo`.
    """

    arch: ClassVar[str] = ""

    def __init__(self, *, in_channels: int, classes: int) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.classes = int(classes)

    @property
    def halo(self) -> int:
        """Receptive-field radius in voxels (computed from the architecture)."""
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """Architecture parameters as JSON data; ``type(self)(**params())`` rebuilds it."""
        raise NotImplementedError

    def flops_per_voxel(self) -> int:
        """Multiply-adds x 2 per output voxel of the convolutions (a design number)."""
        total = 0
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                k = 1
                for s in module.kernel_size:
                    k *= s
                total += 2 * module.in_channels * module.out_channels * k // module.groups
        return total

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
