"""What this host gives a run: CPUs, memory of a SLURM allocation, worker process environment.

Standard library only.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

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


def busy_cpus(interval: float = 0.25, stat: Path = Path("/proc/stat")) -> float | None:
    """CPUs that all processes keep busy, measured over the next ``interval`` seconds.

    From the aggregate ``cpu`` line of ``/proc/stat`` (busy = not idle and not waiting on I/O),
    times the CPUs the kernel counts. Unlike the 1-minute load average it does not still count
    a job that ended seconds ago. None where ``stat`` is unreadable or did not advance.
    """

    def sample() -> tuple[int, int] | None:
        try:
            with stat.open() as f:
                fields = f.readline().split()
        except OSError:
            return None
        if not fields or fields[0] != "cpu" or len(fields) < 5:
            return None
        ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
        return sum(ticks), ticks[3] + (ticks[4] if len(ticks) > 4 else 0)

    first = sample()
    if first is None:
        return None
    time.sleep(interval)
    second = sample()
    if second is None or second[0] <= first[0]:
        return None
    total, idle = second[0] - first[0], second[1] - first[1]
    return max(0.0, 1.0 - idle / total) * (os.cpu_count() or 1)


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
