"""Dask clusters for the blockwise stage: local, existing scheduler, SLURM, CUDA.

:func:`open_client` is a context manager that starts (or connects to) the cluster described by
a :class:`ClusterSpec`, yields a ``distributed.Client`` and tears everything down on exit,
including on errors, Ctrl-C and SIGTERM. ``distributed``, ``dask_jobqueue`` and ``dask_cuda``
are imported only here, on demand.

SLURM (``dask_jobqueue.SLURMCluster``):

- the job script is checked with ``sbatch --test-only`` first, so a wrong partition, account
  or memory request is one clear error before anything is queued;
- the cluster scales to ``min(workers, jobs the blocks can use)`` jobs (or adapts between the
  ``adapt`` bounds, capped the same way);
- it waits up to ``wait_timeout`` seconds for the first worker; if none connects the error
  names the job ids and their state and reason from ``squeue`` (e.g. ``PENDING (Priority)``);
- every job carries a unique name (``studios-<token>``); after ``SLURMCluster.close()`` any job
  of that name still in ``squeue`` is cancelled with ``scancel``, so no job outlives the run.

CUDA (``dask_cuda.LocalCUDACluster``): one worker per visible GPU, each advertising the Dask
resource ``GPU=1`` (blocks ask for it, so they only run on GPU workers), blocks on ``cuda``.
:func:`activation_bytes_per_voxel` and :func:`choose_block` size blocks from free GPU memory.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import ClusterError, ConfigError

logger = logging.getLogger(__name__)

KINDS = ("local", "address", "slurm", "cuda")

#: Keys accepted in the ``slurm:`` mapping (keyword arguments of ``dask_jobqueue.SLURMCluster``,
#: plus ``partition`` as another name for ``queue``), with the type each must have.
SLURM_OPTIONS: dict[str, type | tuple[type, ...]] = {
    "queue": str,
    "partition": str,
    "account": str,
    "cores": int,
    "memory": str,
    "processes": int,
    "walltime": str,
    "job_cpu": int,
    "job_mem": str,
    "job_name": str,
    "job_extra_directives": list,
    "job_directives_skip": list,
    "job_script_prologue": list,
    "worker_extra_args": list,
    "worker_command": str,
    "local_directory": str,
    "log_directory": str,
    "shared_temp_directory": str,
    "interface": str,
    "protocol": str,
    "death_timeout": (int, float),
    "nanny": bool,
    "python": str,
    "shebang": str,
    "scheduler_options": dict,
    "silence_logs": (str, bool),
    "config_name": str,
}
#: Old dask-jobqueue names (they warn) and keys studios sets itself.
_RENAMED = {
    "project": "account",
    "job_extra": "job_extra_directives",
    "env_extra": "job_script_prologue",
    "extra": "worker_extra_args",
    "header_skip": "job_directives_skip",
    "n_workers": "workers (in the cluster section)",
    "gres": "job_extra_directives: ['--gres=gpu:1'] or gpus_per_job",
    "host": "scheduler_options: {host: ...}",
    "dashboard_address": "scheduler_options: {dashboard_address: ...}",
}
_WALLTIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")


def _jobqueue_config(key: str) -> Any:
    """A ``jobqueue.slurm.<key>`` value from the dask configuration (jobqueue.yaml), or None."""
    import dask

    return dask.config.get(f"jobqueue.slurm.{key}", None)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def validate_slurm_options(options: Mapping[str, Any], where: str = "cluster.slurm") -> None:
    """Check the ``slurm:`` mapping of a site profile: known keys, right types, sane values."""
    if not isinstance(options, Mapping):
        raise ConfigError(f"{where}: expected a mapping of SLURMCluster options, got {options!r}")
    for key, value in options.items():
        if key in _RENAMED:
            raise ConfigError(f"{where}: key {key!r} is not accepted; use {_RENAMED[key]}")
        if key not in SLURM_OPTIONS:
            close = difflib.get_close_matches(str(key), SLURM_OPTIONS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}; {hint}allowed: {', '.join(SLURM_OPTIONS)}")
        if value is None:  # null: dask-jobqueue's default (its config, then its built-in)
            continue
        tp = SLURM_OPTIONS[key]
        ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
        if not ok:
            names = " or ".join(t.__name__ for t in (tp if isinstance(tp, tuple) else (tp,)))
            raise ConfigError(f"{where}.{key}: expected {names}, got {value!r}")
        if tp is list and not all(isinstance(v, str | int | float) for v in value):
            raise ConfigError(f"{where}.{key}: expected a list of strings, got {value!r}")
        if tp is int and value < 1:
            raise ConfigError(f"{where}.{key}: must be >= 1, got {value}")
    if options.get("queue") is not None and options.get("partition") is not None:
        raise ConfigError(f"{where}: give 'partition' or 'queue' (the same thing), not both")
    for key in ("memory", "job_mem"):
        if options.get(key) is not None:
            from dask.utils import parse_bytes

            try:
                parse_bytes(options[key])
            except (ValueError, TypeError):
                raise ConfigError(f"{where}.{key}: {options[key]!r} is not a size; write e.g. '16GB'") from None
    if options.get("walltime") is not None and not _WALLTIME.match(options["walltime"]):
        raise ConfigError(f"{where}.walltime: {options['walltime']!r} is not a SLURM time; write e.g. '02:00:00'")


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
                   or _jobqueue_config("job-cpu") or _jobqueue_config("cores") or 1)

    def slurm_processes(self) -> int:
        """Dask worker processes per SLURM job."""
        return int(self.slurm.get("processes") or _jobqueue_config("processes") or 1)

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
        _import_dask_cuda()
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
                job_name = _job_name(spec)
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
    return start_slurm_cluster(spec, job_name=_job_name(spec))


# ---------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------


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
            f"--cluster cuda: CUDA is not usable ({type(exc).__name__}: {_one_line(exc)}); use --cluster local"
        ) from None
    if n < 1:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        raise ClusterError(f"--cluster cuda: no CUDA device is visible{where}; use --cluster local")
    return n


def _import_dask_cuda() -> Any:
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as exc:  # also: dask_cuda present but cuda-bindings missing
        raise ClusterError(
            f"--cluster cuda needs dask-cuda ({_one_line(exc)}); install it with: pip install 'studios[gpu]'"
        ) from None
    return LocalCUDACluster


def start_cuda_cluster(spec: ClusterSpec) -> Any:
    """One Dask worker per visible GPU, each advertising a ``GPU`` resource."""
    LocalCUDACluster = _import_dask_cuda()
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
            f"cannot start GPU workers ({type(exc).__name__}: {_one_line(exc)}); "
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


# ---------------------------------------------------------------------------------------------
# SLURM
# ---------------------------------------------------------------------------------------------


def _job_name(spec: ClusterSpec) -> str:
    base = str(spec.slurm.get("job_name", "studios"))
    return f"{base}-{secrets.token_hex(3)}"


def slurm_kwargs(spec: ClusterSpec, *, job_name: str) -> dict[str, Any]:
    """``SLURMCluster`` keyword arguments for ``spec``.

    ``slurm.cores`` are the CPUs a job books (``job_cpu``); the Dask worker runs
    ``threads_per_worker`` blocks at once per process, each with the rest of the cores as
    torch threads (see :meth:`ClusterSpec.torch_threads`).
    """
    import dask

    kwargs = dict(spec.slurm)
    partition = kwargs.pop("partition", None)
    if partition is not None:
        kwargs["queue"] = partition
    processes = spec.slurm_processes()
    kwargs["processes"] = processes
    kwargs["job_cpu"] = spec.slurm_cores()
    kwargs["cores"] = processes * spec.threads_per_worker  # Dask threads per job
    if kwargs.get("memory") is None and dask.config.get("jobqueue.slurm.memory", None) is None:
        kwargs["memory"] = "2GB"
    kwargs["job_name"] = job_name
    kwargs.setdefault("silence_logs", "error")
    scheduler = dict(kwargs.get("scheduler_options") or dask.config.get("jobqueue.slurm.scheduler-options", None) or {})
    scheduler.setdefault("dashboard_address", ":0")  # any free port (8787 is often taken on login nodes)
    kwargs["scheduler_options"] = scheduler
    directives = [str(d) for d in kwargs.get("job_extra_directives") or
                  dask.config.get("jobqueue.slurm.job-extra-directives", None) or []]
    if spec.gpus_per_job and not any(d.startswith(("--gres", "--gpus")) for d in directives):
        directives.append(f"--gres=gpu:{spec.gpus_per_job}")
    kwargs["job_extra_directives"] = directives
    prologue = [str(line) for line in kwargs.get("job_script_prologue") or
                dask.config.get("jobqueue.slurm.job-script-prologue", None) or []]
    prologue += [f"export {k}={v}" for k, v in worker_environ(spec).items()
                 if not any(line.startswith(f"export {k}=") for line in prologue)]
    kwargs["job_script_prologue"] = prologue
    if spec.gpus_per_job:
        extra = [str(a) for a in kwargs.get("worker_extra_args") or []]
        if "--resources" not in extra:
            extra += ["--resources", f"GPU={spec.gpus_per_job}"]
        kwargs["worker_extra_args"] = extra
    return kwargs


def restore_sigint() -> None:
    """Undo dask-jobqueue's import-time ``signal.signal(SIGINT, lambda *_: sys.exit())``
    (dask_jobqueue/runner.py, 0.9): with it, Ctrl-C ends the run with exit status 0 as if it
    had succeeded. Python's own handler raises KeyboardInterrupt (teardown runs, status 130)."""
    if threading.current_thread() is not threading.main_thread():
        return
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and getattr(handler, "__module__", "").startswith("dask_jobqueue"):
        signal.signal(signal.SIGINT, signal.default_int_handler)


def start_slurm_cluster(spec: ClusterSpec, *, job_name: str | None = None) -> Any:
    """A ``SLURMCluster`` (no jobs yet) whose job script ``sbatch --test-only`` accepts."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise ClusterError(f"--cluster slurm needs dask-jobqueue ({exc})") from None
    restore_sigint()
    preflight(spec)
    kwargs = slurm_kwargs(spec, job_name=job_name or _job_name(spec))
    try:
        cluster = SLURMCluster(**kwargs)
    except Exception as exc:
        raise ClusterError(
            f"cannot create the SLURM cluster ({type(exc).__name__}: {_one_line(exc)}); check the site profile"
        ) from None
    try:
        check_job_script(cluster.job_script())
    except BaseException:
        with contextlib.suppress(Exception):
            cluster.close()
        raise
    return cluster


def check_job_script(script: str) -> None:
    """Ask SLURM whether it would accept ``script`` (``sbatch --test-only``); queue nothing."""
    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="studios-job-", delete=False) as f:
        f.write(script)
        path = f.name
    try:
        r = subprocess.run(["sbatch", "--test-only", path], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ClusterError(f"--cluster slurm: 'sbatch --test-only' failed ({exc}); is slurmctld reachable?") from None
    finally:
        os.unlink(path)
    if r.returncode != 0:
        lines = [ln.strip() for ln in (r.stderr or r.stdout).splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit status {r.returncode}"
        directives = " ".join(ln.removeprefix("#SBATCH ") for ln in script.splitlines() if ln.startswith("#SBATCH"))
        raise ClusterError(f"SLURM rejects the worker job ({reason}); job options: {directives}; fix the site profile")


def scale_slurm(cluster: Any, spec: ClusterSpec, tasks: int | None) -> int:
    """Scale to the jobs the blocks can use, or adapt; returns the (maximum) number of jobs."""
    if spec.adapt is not None:
        useful = math.ceil(max(tasks, 1) / spec.slots_per_job()) if tasks is not None else spec.adapt[1]
        maximum = max(1, min(spec.adapt[1], useful))
        minimum = min(max(1, spec.adapt[0]), maximum)  # >= 1: no tasks are queued while we wait
        cluster.adapt(minimum_jobs=minimum, maximum_jobs=maximum)
        return maximum
    jobs = spec.jobs_for(tasks)
    cluster.scale(jobs=jobs)
    return jobs


def cluster_job_ids(cluster: Any) -> list[str]:
    """SLURM job ids of the jobs a SLURMCluster has submitted (and not closed)."""
    ids = []
    for job in list(getattr(cluster, "workers", {}).values()):
        job_id = getattr(job, "job_id", None)
        if job_id:
            ids.append(str(job_id))
    return ids


def squeue_jobs(*, name: str | None = None, ids: Sequence[str] = ()) -> dict[str, tuple[str, str]]:
    """``{job id: (state, reason)}`` from ``squeue`` for a job name or ids; {} if squeue fails."""
    cmd = ["squeue", "-h", "-o", "%i|%T|%r"]
    if name:
        cmd += ["--name", name]
    if ids:
        cmd += ["--jobs", ",".join(ids)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    jobs = {}
    for line in r.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            jobs[parts[0]] = (parts[1], parts[2])
    return jobs


#: squeue states of a job that still holds (or waits for) resources and was not told to stop.
ACTIVE_STATES = frozenset({
    "PENDING", "CONFIGURING", "RUNNING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
    "RESIZING", "SIGNALING", "STOPPED", "RESV_DEL_HOLD",
})


def cancel_jobs_named(name: str, *, grace: float = 2.0, wait: float = 10.0) -> list[str]:
    """``scancel`` every job called ``name`` that is still active after ``grace`` seconds
    (``SLURMCluster.close`` has just cancelled them: they are normally COMPLETING or gone).

    Returns the ids that had to be cancelled here.
    """
    deadline = time.monotonic() + grace
    left = {i: st for i, (st, _) in squeue_jobs(name=name).items() if st in ACTIVE_STATES}
    while left and time.monotonic() < deadline:
        time.sleep(0.25)
        left = {i: st for i, (st, _) in squeue_jobs(name=name).items() if st in ACTIVE_STATES}
    if not left:
        return []
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(["scancel", *left], capture_output=True, timeout=30, check=False)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and squeue_jobs(name=name):
        time.sleep(0.25)
    return sorted(left)


def _n_workers(client: Any) -> int:
    try:
        return len(client.scheduler_info(n_workers=-1)["workers"])
    except TypeError:  # older distributed
        return len(client.scheduler_info()["workers"])


def wait_for_slurm_workers(client: Any, cluster: Any, spec: ClusterSpec, job_name: str) -> None:
    """Wait until one worker has connected; otherwise say why, from ``squeue``.

    Fails early (without waiting for the whole timeout) when every submitted job has left the
    queue without a worker connecting (the job script crashed: look at its log).
    """
    t0 = time.monotonic()
    deadline = t0 + spec.wait_timeout
    gone_since: float | None = None
    while True:
        if _n_workers(client) >= 1:
            logger.info("SLURM: first worker after %.1fs", time.monotonic() - t0)
            return
        now = time.monotonic()
        ids = cluster_job_ids(cluster)
        queued = squeue_jobs(name=job_name)
        if ids and not queued:
            gone_since = gone_since or now
            if now - gone_since > 5.0:
                logs = spec.slurm.get("log_directory")
                where = f" in {logs}" if logs else " (slurm-<id>.out in the submit directory)"
                raise ClusterError(
                    f"SLURM job(s) {', '.join(ids)} ended before a Dask worker connected; see the job log{where}; "
                    "is the Python environment visible on the compute nodes, and can they reach this host "
                    "(slurm.scheduler_options.host / slurm.interface)?"
                )
        else:
            gone_since = None
        if now >= deadline:
            states = "; ".join(f"job {i} {s} ({r})" for i, (s, r) in sorted(queued.items())) or \
                f"job(s) {', '.join(ids) or '(none submitted)'} not in squeue"
            raise ClusterError(
                f"no Dask worker started within {spec.wait_timeout:g}s: {states}; check partition, account, "
                "memory and walltime in the site profile, or raise cluster.wait_timeout"
            )
        time.sleep(0.5)
