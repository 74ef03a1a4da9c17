"""Stride-free local models: registry, architectures and receptive fields."""

from pipeline.models.base import StridefreeModel, center_crop
from pipeline.models.registry import ARCHITECTURES, DEFAULT_ARCH, build_model, register

__all__ = ["ARCHITECTURES", "DEFAULT_ARCH", "StridefreeModel", "build_model", "center_crop", "register"]
