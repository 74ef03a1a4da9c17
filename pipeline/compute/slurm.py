"""SLURM workers through dask-jobqueue: site-profile options, job scripts, scaling, teardown.

- the job script is checked with ``sbatch --test-only`` first, so a wrong partition, account
  or memory request is one clear error before anything is queued;
- the cluster scales to ``min(workers, jobs the blocks can use)`` jobs (or adapts between the
  ``adapt`` bounds, capped the same way);
- it waits up to ``wait_timeout`` seconds for the first worker; if none connects the error
  names the job ids and their state and reason from ``squeue`` (e.g. ``PENDING (Priority)``);
- every job carries a unique name (``studios-<token>``); after ``SLURMCluster.close()`` any job
  of that name still in ``squeue`` is cancelled with ``scancel``, so no job outlives the run.
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
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from pydantic import ConfigDict, Field, field_validator, model_validator

from pipeline.compute.hosts import worker_environ
from pipeline.core.errors import ClusterError, one_line
from pipeline.core.schema import Bool, Float, Int, Section, Str, validate

logger = logging.getLogger(__name__)

Scalar = Str | Int | Float
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


def _size(value: str | None) -> str | None:
    if value is not None:
        from dask.utils import parse_bytes

        try:
            parse_bytes(value)
        except (ValueError, TypeError):
            raise ValueError(f"{value!r} is not a size; write e.g. '16GB'") from None
    return value


class SlurmOptions(Section):
    """The ``slurm:`` mapping of a site profile: keyword arguments of
    ``dask_jobqueue.SLURMCluster`` (plus ``partition``, another name for ``queue``).

    A key left out (or null) takes dask-jobqueue's default: its configuration
    (``jobqueue.yaml``, see :class:`JobqueueDefaults`), then its built-in value.
    """

    SECTION = "cluster.slurm"

    queue: Str | None = None
    partition: Str | None = None
    account: Str | None = None
    cores: Int | None = Field(None, ge=1)
    memory: Str | None = None
    processes: Int | None = Field(None, ge=1)
    walltime: Str | None = None
    job_cpu: Int | None = Field(None, ge=1)
    job_mem: Str | None = None
    job_name: Str | None = None
    job_extra_directives: tuple[Scalar, ...] | None = None
    job_directives_skip: tuple[Scalar, ...] | None = None
    job_script_prologue: tuple[Scalar, ...] | None = None
    worker_extra_args: tuple[Scalar, ...] | None = None
    worker_command: Str | None = None
    local_directory: Str | None = None
    log_directory: Str | None = None
    shared_temp_directory: Str | None = None
    interface: Str | None = None
    protocol: Str | None = None
    death_timeout: Float | None = None
    nanny: Bool | None = None
    python: Str | None = None
    shebang: Str | None = None
    scheduler_options: dict[str, Any] | None = None
    silence_logs: Str | Bool | None = None
    config_name: Str | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for key in data:
                if key in _RENAMED:
                    raise ValueError(f"key {key!r} is not accepted; use {_RENAMED[key]}")
                if key not in cls.model_fields:
                    close = difflib.get_close_matches(str(key), cls.model_fields, n=1)
                    hint = f"did you mean {close[0]!r}? " if close else ""
                    raise ValueError(f"unknown key {key!r}; {hint}allowed: {', '.join(cls.model_fields)}")
        return data

    _sizes = field_validator("memory", "job_mem")(_size)

    @field_validator("walltime")
    @classmethod
    def _walltime(cls, value: str | None) -> str | None:
        if value is not None and not _WALLTIME.match(value):
            raise ValueError(f"{value!r} is not a SLURM time; write e.g. '02:00:00'")
        return value

    @model_validator(mode="after")
    def _one_partition(self) -> SlurmOptions:
        if self.queue is not None and self.partition is not None:
            raise ValueError("give 'partition' or 'queue' (the same thing), not both")
        return self

    def kwargs(self) -> dict[str, Any]:
        """The options the profile gave (nulls included), as ``SLURMCluster`` keyword values."""
        out = {}
        for key in type(self).model_fields:
            if key in self.model_fields_set:
                value = getattr(self, key)
                out[key] = list(value) if isinstance(value, tuple) else value
        return out


#: Keys accepted in the ``slurm:`` mapping.
SLURM_OPTIONS = tuple(SlurmOptions.model_fields)


class JobqueueDefaults(Section):
    """The ``jobqueue.slurm`` values of the dask configuration (``jobqueue.yaml``, see
    deploy/slurm/jobqueue.yaml) that studios reads to size and script its jobs."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    SECTION = "dask config jobqueue.slurm"

    cores: Int | None = Field(None, ge=1)
    job_cpu: Int | None = Field(None, ge=1)
    processes: Int | None = Field(None, ge=1)
    memory: Str | None = None
    scheduler_options: dict[str, Any] | None = None
    job_extra_directives: tuple[Scalar, ...] | None = None
    job_script_prologue: tuple[Scalar, ...] | None = None

    _sizes = field_validator("memory")(_size)


def jobqueue_defaults() -> JobqueueDefaults:
    """The site's dask-jobqueue defaults, read from the dask configuration now."""
    import dask

    raw = dask.config.get("jobqueue.slurm", None) or {}
    data = {str(k).replace("-", "_"): v for k, v in dict(raw).items()}
    return validate(JobqueueDefaults, data, "dask config jobqueue.slurm")


class SlurmSpec(Protocol):
    """What the SLURM machinery reads of a :class:`~pipeline.compute.cluster.ClusterSpec`."""

    @property
    def slurm(self) -> SlurmOptions: ...
    @property
    def threads_per_worker(self) -> int: ...
    @property
    def gpus_per_job(self) -> int: ...
    @property
    def adapt(self) -> tuple[int, int] | None: ...
    @property
    def wait_timeout(self) -> float: ...
    @property
    def worker_heap(self) -> str: ...
    def slurm_cores(self) -> int: ...
    def slurm_processes(self) -> int: ...
    def slots_per_job(self) -> int: ...
    def jobs_for(self, tasks: int | None) -> int: ...


def check_sbatch() -> None:
    """``sbatch`` must be on PATH (a SLURM login node)."""
    if shutil.which("sbatch") is None:
        raise ClusterError("--cluster slurm: 'sbatch' is not on PATH; run on a SLURM login node "
                           "(or start one with deploy/slurm/start-local-slurm.sh and export SLURM_CONF)")


def slurm_job_name(spec: SlurmSpec) -> str:
    base = spec.slurm.job_name or "studios"
    return f"{base}-{secrets.token_hex(3)}"


def slurm_kwargs(spec: SlurmSpec, *, job_name: str) -> dict[str, Any]:
    """``SLURMCluster`` keyword arguments for ``spec``.

    ``slurm.cores`` are the CPUs a job books (``job_cpu``); the Dask worker runs
    ``threads_per_worker`` blocks at once per process, each with the rest of the cores as
    torch threads (see :meth:`ClusterSpec.torch_threads`).
    """
    site = jobqueue_defaults()
    kwargs = spec.slurm.kwargs()
    partition = kwargs.pop("partition", None)
    if partition is not None:
        kwargs["queue"] = partition
    processes = spec.slurm_processes()
    kwargs["processes"] = processes
    kwargs["job_cpu"] = spec.slurm_cores()
    kwargs["cores"] = processes * spec.threads_per_worker  # Dask threads per job
    if kwargs.get("memory") is None and site.memory is None:
        kwargs["memory"] = "2GB"
    kwargs["job_name"] = job_name
    kwargs.setdefault("silence_logs", "error")
    scheduler = dict(kwargs.get("scheduler_options") or site.scheduler_options or {})
    scheduler.setdefault("dashboard_address", ":0")  # any free port (8787 is often taken on login nodes)
    kwargs["scheduler_options"] = scheduler
    directives = [str(d) for d in kwargs.get("job_extra_directives") or site.job_extra_directives or []]
    if spec.gpus_per_job and not any(d.startswith(("--gres", "--gpus")) for d in directives):
        directives.append(f"--gres=gpu:{spec.gpus_per_job}")
    kwargs["job_extra_directives"] = directives
    prologue = [str(line) for line in kwargs.get("job_script_prologue") or site.job_script_prologue or []]
    prologue += [f"export {k}={v}" for k, v in worker_environ(spec.worker_heap).items()
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


def start_slurm_cluster(spec: SlurmSpec, *, job_name: str | None = None) -> Any:
    """A ``SLURMCluster`` (no jobs yet) whose job script ``sbatch --test-only`` accepts."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise ClusterError(f"--cluster slurm needs dask-jobqueue ({exc})") from None
    restore_sigint()
    check_sbatch()
    kwargs = slurm_kwargs(spec, job_name=job_name or slurm_job_name(spec))
    try:
        cluster = SLURMCluster(**kwargs)
    except Exception as exc:
        raise ClusterError(
            f"cannot create the SLURM cluster ({type(exc).__name__}: {one_line(exc)}); check the site profile"
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


def scale_slurm(cluster: Any, spec: SlurmSpec, tasks: int | None) -> int:
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


def wait_for_slurm_workers(client: Any, cluster: Any, spec: SlurmSpec, job_name: str) -> None:
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
                logs = spec.slurm.log_directory
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
