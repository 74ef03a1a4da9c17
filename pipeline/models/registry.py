"""Registry of stride-free architectures, looked up by name from model bundles.

Bundles store ``{"arch": NAME, "params": {...}}``; :func:`build_model` turns that data into a
module without executing anything from the bundle.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.core.errors import ModelError
from pipeline.models.base import StridefreeModel
from pipeline.models.dilated import DilatedResNet
from pipeline.models.filterbank import FilterBankMLP
from pipeline.models.rotinv import RotInvDilatedNet

ARCHITECTURES: dict[str, type[StridefreeModel]] = {
    DilatedResNet.arch: DilatedResNet,
    RotInvDilatedNet.arch: RotInvDilatedNet,
    FilterBankMLP.arch: FilterBankMLP,
}

DEFAULT_ARCH = DilatedResNet.arch


def register(cls: type[StridefreeModel]) -> type[StridefreeModel]:
    """Add an architecture class to the registry (usable as a decorator)."""
    if not cls.arch:
        raise ModelError(f"{cls.__name__} has no arch name; set the class attribute 'arch'")
    ARCHITECTURES[cls.arch] = cls
    return cls


def build_model(arch: str, params: Mapping[str, Any]) -> StridefreeModel:
    """Instantiate ``arch`` with JSON ``params``; unknown names or parameters raise ModelError."""
    try:
        cls = ARCHITECTURES[arch]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ModelError(f"unknown architecture {arch!r}; choose one of: {known}") from None
    try:
        return cls(**dict(params))
    except (TypeError, ValueError) as exc:
        raise ModelError(f"architecture {arch!r} rejects its parameters {dict(params)}: {exc}") from None
