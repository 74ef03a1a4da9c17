"""Predict one block, and the whole-volume reference it must equal.

Border rule (the same for blocks and for the reference): the volume is extended by
replicating its edge voxels (``numpy.pad(mode="edge")``). A block reads the part of its read
box that lies inside the volume and pads only where the read box crosses the true volume
border; interior blocks are never padded. Normalisation uses the scan's global statistics
(an elementwise affine map), and the model is a valid operator, so every output voxel sees
exactly the same input values whichever block computes it.

Floating point: with oneDNN convolutions (torch's CPU default) the summation order depends
on the tensor shape, so probabilities from different block shapes differ by ~1e-7 and a label
can flip where the top two classes are within that margin. ``exact=True`` disables oneDNN and
makes blockwise output bit-identical to the reference (slower); see docs/exactness.md.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from pipeline.core.errors import ConfigError
from pipeline.core.normalize import apply_affine
from pipeline.io.store import PAD_MODE
from pipeline.models.base import StridefreeModel

#: ``precision`` names and the autocast dtype they run the model under (None: plain float32).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "cpu") -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not valid; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but no CUDA device is available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not supported; use cpu, cuda, cuda:N or auto")
    return device


@contextlib.contextmanager
def numerics(*, exact: bool) -> Iterator[None]:
    """Inference numerics: oneDNN off and no TF32 when ``exact``; inference mode always."""
    saved = torch.backends.mkldnn.enabled
    saved_tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        if exact:
            torch.backends.mkldnn.enabled = False
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        with torch.inference_mode():
            yield
    finally:
        torch.backends.mkldnn.enabled = saved
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved_tf32


def autocast(device: torch.device, precision: str = "fp32") -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` for ``bf16``/``fp16`` on ``device``; nothing for ``fp32``."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is unknown; use one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)



def forward(
    model: StridefreeModel,
    data: np.ndarray[Any, Any],
    *,
    offset: float,
    scale: float,
    device: torch.device | None = None,
    precision: str = "fp32",
) -> np.ndarray[Any, np.dtype[np.float32]]:
    """Normalise and predict class probabilities.

    Args:
        data: (Z + 2h, Y + 2h, X + 2h) raw intensities, any numeric dtype.
        offset, scale: the global affine normalisation ``(x - offset) * scale``.
        precision: ``fp32`` (default, exact), or ``bf16``/``fp16``: the model runs under
            ``torch.autocast`` and the softmax in float32 (see docs/gpu.md for the deviation).

    Returns:
        (K, Z, Y, X) float32 softmax probabilities on the CPU.
    """
    device = device or torch.device("cpu")
    x = torch.from_numpy(apply_affine(data, offset, scale))[None, None]
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    elif torch.backends.mkldnn.enabled and precision == "fp32":  # not in exact mode: its kernels stay
        model = _channels_last(model)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    with autocast(device, precision):
        logits = model(x)
    if precision != "fp32":
        logits = logits.float()
    return softmax_channels(logits)[0].float().cpu().numpy()


_CHANNELS_LAST: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple[int, ...], torch.nn.Module]] = (
    weakref.WeakKeyDictionary()
)
_CHANNELS_LAST_LOCK = threading.Lock()


def _channels_last(model: StridefreeModel) -> StridefreeModel:
    """A copy of ``model`` with channels-last (NDHWC) weights, cached per model and weights version.

    On NCDHW tensors oneDNN reorders each convolution's input and output to its blocked layout
    and back; on NDHWC tensors it runs directly: 1.1-1.5x faster forwards on CPU, results within
    float rounding of the plain layout (bench/flops.py). Used only while oneDNN is on, so exact
    mode keeps its bit-identical kernels. A changed weight (training) rebuilds the copy.
    """
    try:
        version = tuple(p._version for p in model.parameters())
    except RuntimeError:  # inference tensors have no version counter (and cannot change)
        version = ()
    with _CHANNELS_LAST_LOCK:
        hit = _CHANNELS_LAST.get(model)
        if hit is None or hit[0] != version:
            with torch.inference_mode(False), torch.no_grad():
                fast = copy.deepcopy(model).to(memory_format=torch.channels_last_3d).requires_grad_(False)
            hit = (version, fast)
            _CHANNELS_LAST[model] = hit
        return hit[1]  # type: ignore[return-value]


def softmax_channels(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the class axis of ``(N, K, Z, Y, X)``, computed voxel by voxel.

    ``torch.softmax(dim=1)`` vectorises across voxels, so a voxel's result depends on where it
    falls in the SIMD loop (i.e. on the block shape). Moving classes last makes every voxel take
    the same code path, which keeps blockwise probabilities bit-identical.
    """
    moved = logits.permute(0, 2, 3, 4, 1).contiguous()
    return torch.softmax(moved, dim=-1).permute(0, 4, 1, 2, 3)


def predict_volume(
    model: StridefreeModel,
    volume: np.ndarray[Any, Any],
    *,
    offset: float,
    scale: float,
    exact: bool = False,
) -> np.ndarray[Any, np.dtype[np.float32]]:
    """Whole-volume reference: pad the volume by the halo (edge rule), one forward pass.

    Args:
        volume: (Z, Y, X) raw intensities.

    Returns:
        (K, Z, Y, X) float32 probabilities.
    """
    padded = np.pad(volume, model.halo, mode=PAD_MODE)
    with numerics(exact=exact):
        return forward(model, padded, offset=offset, scale=scale)


def to_labels(probs: np.ndarray[Any, Any]) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """(K, Z, Y, X) probabilities -> (Z, Y, X) uint8 labels 1..K (argmax + 1)."""
    return (np.argmax(probs, axis=0) + 1).astype(np.uint8)


def quantize(probs: np.ndarray[Any, Any]) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """Probabilities in [0, 1] -> uint8 ``round(255 p)``."""
    return np.rint(np.clip(probs, 0.0, 1.0) * 255.0).astype(np.uint8)


def top2_margin(probs: np.ndarray[Any, Any]) -> np.ndarray[Any, np.dtype[np.float32]]:
    """(K, Z, Y, X) -> (Z, Y, X) difference between the two largest probabilities."""
    if probs.shape[0] < 2:
        return np.ones(probs.shape[1:], dtype=np.float32)
    part = np.partition(probs, -2, axis=0)
    return (part[-1] - part[-2]).astype(np.float32)
