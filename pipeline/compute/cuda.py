"""GPU workers: dask-cuda's LocalCUDACluster and free GPU memory.

One Dask worker per visible GPU, each advertising the Dask resource ``GPU=1`` (blocks ask for
it, so they run only on GPU workers); :func:`gpu_free_memory` reads free GPU memory (NVML,
without a CUDA context here) for :func:`pipeline.segment.plan.auto_block`.
``dask_cuda`` is imported only on demand; without it or without a GPU the errors are one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Protocol

from pipeline.core.errors import ClusterError, one_line

logger = logging.getLogger(__name__)


class CudaSpec(Protocol):
    """What the GPU workers read of a :class:`~pipeline.compute.cluster.ClusterSpec`."""

    @property
    def threads_per_worker(self) -> int: ...
    @property
    def memory_limit(self) -> str: ...
    @property
    def cuda_visible_devices(self) -> str | None: ...


def check_cuda_available() -> int:
    """Number of CUDA devices torch can use; a clear :class:`ClusterError` if there are none."""
    import torch

    if torch.version.cuda is None:
        raise ClusterError(
            f"--cluster cuda needs a CUDA build of torch, this one is CPU-only (torch {torch.__version__}); "
            "install a CUDA torch or use --cluster local"
        )
    try:
        n = torch.cuda.device_count()
    except Exception as exc:  # driver problems have many types
        raise ClusterError(
            f"--cluster cuda: CUDA is not usable ({type(exc).__name__}: {one_line(exc)}); use --cluster local"
        ) from None
    if n < 1:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        raise ClusterError(f"--cluster cuda: no CUDA device is visible{where}; use --cluster local")
    return n


def import_dask_cuda() -> Any:
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as exc:  # also: dask_cuda present but cuda-bindings missing
        raise ClusterError(
            f"--cluster cuda needs dask-cuda ({one_line(exc)}); install it with: pip install 'studios[gpu]'"
        ) from None
    return LocalCUDACluster


def start_cuda_cluster(spec: CudaSpec) -> Any:
    """One Dask worker per visible GPU, each advertising a ``GPU`` resource."""
    LocalCUDACluster = import_dask_cuda()
    check_cuda_available()
    kwargs: dict[str, Any] = {
        "threads_per_worker": spec.threads_per_worker,
        "host": "127.0.0.1",
        "dashboard_address": "127.0.0.1:0",
        "resources": {"GPU": 1},
        "memory_limit": spec.memory_limit,
        "silence_logs": logging.WARNING,
    }
    if spec.cuda_visible_devices:
        kwargs["CUDA_VISIBLE_DEVICES"] = spec.cuda_visible_devices
    try:
        return LocalCUDACluster(**kwargs)
    except Exception as exc:  # NVML / CUDA errors have many types
        raise ClusterError(
            f"cannot start GPU workers ({type(exc).__name__}: {one_line(exc)}); "
            "no usable CUDA device? use --cluster local"
        ) from None


def gpu_free_memory() -> list[int]:
    """Free bytes on each visible GPU, without creating a CUDA context in this process if
    NVML (``pynvml``, installed with dask-cuda) is available. Empty if there is no GPU."""
    with contextlib.suppress(Exception):
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            if visible is not None and all(v.strip().isdigit() for v in visible.split(",") if v.strip()):
                indices = [int(v) for v in visible.split(",") if v.strip()]
            else:
                indices = list(range(count))
            return [int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).free)
                    for i in indices if i < count]
        finally:
            pynvml.nvmlShutdown()
    import torch

    if torch.version.cuda is None or not torch.cuda.is_available():
        return []
    return [int(torch.cuda.mem_get_info(i)[0]) for i in range(torch.cuda.device_count())]

