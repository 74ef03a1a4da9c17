"""What this host gives a run: CPUs, memory of a SLURM allocation, worker process environment.

Standard library only.
"""

from __future__ import annotations

import os

#: glibc malloc settings for ``worker_heap: retain``: one arena, no mmap for large blocks, never
#: trim. A block's tensors (hundreds of MiB) are then reused from the heap instead of being
#: mmap-ed, page-faulted and unmapped per block (measured in bench/throughput.py --heap).
RETAIN_HEAP_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}


def cpu_count() -> int:
    """CPUs this process may use: its affinity mask, capped by a SLURM allocation if inside one.

    With ``TaskPlugin=task/none`` (no cgroups) the affinity mask is the whole node, so the
    allocation's ``SLURM_CPUS_PER_TASK`` (or ``SLURM_CPUS_ON_NODE``) is the real budget.
    """
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        n = os.cpu_count() or 1
    if os.environ.get("SLURM_JOB_ID"):
        for var in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
            value = os.environ.get(var, "")
            if value.isdigit() and int(value) > 0:
                return min(n, int(value))
    return n


def allocation_memory() -> int | None:
    """Bytes of memory of the SLURM allocation this process runs in (``--mem``), if any."""
    if not os.environ.get("SLURM_JOB_ID"):
        return None
    mb = os.environ.get("SLURM_MEM_PER_NODE", "")
    if mb.isdigit() and int(mb) > 0:
        return int(mb) * 1024 * 1024
    per_cpu = os.environ.get("SLURM_MEM_PER_CPU", "")
    if per_cpu.isdigit() and int(per_cpu) > 0:
        return int(per_cpu) * 1024 * 1024 * cpu_count()
    return None


def worker_environ(worker_heap: str) -> dict[str, str]:
    """Environment a worker process must start with (before Python) for ``worker_heap``
    (``retain`` or ``glibc``, see :class:`~pipeline.compute.cluster.ClusterSpec`)."""
    return dict(RETAIN_HEAP_ENV) if worker_heap == "retain" else {}
