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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline.progress import NullReporter, Reporter
from pipeline.tiling import Block

logger = logging.getLogger(__name__)

BlockFn = Callable[[Any, Block], dict[str, Any]]


@dataclass
class RunOutcome:
    results: list[dict[str, Any]] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


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
            for attempt in range(self.retries + 1):
                try:
                    result = fn(job, block)
                except Exception as exc:
                    logger.warning("block %s: attempt %d failed: %s", block.id, attempt + 1, exc)
                    if attempt == self.retries:
                        outcome.failed[block.id] = f"{type(exc).__name__}: {exc}"
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
        retries: extra attempts per block (also covers a killed worker's blocks).
        max_in_flight: tasks submitted ahead of completion; default 4 x total worker threads.
        resources: Dask worker resources each task needs, e.g. ``{"GPU": 1}``.
    """

    def __init__(
        self,
        client: Any,
        *,
        retries: int = 2,
        max_in_flight: int | None = None,
        resources: dict[str, float] | None = None,
    ) -> None:
        self.client = client
        self.retries = retries
        self.max_in_flight = max_in_flight
        self.resources = resources

    def _capacity(self) -> int:
        if self.max_in_flight:
            return self.max_in_flight
        info = self.client.scheduler_info(n_workers=-1) if _accepts_n_workers(self.client) else self.client.scheduler_info()
        threads = sum(w.get("nthreads", 1) for w in info.get("workers", {}).values()) or 1
        return max(4 * threads, 8)

    def run(self, fn: BlockFn, job: Any, blocks: Sequence[Block], *, reporter: Reporter | None = None) -> RunOutcome:
        from distributed import as_completed

        reporter = reporter or NullReporter()
        outcome = RunOutcome()
        t0 = time.perf_counter()
        reporter.start("segment", len(blocks))
        todo = list(reversed(blocks))
        by_key: dict[str, Block] = {}

        def submit(block: Block) -> Any:
            fut = self.client.submit(
                fn, job, block, key=f"block-{block.id}-{job_token(job)}", retries=self.retries,
                pure=False, resources=self.resources,
            )
            by_key[fut.key] = block
            return fut

        initial = [submit(todo.pop()) for _ in range(min(self._capacity(), len(todo)))]
        pending = as_completed(initial, with_results=False)
        for fut in pending:
            block = by_key.pop(fut.key)
            try:
                result = fut.result()
            except Exception as exc:
                logger.error("block %s: failed after %d attempts: %s", block.id, self.retries + 1, exc)
                outcome.failed[block.id] = f"{type(exc).__name__}: {exc}"
            else:
                outcome.results.append(result)
                reporter.advance(1, voxels=block.write.size)
            fut.release()
            if todo:
                pending.add(submit(todo.pop()))
        reporter.finish()
        outcome.seconds = time.perf_counter() - t0
        return outcome


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
