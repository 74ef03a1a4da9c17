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
from pipeline.segment.precision import PRECISIONS, autocast

__all__ = ["PRECISIONS", "NumericsGate", "autocast", "forward", "forward_logits", "numerics", "predict",
           "predict_volume", "quantize", "resolve_device", "softmax_channels", "softmax_classes_last", "to_labels",
           "top2_margin"]


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


def _flags() -> tuple[bool, bool, bool]:
    """(oneDNN, cuDNN TF32, matmul TF32): the process-global flags that ``exact`` turns off."""
    return (bool(torch.backends.mkldnn.enabled), bool(torch.backends.cudnn.allow_tf32),
            bool(torch.backends.cuda.matmul.allow_tf32))


def _set_flags(flags: tuple[bool, bool, bool]) -> None:
    torch.backends.mkldnn.enabled = flags[0]  # type: ignore[assignment]  # a module-level property
    torch.backends.cudnn.allow_tf32 = flags[1]  # type: ignore[assignment]
    torch.backends.cuda.matmul.allow_tf32 = flags[2]


class NumericsGate:
    """Per-process gate around torch's global numerics flags (oneDNN, TF32).

    The flags are process-global, so two threads running blocks with different numerics must
    not interleave: a block in mode ``m`` enters when no block of another mode is running (the
    first one in sets the flags, the last one out restores what it found); blocks of the same
    mode run concurrently. A mode that is waiting blocks newcomers of the running mode, so
    neither mode starves. Re-entering the held mode from the same thread is allowed; switching
    modes while holding the gate is an error (it would deadlock).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._mode: bool | None = None  # exact? of the blocks inside; None when empty
        self._active = 0
        self._waiting = {False: 0, True: 0}
        self._saved: tuple[bool, bool, bool] | None = None
        self._local = threading.local()

    @contextlib.contextmanager
    def hold(self, *, exact: bool) -> Iterator[None]:
        depth: dict[bool, int] = self._local.__dict__.setdefault("depth", {})
        if depth.get(not exact):
            raise RuntimeError("numerics(exact=...) cannot switch modes inside another numerics() block")
        if depth.get(exact):
            depth[exact] += 1
            try:
                yield
            finally:
                depth[exact] -= 1
            return
        self._enter(exact)
        depth[exact] = 1
        try:
            yield
        finally:
            depth[exact] = 0
            self._exit()

    def _enter(self, exact: bool) -> None:
        with self._cond:
            self._waiting[exact] += 1
            while self._active and (self._mode != exact or self._waiting[not exact]):
                self._cond.wait()
            self._waiting[exact] -= 1
            if not self._active:
                self._saved = _flags()
                if exact:
                    _set_flags((False, False, False))
                self._mode = exact
            self._active += 1

    def _exit(self) -> None:
        with self._cond:
            self._active -= 1
            if not self._active:
                if self._saved is not None:
                    _set_flags(self._saved)
                self._mode = self._saved = None
                self._cond.notify_all()


_GATE = NumericsGate()


@contextlib.contextmanager
def numerics(*, exact: bool) -> Iterator[None]:
    """Inference numerics: oneDNN off and no TF32 when ``exact``; inference mode always.

    Thread-safe: goes through the process's :class:`NumericsGate`, so a block with other
    numerics waits until the running ones finish instead of flipping the flags under them.
    """
    with _GATE.hold(exact=exact), torch.inference_mode():
        yield


def predict(
    model: StridefreeModel,
    data: np.ndarray[Any, Any],
    *,
    offset: float,
    scale: float,
    device: torch.device | None = None,
    precision: str = "fp32",
    exact: bool = False,
) -> np.ndarray[Any, np.dtype[np.float32]]:
    """:func:`forward` under the run's :func:`numerics`: what a block (and the seam check) computes.

    Args:
        data: (Z + 2h, Y + 2h, X + 2h) raw intensities of a read box, or (N, ...) equal-shaped boxes.

    Returns:
        (K, Z, Y, X) float32 probabilities (or (N, K, Z, Y, X) for a batch).
    """
    with numerics(exact=exact):
        return forward(model, data, offset=offset, scale=scale, device=device, precision=precision)


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
        data: (Z + 2h, Y + 2h, X + 2h) raw intensities, any numeric dtype; or (N, ...) a batch
            of equal-shaped boxes (the batch axis changes no voxel's arithmetic).
        offset, scale: the global affine normalisation ``(x - offset) * scale``.
        precision: ``fp32`` (default, exact), or ``bf16``/``fp16`` (see :func:`forward_logits`);
            the softmax is always float32.

    Returns:
        (K, Z, Y, X) float32 softmax probabilities on the CPU ((N, K, Z, Y, X) for a batch).
    """
    logits = forward_logits(model, data, offset=offset, scale=scale, device=device, precision=precision)
    probs = softmax_channels(logits).cpu().numpy()
    return probs if data.ndim == 4 else probs[0]


def forward_logits(
    model: StridefreeModel,
    data: np.ndarray[Any, Any],
    *,
    offset: float,
    scale: float,
    device: torch.device | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """Normalise and run the model: ``(N, K, Z, Y, X)`` float32 logits, on ``device``.

    ``data`` as for :func:`forward` (a single box gets N = 1). On the CPU with oneDNN on (not
    exact mode) the model runs channels-last (NDHWC) from a per-process copy of its weights:
    float32 for ``fp32``, bfloat16 for ``bf16`` (weights converted once, activations bf16 from
    the input to the logits, no per-layer casts or layout reorders). The logits come back
    float32, in whatever memory layout the model produced (channels-last on that path).
    Elsewhere ``bf16``/``fp16`` run under ``torch.autocast``.
    """
    device = device or torch.device("cpu")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is unknown here; use one of {', '.join(PRECISIONS)}")
    x = torch.from_numpy(apply_affine(data, offset, scale))
    x = x[:, None] if data.ndim == 4 else x[None, None]
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    elif torch.backends.mkldnn.enabled and precision in ("fp32", "bf16"):  # not in exact mode: its kernels stay
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        fast = _channels_last(model, dtype)
        return fast(x.to(dtype=dtype, memory_format=torch.channels_last_3d)).float()
    with autocast(device, precision):
        logits = model(x)
    return logits.float()


_CHANNELS_LAST: weakref.WeakKeyDictionary[
    torch.nn.Module, dict[torch.dtype, tuple[tuple[int, ...], torch.nn.Module]]
] = weakref.WeakKeyDictionary()
_CHANNELS_LAST_LOCK = threading.Lock()


def _channels_last(model: StridefreeModel, dtype: torch.dtype = torch.float32) -> StridefreeModel:
    """A copy of ``model`` with channels-last (NDHWC) weights in ``dtype``, cached per model,
    dtype and weights version (so a worker converts its weights once, not per block).

    On NCDHW tensors oneDNN reorders each convolution's input and output to its blocked layout
    and back; on NDHWC tensors it runs directly: 1.1-1.5x faster forwards on CPU, results within
    float rounding of the plain layout (bench/flops.py). Used only while oneDNN is on, so exact
    mode keeps its bit-identical kernels. A changed weight (training) rebuilds the copy.
    ``dtype=torch.bfloat16`` also converts the buffers (a filter bank's taps).
    """
    try:
        version = tuple(p._version for p in model.parameters())
    except RuntimeError:  # inference tensors have no version counter (and cannot change)
        version = ()
    with _CHANNELS_LAST_LOCK:
        per_dtype = _CHANNELS_LAST.setdefault(model, {})
        hit = per_dtype.get(dtype)
        if hit is None or hit[0] != version:
            with torch.inference_mode(False), torch.no_grad():
                fast = copy.deepcopy(model).to(dtype=dtype, memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
                fast.requires_grad_(False)
            hit = (version, fast)
            per_dtype[dtype] = hit
        return hit[1]  # type: ignore[return-value]


def softmax_classes_last(logits: torch.Tensor) -> torch.Tensor:
    """Softmax of ``(N, K, Z, Y, X)`` logits as a contiguous ``(N, Z, Y, X, K)`` tensor.

    ``torch.softmax(dim=1)`` vectorises across voxels, so a voxel's result depends on where it
    falls in the SIMD loop (i.e. on the block shape). Moving classes last makes every voxel take
    the same code path, which keeps blockwise probabilities bit-identical. On channels-last
    logits (the CPU fast path) the move is free: they already are classes-last in memory.
    """
    return torch.softmax(logits.permute(0, 2, 3, 4, 1).contiguous(), dim=-1)


def softmax_channels(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the class axis of ``(N, K, Z, Y, X)``, computed voxel by voxel: the
    ``(N, K, Z, Y, X)`` view of :func:`softmax_classes_last`."""
    return softmax_classes_last(logits).permute(0, 4, 1, 2, 3)


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
    padded = np.pad(np.asarray(volume), int(model.halo), mode=PAD_MODE)
    return predict(model, padded, offset=offset, scale=scale, exact=exact)


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
