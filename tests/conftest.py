"""Shared fixtures: small scans, bundles, and test-only architectures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
CEMENT = ROOT / "pipeline" / "data" / "cement_128x128x128.tif"


@pytest.fixture(autouse=True)
def _torch_threads() -> Iterator[None]:
    torch.set_num_threads(2)
    yield


@pytest.fixture(autouse=True)
def _auto_precision_is_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    """``precision="auto"`` resolves from the CPU's bf16 unit; pin "no unit"
    so in-process tests check the same fp32 numerics on every CPU. Tests of ``auto`` patch
    ``bf16_unit`` themselves."""
    from pipeline.segment import precision

    monkeypatch.setattr(precision, "bf16_unit", lambda: None)


@pytest.fixture(scope="session")
def dask_address() -> Iterator[str]:
    """A real LocalCluster (2 worker processes, 1 thread each) shared by the session's tests."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, memory_limit="4GB") as cluster:
        yield cluster.scheduler_address


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def position_volume(shape: tuple[int, int, int]) -> np.ndarray[Any, Any]:
    """Each voxel encodes its own position: a mis-stitched block is obvious."""
    z, y, x = np.indices(shape)
    return (z * shape[1] * shape[2] + y * shape[2] + x).astype(np.float32)


def make_scan(tmp_path: Path, volume: np.ndarray[Any, Any], name: str = "scan.zarr", **kwargs: Any) -> Path:
    from pipeline.ingest.run import ingest_array

    out = tmp_path / name
    ingest_array(volume, out, **kwargs)
    return out
