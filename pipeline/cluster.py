"""Dask clusters for the blockwise stage: local, existing scheduler, SLURM, CUDA.

:func:`open_client` is a context manager that starts (or connects to) the cluster described by
a :class:`ClusterSpec`, yields a ``distributed.Client`` and tears everything down on exit,
including on errors and Ctrl-C (SLURM jobs are cancelled by ``SLURMCluster.close``).
``distributed``, ``dask_jobqueue`` and ``dask_cuda`` are imported only here, on demand.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import ClusterError, ConfigError

logger = logging.getLogger(__name__)

KINDS = ("local", "address", "slurm", "cuda")


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ClusterSpec:
    """Where blocks run.

    Attributes:
        kind: ``local`` (LocalCluster in-process), ``address`` (existing scheduler),
            ``slurm`` (dask-jobqueue SLURMCluster), ``cuda`` (dask-cuda LocalCUDACluster).
        workers: worker processes (local), or SLURM jobs to start.
        threads_per_worker: Dask threads per worker (blocks run concurrently per worker).
        address: scheduler address for ``address``.
        memory_limit: per worker, e.g. ``"8GB"`` or ``"auto"``.
        slurm: keyword arguments for ``SLURMCluster`` (queue, account, cores, memory, ...).
        adapt: for SLURM, ``(minimum, maximum)`` jobs to adapt between instead of a fixed scale.
    """

    kind: str = "local"
    workers: int = 1
    threads_per_worker: int = 1
    address: str | None = None
    memory_limit: str = "auto"
    slurm: Mapping[str, Any] = field(default_factory=dict)
    adapt: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"cluster kind {self.kind!r} is unknown; use one of {', '.join(KINDS)}")
        if self.workers < 1 or self.threads_per_worker < 1:
            raise ConfigError("workers and threads per worker must be >= 1")
        if self.kind == "address" and not self.address:
            raise ConfigError("cluster kind 'address' needs a scheduler address (--scheduler tcp://HOST:PORT)")

    def torch_threads(self) -> int:
        """Intra-op threads per block so that all concurrent blocks share the cores."""
        if self.kind == "local":
            return max(1, cpu_count() // (self.workers * self.threads_per_worker))
        if self.kind == "slurm":
            cores = int(self.slurm.get("cores", 1))
            processes = int(self.slurm.get("processes", 1))
            return max(1, cores // processes // self.threads_per_worker)
        return 0  # leave torch's default (existing scheduler / GPU workers)

    @property
    def resources(self) -> dict[str, float] | None:
        return {"GPU": 1} if self.kind == "cuda" else None


@contextlib.contextmanager
def open_client(spec: ClusterSpec) -> Iterator[Any]:
    """Start or connect to the cluster, yield a Client, and always tear it down."""
    from distributed import Client

    cluster: Any = None
    client: Any = None
    try:
        if spec.kind == "address":
            try:
                client = Client(spec.address, timeout="10s")
            except (OSError, TimeoutError) as exc:
                raise ClusterError(f"cannot reach the Dask scheduler at {spec.address} ({exc}); is it running?") from None
        else:
            cluster = _start_cluster(spec)
            client = Client(cluster)
            if spec.kind == "slurm":
                _scale_slurm(cluster, client, spec)
        logger.info("dask cluster %s, dashboard %s", spec.kind, getattr(client, "dashboard_link", "-"))
        yield client
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.close()


def _start_cluster(spec: ClusterSpec) -> Any:
    if spec.kind == "local":
        from distributed import LocalCluster

        return LocalCluster(
            n_workers=spec.workers,
            threads_per_worker=spec.threads_per_worker,
            processes=True,
            memory_limit=spec.memory_limit,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            silence_logs=logging.WARNING,
        )
    if spec.kind == "cuda":
        return start_cuda_cluster(spec)
    return start_slurm_cluster(spec)


def start_cuda_cluster(spec: ClusterSpec) -> Any:
    """One Dask worker per visible GPU, each advertising a ``GPU`` resource."""
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as exc:
        raise ClusterError(f"--cluster cuda needs dask-cuda ({exc}); install with: pip install 'studios[gpu]'") from None
    try:
        return LocalCUDACluster(
            threads_per_worker=spec.threads_per_worker,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            resources={"GPU": 1},
            silence_logs=logging.WARNING,
        )
    except Exception as exc:  # NVML / CUDA errors have many types
        raise ClusterError(f"cannot start GPU workers ({type(exc).__name__}: {exc}); no usable CUDA device? use --cluster local") from None


def start_slurm_cluster(spec: ClusterSpec) -> Any:
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise ClusterError(f"--cluster slurm needs dask-jobqueue ({exc})") from None
    kwargs = dict(spec.slurm)
    kwargs.setdefault("cores", 1)
    kwargs.setdefault("memory", "2GB")
    kwargs.setdefault("processes", 1)
    try:
        return SLURMCluster(**kwargs)
    except Exception as exc:
        raise ClusterError(f"cannot create the SLURM cluster ({type(exc).__name__}: {exc}); check the site profile") from None


def _scale_slurm(cluster: Any, client: Any, spec: ClusterSpec) -> None:
    if spec.adapt is not None:
        cluster.adapt(minimum_jobs=spec.adapt[0], maximum_jobs=spec.adapt[1])
    else:
        cluster.scale(jobs=spec.workers)
