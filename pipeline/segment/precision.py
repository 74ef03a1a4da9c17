"""Model arithmetic: the ``precision`` names, CPU bf16 detection and what ``auto`` resolves to.

``fp32`` is the reference arithmetic. ``bf16`` runs the model in bfloat16: on the CPU a
bfloat16, channels-last copy of the model (weights converted once per worker process, see
:func:`pipeline.segment.predict.forward`); on GPUs ``torch.autocast``. ``fp16`` is autocast
(GPUs). ``auto`` picks ``bf16`` for CPU blocks on a CPU with a bf16 matrix or dot-product
unit (AMX-BF16 or AVX512-BF16) and ``fp32`` everywhere else; ``exact`` always means ``fp32``.
``fp32`` stays the default: the bf16 label agreement measured in docs/exactness.md missed the
criterion (99.95 % of voxels, 0.05 percentage points per class) on one real scan.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch

from pipeline.core.errors import ConfigError, InputError

#: concrete precisions and the dtype the model runs in (None: plain float32).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: what ``--precision`` accepts: ``auto`` and the concrete ones.
PRECISION_CHOICES: tuple[str, ...] = ("auto", *PRECISIONS)
#: CPU flags (``/proc/cpuinfo``) of units that run bf16 products natively, best first.
BF16_FLAGS: tuple[str, ...] = ("amx_bf16", "avx512_bf16")


def _cpuinfo_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    from pathlib import Path

    from pipeline.core.blas import cpu_flags

    return cpu_flags(Path(path))


def _torch_bf16_units() -> list[str]:
    """What torch's own CPU probe reports (its private helpers; absent in some versions)."""
    found = []
    cpu = getattr(torch, "cpu", None)
    for name, probe in (("amx_bf16", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported")):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and fn():
                found.append(name)
        except Exception:  # a probe that fails says nothing
            pass
    return found


@functools.cache
def bf16_unit() -> str | None:
    """The CPU's native bf16 unit, ``"amx_bf16"`` or ``"avx512_bf16"``, or None.

    From the kernel's CPU flags and torch's CPU probe (either suffices: a hypervisor may hide
    flags from one of them). Without such a unit oneDNN emulates bf16 and a bf16 forward is
    many times slower than fp32 (docs/performance.md), so ``auto`` stays fp32 there.
    """
    flags = _cpuinfo_flags() | set(_torch_bf16_units())
    return next((f for f in BF16_FLAGS if f in flags), None)


def cpu_facts() -> dict[str, Any]:
    """CPU numerics facts for logs and benchmarks: torch's capability and the bf16 unit."""
    return {"torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "bf16_unit": bf16_unit()}


def check_precision(precision: str) -> None:
    if precision not in PRECISION_CHOICES:
        raise ConfigError(f"precision {precision!r} is unknown; use one of {', '.join(PRECISION_CHOICES)}")


def resolve_precision(precision: str, device: str | torch.device = "cpu", *, exact: bool = False) -> str:
    """The concrete precision a run uses.

    ``exact`` forces ``fp32`` (``auto`` with ``exact`` is ``fp32``; an explicit ``bf16``/``fp16``
    with ``exact`` is an :class:`InputError`). ``auto`` is ``bf16`` for CPU blocks when
    :func:`bf16_unit` finds one, else ``fp32`` (GPUs included: their low precisions stay opt-in).
    """
    check_precision(precision)
    if exact:
        if precision not in ("auto", "fp32"):
            raise InputError(f"exact=True needs precision fp32, not {precision}; drop --exact or --precision")
        return "fp32"
    if precision != "auto":
        return precision
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    return "bf16" if kind == "cpu" and bf16_unit() else "fp32"


def autocast(device: torch.device, precision: str = "fp32") -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` for ``bf16``/``fp16`` on ``device``; nothing for ``fp32``."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is unknown here; resolve it first (one of {', '.join(PRECISIONS)})")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
