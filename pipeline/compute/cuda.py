"""GPU workers: dask-cuda's LocalCUDACluster and block sizes from free GPU memory.

One Dask worker per visible GPU, each advertising the Dask resource ``GPU=1`` (blocks ask for
it, so they run only on GPU workers); :func:`activation_bytes_per_voxel` and
:func:`choose_block` size blocks from free GPU memory (NVML, without a CUDA context here).
``dask_cuda`` is imported only on demand; without it or without a GPU the errors are one line.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import ClusterError, ConfigError, one_line

if TYPE_CHECKING:
    from pipeline.compute.cluster import ClusterSpec

logger = logging.getLogger(__name__)



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


def start_cuda_cluster(spec: ClusterSpec) -> Any:
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


def model_widths(model: Any) -> list[int]:
    """Channel widths of the feature maps a model computes, input first, in layer order.

    Reads ``in_channels``, then ``n_features`` (filter banks) if the model has it, then the
    ``out_channels`` of every layer that has one (``Conv3d``, rotation-invariant convs, ...).
    """
    widths = [int(getattr(model, "in_channels", 1))]
    if getattr(model, "n_features", None):
        widths.append(int(model.n_features))
    for module in model.modules():
        if module is model:
            continue
        out = getattr(module, "out_channels", None)
        if isinstance(out, int) and out > 0:
            widths.append(out)
    return widths


def activation_bytes_per_voxel(
    widths: Sequence[int], *, classes: int, element_bytes: int = 4, overhead: float = 1.5
) -> float:
    """Peak device bytes per voxel of the read box during one block's forward pass.

    Counted: a layer's input and output at once (the widest consecutive pair), one more
    feature map of the widest width (residual sums and activations that are not in place),
    the float32 input, and three float32 copies of the class maps (logits, channels-last copy,
    softmax); all times ``overhead`` for the allocator's rounding and convolution workspaces.

    Args:
        widths: channel widths, input first (:func:`model_widths`).
        classes: K.
        element_bytes: 4 for float32, 2 under bf16/fp16 autocast.
    """
    if not widths:
        raise ValueError("widths must name at least the input channels")
    pairs = max((a + b for a, b in zip(widths, widths[1:], strict=False)), default=widths[0])
    features = (pairs + max(widths)) * element_bytes
    fp32 = (widths[0] + 3 * classes) * 4
    return (features + fp32) * overhead


def choose_block(
    free_bytes: int,
    bytes_per_voxel: float,
    *,
    halo: int,
    chunks: Sequence[int],
    volume: Sequence[int],
    fraction: float = 0.8,
    max_width: int = 1,
    max_tensor_elements: int = 2**31 - 1,
) -> tuple[int, int, int]:
    """The largest near-cubic write block (a multiple of ``chunks`` on each axis) whose read box
    fits in ``fraction`` of ``free_bytes``.

    Grows the shortest edge by one chunk while the read box ``prod(block + 2 halo)`` fits,
    never past the chunk multiple that covers the volume, and keeps every feature map below
    ``max_tensor_elements`` elements (``max_width`` channels; 32-bit indexing in kernels).

    Raises:
        ConfigError: if not even a block of one chunk fits.
    """
    budget = fraction * free_bytes
    chunks = tuple(int(c) for c in chunks)
    limit = tuple(-(-int(v) // c) for v, c in zip(volume, chunks, strict=True))  # chunks covering the volume

    def fits(k: Sequence[int]) -> bool:
        voxels = math.prod(ki * c + 2 * halo for ki, c in zip(k, chunks, strict=True))
        return voxels * bytes_per_voxel <= budget and voxels * max(1, max_width) <= max_tensor_elements

    k = [1, 1, 1]
    if not fits(k):
        need = math.prod(c + 2 * halo for c in chunks) * bytes_per_voxel / fraction
        raise ConfigError(
            f"one block of {'x'.join(map(str, chunks))} voxels (+ halo {halo}) needs about {need / 2**30:.2f} GiB "
            f"of GPU memory, {free_bytes / 2**30:.2f} GiB is free; use smaller --chunks or free the GPU"
        )
    growable = [k[i] < limit[i] for i in range(3)]
    while any(growable):
        # the shortest growable edge; ties go to the last axis (x: contiguous in memory)
        axis = min((i for i in range(3) if growable[i]), key=lambda i: (k[i] * chunks[i], -i))
        trial = list(k)
        trial[axis] += 1
        if fits(trial):
            k = trial
            growable[axis] = k[axis] < limit[axis]
        else:
            growable[axis] = False
    return (k[0] * chunks[0], k[1] * chunks[1], k[2] * chunks[2])


def auto_block(
    model: Any, *, chunks: Sequence[int], volume: Sequence[int], precision: str = "fp32",
    free_bytes: int | None = None,
) -> tuple[int, int, int] | None:
    """Block shape for GPU workers from the smallest free memory of the visible GPUs.

    Returns None when no GPU memory figure is available (the caller keeps its default).
    """
    if free_bytes is None:
        free = gpu_free_memory()
        if not free:
            return None
        free_bytes = min(free)
    widths = model_widths(model)
    element = 2 if precision in ("bf16", "fp16") else 4
    bpv = activation_bytes_per_voxel(widths, classes=int(model.classes), element_bytes=element)
    block = choose_block(free_bytes, bpv, halo=int(model.halo), chunks=chunks, volume=volume,
                         max_width=max(widths))
    logger.info("block %s from %.1f GiB free GPU memory (%.0f bytes/voxel)", block, free_bytes / 2**30, bpv)
    return block
