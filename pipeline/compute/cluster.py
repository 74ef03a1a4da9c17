"""Dask clusters for the blockwise stage: local, existing scheduler, SLURM, CUDA.

:func:`open_client` is a context manager that starts (or connects to) the cluster described by
a :class:`ClusterSpec`, yields a ``distributed.Client`` and tears everything down on exit,
including on errors, Ctrl-C and SIGTERM. ``distributed``, ``dask_jobqueue`` and ``dask_cuda``
are imported only on demand. The SLURM machinery (``dask_jobqueue.SLURMCluster``) lives in
:mod:`pipeline.compute.slurm`, the GPU machinery (``dask_cuda.LocalCUDACluster``) in
:mod:`pipeline.compute.cuda`; their public names are re-exported here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.compute.cuda import (
    check_cuda_available,
    gpu_free_memory,
    import_dask_cuda,
    start_cuda_cluster,
)
from pipeline.compute.slurm import (
    SLURM_OPTIONS,
    cancel_jobs_named,
    check_job_script,
    cluster_job_ids,
    jobqueue_config,
    restore_sigint,
    scale_slurm,
    slurm_job_name,
    slurm_kwargs,
    squeue_jobs,
    start_slurm_cluster,
    validate_slurm_options,
    wait_for_slurm_workers,
)
from pipeline.core.errors import ClusterError, ConfigError
from pipeline.core.tiling import choose_block
from pipeline.models.footprint import activation_bytes_per_voxel, model_widths

logger = logging.getLogger(__name__)

KINDS = ("local", "address", "slurm", "cuda")

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


#: glibc malloc settings for ``worker_heap: retain``: one arena, no mmap for large blocks, never
#: trim. A block's tensors (hundreds of MiB) are then reused from the heap instead of being
#: mmap-ed, page-faulted and unmapped per block (measured in bench/throughput.py --heap).
RETAIN_HEAP_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}
WORKER_HEAPS = ("retain", "glibc")


def worker_environ(spec: ClusterSpec) -> dict[str, str]:
    """Environment a worker process must start with (before Python) for ``spec.worker_heap``."""
    return dict(RETAIN_HEAP_ENV) if spec.worker_heap == "retain" else {}


@contextlib.contextmanager
def _pre_spawn_environ(spec: ClusterSpec) -> Iterator[None]:
    """Nannies created inside this block spawn their workers with :func:`worker_environ`.

    ``distributed.nanny.pre-spawn-environ`` is read when a Nanny is created and kept for its
    restarts, so the setting also holds for workers restarted after a stuck block. A Nanny
    copies it into this process's ``os.environ`` before spawning; the previous values are put
    back on exit so that later subprocesses of the driver do not inherit them.
    """
    import dask

    extra = worker_environ(spec)
    if not extra:
        yield
        return
    merged = {**dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {}), **extra}
    saved = {key: os.environ.get(key) for key in merged}
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": merged}):
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass(frozen=True)
class ClusterSpec:
    """Where blocks run.

    Attributes:
        kind: ``local`` (LocalCluster in-process), ``address`` (existing scheduler),
            ``slurm`` (dask-jobqueue SLURMCluster), ``cuda`` (dask-cuda LocalCUDACluster).
        workers: worker processes (local), or the most SLURM jobs to start (fewer when there
            are fewer blocks than job slots). Ignored for ``cuda`` (one worker per GPU).
        threads_per_worker: blocks run at once per worker process; each block gets
            ``cores // (processes * threads_per_worker)`` torch threads.
        address: scheduler address for ``address``.
        memory_limit: per worker, e.g. ``"8GB"`` or ``"auto"`` (local and cuda workers).
        slurm: ``SLURMCluster`` options (see :data:`SLURM_OPTIONS`): ``partition``/``queue``,
            ``account``, ``cores`` (CPUs per job), ``memory`` (per job), ``walltime``,
            ``processes`` (workers per job), ``job_extra_directives``, ``local_directory``,
            ``interface``, ``scheduler_options``, ``worker_extra_args``, ...
        adapt: for SLURM, ``(minimum, maximum)`` jobs to adapt between instead of a fixed scale.
        wait_timeout: seconds to wait for the first worker (SLURM jobs may queue).
        gpus_per_job: SLURM only, 0 or 1: request ``--gres=gpu:1`` per job, advertise a ``GPU``
            resource on its worker and run blocks on ``cuda``.
        cuda_visible_devices: CUDA only, e.g. ``"0,1"``: the GPUs to start workers on
            (default: all visible ones).
        worker_heap: ``retain`` (default): worker processes start with glibc settings that keep
            freed memory for reuse (:data:`RETAIN_HEAP_ENV`), so each block's arrays land in the
            pages of the last one instead of faulting fresh pages in; a worker's resident size
            then stays at its peak (one block's working set). ``glibc``: dask's default
            (memory above 64 KiB is returned to the system at once).
    """

    kind: str = "local"
    workers: int = 1
    threads_per_worker: int = 1
    address: str | None = None
    memory_limit: str = "auto"
    slurm: Mapping[str, Any] = field(default_factory=dict)
    adapt: tuple[int, int] | None = None
    wait_timeout: float = 300.0
    gpus_per_job: int = 0
    cuda_visible_devices: str | None = None
    worker_heap: str = "retain"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"cluster kind {self.kind!r} is unknown; use one of {', '.join(KINDS)}")
        if self.workers < 1 or self.threads_per_worker < 1:
            raise ConfigError("workers and threads per worker must be >= 1")
        if self.kind == "address" and not self.address:
            raise ConfigError("cluster kind 'address' needs a scheduler address (--scheduler tcp://HOST:PORT)")
        validate_slurm_options(self.slurm)
        if self.adapt is not None and (
            len(self.adapt) != 2 or not 0 <= self.adapt[0] <= self.adapt[1] or self.adapt[1] < 1
        ):
            raise ConfigError(f"cluster.adapt: expected [minimum, maximum] jobs with 0 <= minimum <= maximum, "
                              f"maximum >= 1; got {list(self.adapt)}")
        if self.wait_timeout <= 0:
            raise ConfigError(f"cluster.wait_timeout: must be > 0 seconds, got {self.wait_timeout}")
        if self.gpus_per_job not in (0, 1):
            raise ConfigError(f"cluster.gpus_per_job: use 0 or 1 (one GPU per job; ask for more jobs instead), "
                              f"got {self.gpus_per_job}")
        if self.worker_heap not in WORKER_HEAPS:
            raise ConfigError(f"cluster.worker_heap: {self.worker_heap!r} is unknown; use one of "
                              f"{', '.join(WORKER_HEAPS)}")
        if self.gpus_per_job and self.slurm_processes() != 1:
            raise ConfigError("cluster.gpus_per_job: a GPU job runs one worker process; set slurm.processes: 1")

    # -- sizes -------------------------------------------------------------------------------
    def slurm_cores(self) -> int:
        """SLURM CPUs per job (``--cpus-per-task``): the profile's ``job_cpu`` or ``cores``, else
        dask-jobqueue's configuration (``jobqueue.slurm.job-cpu`` / ``cores``), else 1."""
        return int(self.slurm.get("job_cpu") or self.slurm.get("cores")
                   or jobqueue_config("job-cpu") or jobqueue_config("cores") or 1)

    def slurm_processes(self) -> int:
        """Dask worker processes per SLURM job."""
        return int(self.slurm.get("processes") or jobqueue_config("processes") or 1)

    def slots_per_job(self) -> int:
        """Blocks one SLURM job runs at once."""
        return self.slurm_processes() * self.threads_per_worker

    def jobs_for(self, tasks: int | None) -> int:
        """SLURM jobs worth starting for ``tasks`` blocks: ``min(workers, ceil(tasks / slots))``."""
        if tasks is None:
            return self.workers
        return max(1, min(self.workers, math.ceil(max(tasks, 1) / self.slots_per_job())))

    def torch_threads(self) -> int:
        """Intra-op threads per block so that all concurrent blocks share the cores."""
        if self.kind == "local":
            return max(1, cpu_count() // (self.workers * self.threads_per_worker))
        if self.kind == "slurm":
            return max(1, self.slurm_cores() // self.slurm_processes() // self.threads_per_worker)
        return 0  # leave torch's default (existing scheduler / GPU workers)

    @property
    def uses_gpu(self) -> bool:
        return self.kind == "cuda" or (self.kind == "slurm" and self.gpus_per_job > 0)

    @property
    def device(self) -> str:
        """The torch device blocks run on when the user does not name one."""
        return "cuda" if self.uses_gpu else "cpu"

    @property
    def resources(self) -> dict[str, float] | None:
        """Dask resources each block asks for: ``{"GPU": 1}`` on GPU workers."""
        return {"GPU": 1} if self.uses_gpu else None


# ---------------------------------------------------------------------------------------------
# open / close
# ---------------------------------------------------------------------------------------------


def preflight(spec: ClusterSpec) -> None:
    """Cheap checks before any output is written: the packages, tools and devices ``spec``
    needs are there. Raises :class:`ClusterError` with the fix."""
    if spec.kind == "cuda":
        import_dask_cuda()
        check_cuda_available()
    elif spec.kind == "slurm" and shutil.which("sbatch") is None:
        raise ClusterError("--cluster slurm: 'sbatch' is not on PATH; run on a SLURM login node "
                           "(or start one with deploy/slurm/start-local-slurm.sh and export SLURM_CONF)")


@contextlib.contextmanager
def open_client(spec: ClusterSpec, *, tasks: int | None = None) -> Iterator[Any]:
    """Start or connect to the cluster, yield a Client, and always tear it down.

    Args:
        spec: the cluster.
        tasks: number of blocks to run; caps the number of SLURM jobs.
    """
    from distributed import Client

    cluster: Any = None
    client: Any = None
    job_name: str | None = None
    with _sigterm_as_interrupt(spec.kind == "slurm"):
        try:
            if spec.kind == "address":
                try:
                    client = Client(spec.address, timeout="10s")
                except (OSError, TimeoutError) as exc:
                    raise ClusterError(
                        f"cannot reach the Dask scheduler at {spec.address} ({exc}); is it running?"
                    ) from None
            elif spec.kind == "slurm":
                job_name = slurm_job_name(spec)
                cluster = start_slurm_cluster(spec, job_name=job_name)
                client = Client(cluster)
                jobs = scale_slurm(cluster, spec, tasks)
                logger.info("SLURM: asked for %d job(s) named %s", jobs, job_name)
                wait_for_slurm_workers(client, cluster, spec, job_name)
            else:
                cluster = _start_cluster(spec)
                client = Client(cluster)
            logger.info("dask cluster %s, dashboard %s", spec.kind, getattr(client, "dashboard_link", "-"))
            yield client
        finally:
            _teardown(client, cluster, job_name)


def _teardown(client: Any, cluster: Any, job_name: str | None) -> None:
    """Close client and cluster; then cancel any SLURM job of this run still queued or running.

    A second Ctrl-C during teardown does not skip the cancellation.
    """
    try:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close(timeout=10)
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.close(timeout=30)
    finally:
        if job_name is not None:
            leftover = cancel_jobs_named(job_name)
            if leftover:
                logger.warning("cancelled SLURM job(s) %s left after closing the cluster", ", ".join(leftover))


@contextlib.contextmanager
def _sigterm_as_interrupt(enabled: bool) -> Iterator[None]:
    """While SLURM jobs exist, turn SIGTERM (scancel of the run, Prefect cancellation, kill)
    into KeyboardInterrupt so the ``finally`` clauses cancel the worker jobs."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # pragma: no cover - not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _start_cluster(spec: ClusterSpec) -> Any:
    if spec.kind == "local":
        from distributed import LocalCluster

        memory: Any = spec.memory_limit
        alloc = allocation_memory()
        if memory == "auto" and alloc:
            memory = alloc // spec.workers
        with _pre_spawn_environ(spec):
            return LocalCluster(
                n_workers=spec.workers,
                threads_per_worker=spec.threads_per_worker,
                processes=True,
                memory_limit=memory,
                host="127.0.0.1",
                dashboard_address="127.0.0.1:0",
                silence_logs=logging.WARNING,
            )
    if spec.kind == "cuda":
        with _pre_spawn_environ(spec):
            return start_cuda_cluster(spec)
    return start_slurm_cluster(spec, job_name=slurm_job_name(spec))


__all__ = [
    "KINDS", "RETAIN_HEAP_ENV", "SLURM_OPTIONS", "WORKER_HEAPS", "ClusterSpec", "activation_bytes_per_voxel",
    "allocation_memory", "cancel_jobs_named", "check_cuda_available", "check_job_script",
    "choose_block", "cluster_job_ids", "cpu_count", "gpu_free_memory", "model_widths", "open_client", "preflight",
    "restore_sigint", "scale_slurm", "slurm_kwargs", "squeue_jobs", "start_cuda_cluster", "start_slurm_cluster",
    "validate_slurm_options", "wait_for_slurm_workers", "worker_environ",
]
