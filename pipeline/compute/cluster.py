"""Dask clusters for the blockwise stage: local, existing scheduler, SLURM, CUDA.

:class:`ClusterSpec` (a frozen pydantic model, parsed once from a site profile's ``cluster:``
section by :func:`cluster_spec_from_file` or from a run profile) says where blocks run.
:func:`open_client` is a context manager that starts (or connects to) that cluster, yields a
``distributed.Client`` and tears everything down on exit, including on errors, Ctrl-C and
SIGTERM. The SLURM machinery lives in :mod:`pipeline.compute.slurm`, the GPU machinery in
:mod:`pipeline.compute.cuda`, host resources in :mod:`pipeline.compute.hosts`; they do not
import this module. ``distributed``, ``dask_jobqueue`` and ``dask_cuda`` are imported only on
demand, and so is :mod:`pipeline.compute.cuda` (it loads torch for its block sizing), so that
this module, and the run profiles built on it, import without torch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.compute.hosts import allocation_memory, cpu_count, worker_environ
from pipeline.compute.slurm import (
    SlurmOptions,
    cancel_jobs_named,
    check_sbatch,
    jobqueue_defaults,
    scale_slurm,
    slurm_job_name,
    start_slurm_cluster,
    wait_for_slurm_workers,
)
from pipeline.core.errors import ClusterError
from pipeline.core.schema import Float, Int, Pair, Section, Str, load_yaml, validate

logger = logging.getLogger(__name__)

KINDS = ("local", "address", "slurm", "cuda")


@contextlib.contextmanager
def _pre_spawn_environ(spec: ClusterSpec) -> Iterator[None]:
    """Nannies created inside this block spawn their workers with :func:`worker_environ`.

    ``distributed.nanny.pre-spawn-environ`` is read when a Nanny is created and kept for its
    restarts, so the setting also holds for workers restarted after a stuck block. A Nanny
    copies it into this process's ``os.environ`` before spawning (and prefers values already
    there, so they are set too); the previous values are put back on exit so that later
    subprocesses of the driver do not inherit them.
    """
    import dask

    extra = worker_environ(spec.worker_heap)
    if not extra:
        yield
        return
    merged = {**dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {}), **extra}
    saved = {key: os.environ.get(key) for key in merged}
    try:
        # distributed lets a variable already in os.environ win over the config value, and an
        # earlier Nanny of this process leaves its own there (MALLOC_TRIM_THRESHOLD_=65536)
        os.environ.update(extra)
        with dask.config.set({"distributed.nanny.pre-spawn-environ": merged}):
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class ClusterSpec(Section):
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
        slurm: ``SLURMCluster`` options (:class:`~pipeline.compute.slurm.SlurmOptions`):
            ``partition``/``queue``, ``account``, ``cores`` (CPUs per job), ``memory`` (per job),
            ``walltime``, ``processes`` (workers per job), ``job_extra_directives``,
            ``local_directory``, ``interface``, ``scheduler_options``, ``worker_extra_args``, ...
        adapt: for SLURM, ``(minimum, maximum)`` jobs to adapt between instead of a fixed scale.
        wait_timeout: seconds to wait for the first worker (SLURM jobs may queue).
        gpus_per_job: SLURM only, 0 or 1: request ``--gres=gpu:1`` per job, advertise a ``GPU``
            resource on its worker and run blocks on ``cuda``.
        cuda_visible_devices: CUDA only, e.g. ``"0,1"``: the GPUs to start workers on
            (default: all visible ones).
        worker_heap: ``retain`` (default): worker processes start with glibc settings that keep
            freed memory for reuse (:data:`~pipeline.compute.hosts.RETAIN_HEAP_ENV`), so each
            block's arrays land in the pages of the last one instead of faulting fresh pages in;
            a worker's resident size then stays at its peak (one block's working set).
            ``glibc``: dask's default (memory above 64 KiB is returned to the system at once).
    """

    SECTION = "cluster"

    kind: Literal["local", "address", "slurm", "cuda"] = "local"
    workers: Int = Field(1, ge=1)
    threads_per_worker: Int = Field(1, ge=1)
    address: Str | None = None
    memory_limit: Str = "auto"
    slurm: SlurmOptions = Field(default_factory=SlurmOptions)
    adapt: Pair | None = None
    wait_timeout: Float = Field(300.0, gt=0)
    gpus_per_job: Int = 0
    cuda_visible_devices: Str | None = None
    worker_heap: Literal["retain", "glibc"] = "retain"

    @field_validator("adapt")
    @classmethod
    def _adapt(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not (0 <= value[0] <= value[1] and value[1] >= 1):
            raise ValueError(f"expected [minimum, maximum] jobs with 0 <= minimum <= maximum, maximum >= 1; "
                             f"got {list(value)}")
        return value

    @field_validator("gpus_per_job")
    @classmethod
    def _gpus(cls, value: int) -> int:
        if value not in (0, 1):
            raise ValueError(f"use 0 or 1 (one GPU per job; ask for more jobs instead), got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ClusterSpec:
        if self.kind == "address" and not self.address:
            raise ValueError("cluster kind 'address' needs a scheduler address (--scheduler tcp://HOST:PORT)")
        if self.gpus_per_job and self.slurm_processes() != 1:
            raise ValueError("gpus_per_job: a GPU job runs one worker process; set slurm.processes: 1")
        return self

    # -- sizes -------------------------------------------------------------------------------
    def slurm_cores(self) -> int:
        """SLURM CPUs per job (``--cpus-per-task``): the profile's ``job_cpu`` or ``cores``, else
        dask-jobqueue's configuration (``jobqueue.slurm.job-cpu`` / ``cores``), else 1."""
        site = jobqueue_defaults()
        return int(self.slurm.job_cpu or self.slurm.cores or site.job_cpu or site.cores or 1)

    def slurm_processes(self) -> int:
        """Dask worker processes per SLURM job."""
        return int(self.slurm.processes or jobqueue_defaults().processes or 1)

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
        from pipeline.compute.cuda import check_cuda_available, import_dask_cuda

        import_dask_cuda()
        check_cuda_available()
    elif spec.kind == "slurm":
        check_sbatch()


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
        from pipeline.compute.cuda import start_cuda_cluster

        with _pre_spawn_environ(spec):
            return start_cuda_cluster(spec)
    return start_slurm_cluster(spec, job_name=slurm_job_name(spec))


def cluster_spec_from_file(
    path: str | os.PathLike[str], *, kind: str | None = None, workers: int | None = None
) -> ClusterSpec:
    """The ``cluster:`` section of a site profile (e.g. configs/slurm-site.yaml).

    ``kind``/``workers`` from the command line override the file when given (``local`` and
    ``1`` are the command line's defaults and do not).
    """
    data = load_yaml(path)
    section = data.get("cluster")
    if section is not None and not isinstance(section, dict):
        return validate(ClusterSpec, section, f"{path}: cluster")  # the error names the section
    section = dict(section or {})
    if kind and kind != "local":
        section["kind"] = kind
    if workers and workers != 1:
        section["workers"] = workers
    return validate(ClusterSpec, section, f"{path}: cluster")
