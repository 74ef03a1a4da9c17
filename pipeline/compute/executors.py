"""Executors: run one function per block and report what finished and what failed.

- :class:`SerialExecutor` runs blocks in this process (debugging, small tests).
- :class:`DaskExecutor` submits one task per block to a ``distributed.Client`` with a bounded
  number in flight (so 10^5 blocks do not flood the scheduler), bounded retries, and a
  progress report per finished block. Tasks carry coordinates, never arrays.

Both return a :class:`RunOutcome`; a block that failed all its attempts is listed by id with
its last error, and the run goes on with the other blocks.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline.core import interrupt
from pipeline.core.errors import DiskFullError
from pipeline.core.progress import NullReporter, Reporter
from pipeline.core.tiling import Block

logger = logging.getLogger(__name__)

BlockFn = Callable[[Any, Block], dict[str, Any]]


@dataclass
class RunOutcome:
    """What a run produced.

    Attributes:
        results: one dict per finished block (see :func:`pipeline.segment.worker.run_block`).
        failed: block id -> last error (``"Type: message"``).
        tracebacks: block id -> formatted traceback of the last error.
        fatal: set when the run stopped early (disk full): the error message.
        interrupted: the signal that stopped the run early (SIGTERM / SIGINT), else None.
    """

    results: list[dict[str, Any]] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    tracebacks: dict[str, str] = field(default_factory=dict)
    fatal: str | None = None
    seconds: float = 0.0
    interrupted: int | None = None

    def record_failure(self, block: Block, exc: BaseException, tb: Any = None) -> None:
        self.failed[block.id] = f"{type(exc).__name__}: {exc}"
        self.tracebacks[block.id] = "".join(traceback.format_exception(type(exc), exc, tb or exc.__traceback__))
        if isinstance(exc, DiskFullError):
            self.fatal = str(exc)


class Executor(Protocol):
    def run(
        self, fn: BlockFn, job: Any, blocks: Sequence[Block], *, reporter: Reporter | None = None
    ) -> RunOutcome: ...


class SerialExecutor:
    """Run blocks one after another in this process, with the same retry rule."""

    def __init__(self, *, retries: int = 2) -> None:
        self.retries = retries

    def run(self, fn: BlockFn, job: Any, blocks: Sequence[Block], *, reporter: Reporter | None = None) -> RunOutcome:
        reporter = reporter or NullReporter()
        outcome = RunOutcome()
        t0 = time.perf_counter()
        reporter.start("segment", len(blocks))
        for block in blocks:
            if outcome.fatal:
                break
            if (signum := interrupt.requested()) is not None:  # the running block finished; start no more
                outcome.interrupted = signum
                break
            for attempt in range(self.retries + 1):
                try:
                    result = fn(job, block)
                except Exception as exc:
                    logger.info("block %s: attempt %d failed: %s", block.id, attempt + 1, exc)
                    if attempt == self.retries or isinstance(exc, DiskFullError):
                        outcome.record_failure(block, exc)
                        break
                    continue
                outcome.results.append(result)
                reporter.advance(1, voxels=block.write.size)
                break
        reporter.finish()
        outcome.seconds = time.perf_counter() - t0
        return outcome


class DaskExecutor:
    """Submit blocks to a Dask cluster.

    Args:
        client: a connected ``distributed.Client``.
        retries: extra attempts per block, after an exception, a killed worker, or a timeout.
        max_in_flight: tasks submitted ahead of completion; default 4 x total worker threads.
        resources: Dask worker resources each task needs, e.g. ``{"GPU": 1}``.
        timeout: seconds a block may execute (measured from when a worker thread starts it)
            before the attempt is abandoned: the worker holding it is restarted by its nanny
            (a stuck thread cannot be interrupted otherwise) and the block is resubmitted.
            Other blocks running on that worker are rescheduled by Dask. ``None`` waits forever.
        poll: seconds between checks of running tasks.
    """

    def __init__(
        self,
        client: Any,
        *,
        retries: int = 2,
        max_in_flight: int | None = None,
        resources: dict[str, float] | None = None,
        timeout: float | None = None,
        poll: float = 0.5,
    ) -> None:
        self.client = client
        self.retries = retries
        self.max_in_flight = max_in_flight
        self.resources = resources
        self.timeout = timeout
        self.poll = poll

    def _capacity(self) -> int:
        if self.max_in_flight:
            return self.max_in_flight
        client = self.client
        info = client.scheduler_info(n_workers=-1) if _accepts_n_workers(client) else client.scheduler_info()
        threads = sum(w.get("nthreads", 1) for w in info.get("workers", {}).values()) or 1
        return max(4 * threads, 8)

    def run(self, fn: BlockFn, job: Any, blocks: Sequence[Block], *, reporter: Reporter | None = None) -> RunOutcome:
        from distributed import wait

        reporter = reporter or NullReporter()
        outcome = RunOutcome()
        t0 = time.perf_counter()
        reporter.start("segment", len(blocks))
        todo = list(reversed(blocks))
        token = job_token(job)
        active: dict[str, tuple[Any, Block, int]] = {}
        started: dict[str, float] = {}
        capacity = self._capacity()

        def submit(block: Block, attempt: int) -> None:
            key = f"block-{block.id}-{token}" + (f"-t{attempt}" if attempt else "")
            fut = self.client.submit(
                fn, job, block, key=key, retries=self.retries, pure=False, resources=self.resources
            )
            active[fut.key] = (fut, block, attempt)

        stop_at: float | None = None
        while todo or active:
            if stop_at is None and (signum := interrupt.requested()) is not None:
                outcome.interrupted = signum
                todo.clear()  # submit no more; blocks already running get the grace period
                self._cancel_queued(active)
                stop_at = time.monotonic() + interrupt.GRACE_SECONDS
            if stop_at is not None and time.monotonic() > stop_at:
                logger.warning("grace period over: abandoning %d running block(s)", len(active))
                self.client.cancel([f for f, _, _ in active.values()])
                active.clear()
                break
            while todo and len(active) < capacity:
                submit(todo.pop(), 0)
            try:
                done, _ = wait([f for f, _, _ in active.values()], timeout=self.poll, return_when="FIRST_COMPLETED")
            except TimeoutError:
                done = set()
            for fut in done:
                _, block, _attempt = active.pop(fut.key)
                started.pop(fut.key, None)
                try:
                    result = fut.result()
                except Exception as exc:
                    if outcome.interrupted is not None:  # its worker was stopped by the same signal
                        logger.info("block %s: stopped by the interruption: %s", block.id, exc)
                        fut.release()
                        continue
                    logger.info("block %s: failed after %d attempts: %s", block.id, self.retries + 1, exc)
                    outcome.record_failure(block, _explain_worker_death(block, exc, self.retries), fut.traceback())
                    if outcome.fatal:  # disk full: stop instead of failing every block
                        todo.clear()
                else:
                    outcome.results.append(result)
                    reporter.advance(1, voxels=block.write.size)
                fut.release()
            if self.timeout is not None and active and outcome.interrupted is None:
                self._check_timeouts(active, started, outcome, submit)
        reporter.finish()
        outcome.seconds = time.perf_counter() - t0
        return outcome

    def _cancel_queued(self, active: dict[str, tuple[Any, Block, int]]) -> None:
        """Cancel the submitted blocks no worker thread has started yet."""
        try:
            running = {k for keys in self.client.run(_executing_keys).values() for k in keys}
        except Exception as exc:  # workers stopping (the same signal reached them): keep all, grace bounds it
            logger.debug("could not query executing tasks: %s", exc)
            return
        queued = [key for key in active if key not in running]
        if queued:
            self.client.cancel([active.pop(key)[0] for key in queued])
        logger.warning("stopping: %d running block(s) may finish, %d queued ones cancelled", len(active), len(queued))

    def _check_timeouts(
        self,
        active: dict[str, tuple[Any, Block, int]],
        started: dict[str, float],
        outcome: RunOutcome,
        submit: Callable[[Block, int], None],
    ) -> None:
        now = time.monotonic()
        try:
            executing = self.client.run(_executing_keys)
        except Exception as exc:  # a worker restarting or gone: check again at the next poll
            logger.debug("could not query executing tasks: %s", exc)
            return
        running = {k: w for w, keys in executing.items() for k in keys}
        for key in list(active):
            if key in running:
                started.setdefault(key, now)
            if key not in started or now - started[key] <= float(self.timeout or 0):
                continue
            fut, block, attempt = active.pop(key)
            started.pop(key)
            self.client.cancel(fut)
            worker = running.get(key)
            if worker is not None:
                logger.warning("block %s: restarting worker %s, which is stuck on it", block.id, worker)
                try:
                    self.client.restart_workers([worker], timeout=60, raise_for_error=False)
                except Exception as exc:
                    logger.error("block %s: could not restart worker %s: %s", block.id, worker, exc)
            if attempt < self.retries:
                logger.warning(
                    "block %s: attempt %d timed out after %.0fs, resubmitting", block.id, attempt + 1, self.timeout
                )
                submit(block, attempt + 1)
            else:
                logger.error("block %s: timed out after %.0fs, %d attempts", block.id, self.timeout, attempt + 1)
                outcome.record_failure(
                    block, TimeoutError(f"no result after {self.timeout:.0f}s, {attempt + 1} attempts")
                )


class WorkerDiedError(RuntimeError):
    """A block's worker process died every time it ran the block (killed: out of memory, most often)."""


def _explain_worker_death(block: Block, exc: BaseException, retries: int) -> BaseException:
    """A block whose worker process died on every attempt (e.g. killed by the kernel when out of
    memory): say so, with the fix, instead of Dask's bare ``KilledWorker``."""
    import dask
    from distributed.scheduler import KilledWorker

    if not isinstance(exc, KilledWorker):
        return exc
    attempts = int(dask.config.get("distributed.scheduler.allowed-failures", 3)) + 1
    return WorkerDiedError(
        f"block {block.id}: its worker process died each time it ran it ({attempts} attempts; killed, e.g. by the "
        "kernel when out of memory); use a smaller --block or fewer --threads-per-worker, or give the workers "
        "more memory"
    )


def _executing_keys(dask_worker: Any) -> list[str]:
    """Keys a worker's threads are executing right now (runs on the worker)."""
    return [str(ts.key) for ts in dask_worker.state.executing]


def _accepts_n_workers(client: Any) -> bool:
    import inspect

    try:
        return "n_workers" in inspect.signature(client.scheduler_info).parameters
    except (TypeError, ValueError):
        return False


def job_token(job: Any) -> str:
    """Short token that makes task keys unique per job (not per block attempt)."""
    import hashlib

    return hashlib.sha1(repr(job).encode()).hexdigest()[:8]
