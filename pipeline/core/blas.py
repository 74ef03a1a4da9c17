"""One MKL code path per process, so ``--exact`` is bit-identical on every x86 CPU.

In exact mode the convolutions run through MKL's GEMM (oneDNN is off). Left to choose, MKL's
dispatcher picks kernels by problem size on some CPUs: measured on an AMD EPYC (AVX2, MKL
2024.2 in the torch 2.13 wheel), a block's logits differed from the whole-volume pass by one
float32 ulp in 11 of 16 exactness cases, and by none once MKL was pinned to its AVX2 path
(``MKL_CBWR=AVX2``, MKL's Conditional Numerical Reproducibility). :func:`pin_mkl_code_path`
sets ``MKL_CBWR`` to the widest path the CPU has (``AVX512`` or ``AVX2``) unless the user set it;
MKL reads it at its first call, so this runs when :mod:`pipeline` is imported, before any
computation (torch itself may already be imported). The cost is nil for the default numerics
(oneDNN does the convolutions there) and a pinned, not a slower, path for the exact ones.
"""

from __future__ import annotations

import os
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The first processor's feature flags (Linux; empty elsewhere or when unreadable)."""
    try:
        with cpuinfo.open() as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def mkl_code_path(flags: frozenset[str]) -> str | None:
    """``"AVX512"`` with AVX-512 F, ``"AVX2"`` with AVX2, else ``None`` (leave MKL alone)."""
    if "avx512f" in flags:
        return "AVX512"
    if "avx2" in flags:
        return "AVX2"
    return None


def pin_mkl_code_path(environ: dict[str, str] | None = None, cpuinfo: Path = CPUINFO) -> str | None:
    """Set ``MKL_CBWR`` for this process (and the workers it starts) unless already set; its value."""
    env = os.environ if environ is None else environ
    if "MKL_CBWR" in env:
        return env["MKL_CBWR"]
    path = mkl_code_path(cpu_flags(cpuinfo))
    if path is not None:
        env["MKL_CBWR"] = path
    return path


__all__ = ["cpu_flags", "mkl_code_path", "pin_mkl_code_path"]
