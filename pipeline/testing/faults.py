"""Fault injection for tests: fail or hang the first attempt of named blocks.

Nothing here is used by production code. :class:`FaultyExecutor` wraps any executor and hands
it a :class:`FaultyBlock` instead of the block function it was given; the wrapper is a frozen,
picklable value, so it travels to Dask worker processes like the real function. Which blocks
already had their first attempt is kept on disk (one marker file per block in ``state``), so
the second attempt succeeds even when it runs in another process::

    from pipeline.testing.faults import FaultyExecutor
    segment(scan, model, out, executor=FaultyExecutor(SerialExecutor(retries=1), tmp / "faults",
                                                      fail=("0-1-2",)))
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.compute.executors import BlockFn, Executor, RunOutcome
from pipeline.core.progress import Reporter
from pipeline.core.tiling import Block


class InjectedFault(RuntimeError):
    """The error a failing first attempt raises."""


@dataclass(frozen=True, slots=True)
class FaultyBlock:
    """A block function whose first attempt on the named blocks raises or hangs.

    Attributes:
        fn: the real block function, ``fn(job, block) -> dict``.
        state: folder of the first-attempt markers (created; shared by all processes).
        fail: block ids whose first attempt raises :class:`InjectedFault`.
        hang: block ids whose first attempt sleeps ``hang_seconds`` and then runs normally.
        kill: block ids whose every attempt SIGKILLs its own process (what the kernel's OOM
            killer does to a worker).
    """

    fn: BlockFn
    state: str
    fail: tuple[str, ...] = ()
    hang: tuple[str, ...] = ()
    hang_seconds: float = 60.0
    kill: tuple[str, ...] = ()

    def first_attempt(self, block: Block) -> bool:
        """True exactly once per block id (atomic: ``O_EXCL`` creation of its marker)."""
        os.makedirs(self.state, exist_ok=True)
        try:
            fd = os.open(os.path.join(self.state, block.id), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        os.close(fd)
        return True

    def __call__(self, job: Any, block: Block) -> dict[str, Any]:
        if block.id in self.kill:
            os.kill(os.getpid(), signal.SIGKILL)
        if (block.id in self.fail or block.id in self.hang) and self.first_attempt(block):
            if block.id in self.fail:
                raise InjectedFault(f"injected fault in block {block.id}")
            time.sleep(self.hang_seconds)
        return self.fn(job, block)


class FaultyExecutor:
    """An executor that runs ``inner`` with the block function wrapped in :class:`FaultyBlock`.

    Args:
        inner: the executor doing the work (serial or Dask; its retries and timeout apply).
        state: folder for the first-attempt markers; use a fresh one per test.
        fail, hang: block ids, see :class:`FaultyBlock`.
    """

    def __init__(
        self, inner: Executor, state: str | os.PathLike[str], *, fail: Sequence[str] = (), hang: Sequence[str] = (),
        hang_seconds: float = 60.0, kill: Sequence[str] = (),
    ) -> None:
        self.inner = inner
        self.state = Path(state)
        self.fail, self.hang, self.hang_seconds, self.kill = tuple(fail), tuple(hang), hang_seconds, tuple(kill)

    def wrap(self, fn: BlockFn) -> FaultyBlock:
        return FaultyBlock(fn, str(self.state), self.fail, self.hang, self.hang_seconds, self.kill)

    def run(self, fn: BlockFn, job: Any, blocks: Sequence[Block], *, reporter: Reporter | None = None) -> RunOutcome:
        return self.inner.run(self.wrap(fn), job, blocks, reporter=reporter)


#: Seconds each block sleeps before it runs, in processes started with :func:`slow_blocks_env`.
DELAY_ENV = "STUDIOS_TEST_BLOCK_DELAY"


def slow_blocks_env(delay: float, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a subprocess (``studios ...``, an sbatch job) whose blocks each take at least
    ``delay`` seconds more, on any machine: walltime and signal tests need runs of a known length.

    ``pipeline/testing/slowblocks/sitecustomize.py`` is put first on ``PYTHONPATH``; Python runs
    it at start-up in the driver and in every worker process it spawns, and it wraps
    ``pipeline.segment.worker.run_block``. Production modules carry no hook.
    """
    base = dict(os.environ if env is None else env)
    shim = str(Path(__file__).resolve().parent / "slowblocks")
    path = base.get("PYTHONPATH")
    return {**base, DELAY_ENV: str(delay), "PYTHONPATH": shim + (os.pathsep + path if path else "")}
