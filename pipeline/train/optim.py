"""The optimiser: Adam, written out (importing ``torch.optim`` costs seconds, see :class:`Adam`)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch


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
