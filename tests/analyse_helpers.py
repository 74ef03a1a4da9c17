"""Shared helpers of the analyse tests: a small finished segmentation written like 'studios segment' writes one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.io.labels import set_label_metadata
from pipeline.io.store import create_array, create_group, multiscales, set_studios_attrs


def make_seg(path: Path, labels: np.ndarray[Any, Any], classes: tuple[str, ...], *,
             voxel_size: tuple[float, float, float] = (1.0, 1.0, 1.0), chunks: int = 16) -> Path:
    """A complete studios segmentation (uint8 level 0, label metadata) holding ``labels``."""
    group = create_group(path)
    create_array(group, "0", shape=labels.shape, dtype="uint8", chunks=(chunks,) * 3)[...] = labels
    group.attrs["ome"] = {"version": "0.5", "multiscales": [multiscales(1, voxel_size=voxel_size, name=path.stem)]}
    set_label_metadata(group, path, classes, scan=None)
    set_studios_attrs(group, kind="segmentation", classes=list(classes), complete=True)
    return path


def blobs(shape: tuple[int, int, int], seed: int, *, fraction: float = 0.3, sigma: float = 2.0) -> np.ndarray[Any, Any]:
    """Random smooth blobs (bool), many crossing any 16-voxel block face."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field > np.quantile(field, 1 - fraction)
