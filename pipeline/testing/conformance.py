"""What every executor must do, as a pytest suite to inherit (see :mod:`pipeline.compute.executors`).

A test module makes one subclass per executor and supplies the ``executor`` fixture, built with
``retries=RETRIES``::

    class TestSerial(ExecutorTests):
        @pytest.fixture
        def executor(self):
            return SerialExecutor(retries=ExecutorTests.RETRIES)

The block function and its job are module-level and picklable, and they count attempts in
files under the job's folder, so the same tests hold for executors whose blocks run in other
processes (Dask workers): every block's result comes back once; a block that keeps failing is
reported by its id with its last error and the others still finish; failed attempts are
retried up to ``retries`` times; the reporter sees one ``advance`` per finished block with its
voxels; a full disk stops the run; an empty block list is an empty outcome.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pipeline.compute.executors import Executor, RunOutcome
from pipeline.core.errors import DiskFullError
from pipeline.core.progress import RecordingReporter
from pipeline.core.tiling import Block, plan_blocks


@dataclass(frozen=True)
class ConformanceJob:
    """What the conformance block function does with each block.

    Attributes:
        folder: where attempts are counted (one file per block, one byte per attempt).
        flaky: block ids whose first ``flaky_attempts`` attempts raise.
        broken: block ids whose every attempt raises.
        disk_full: block ids whose every attempt raises :class:`DiskFullError`.
    """

    folder: str
    flaky: frozenset[str] = frozenset()
    flaky_attempts: int = 0
    broken: frozenset[str] = frozenset()
    disk_full: frozenset[str] = field(default_factory=frozenset)


def attempts(job: ConformanceJob, block_id: str) -> int:
    """How many times the block function has been called for ``block_id``."""
    path = Path(job.folder) / f"{block_id}.attempts"
    return path.stat().st_size if path.exists() else 0


def conformance_block(job: ConformanceJob, block: Block) -> dict[str, Any]:
    """The block function: count the attempt, fail as the job says, else describe the block."""
    with open(Path(job.folder) / f"{block.id}.attempts", "ab") as f:
        f.write(b".")
    n = attempts(job, block.id)
    if block.id in job.disk_full:
        raise DiskFullError(f"{job.folder}: writing block {block.id} failed (No space left on device)")
    if block.id in job.broken:
        raise RuntimeError(f"block {block.id} is broken (attempt {n})")
    if block.id in job.flaky and n <= job.flaky_attempts:
        raise RuntimeError(f"block {block.id} failed attempt {n}")
    return {"block_id": block.id, "voxels": block.write.size, "pid": os.getpid(), "attempt": n}


def blocks(n_per_axis: int = 3, edge: int = 4) -> list[Block]:
    """``n_per_axis ** 3`` blocks of ``edge ** 3`` voxels."""
    return plan_blocks((n_per_axis * edge,) * 3, (edge,) * 3, 1)


class ExecutorTests:
    """The conformance suite; subclasses supply an ``executor`` fixture with ``retries=RETRIES``."""

    RETRIES = 2

    @pytest.fixture
    def executor(self) -> Executor:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError("subclasses of ExecutorTests supply the executor fixture")

    @staticmethod
    def _run(executor: Executor, job: ConformanceJob, todo: Sequence[Block]) -> tuple[RunOutcome, RecordingReporter]:
        reporter = RecordingReporter()
        return executor.run(conformance_block, job, todo, reporter=reporter), reporter

    def test_every_block_result_comes_back_once(self, executor: Executor, tmp_path: Path) -> None:
        todo = blocks()
        job = ConformanceJob(str(tmp_path))
        outcome, _ = self._run(executor, job, todo)
        assert not outcome.failed and outcome.fatal is None
        assert sorted(r["block_id"] for r in outcome.results) == sorted(b.id for b in todo)
        assert all(r["voxels"] == 64 and r["attempt"] == 1 for r in outcome.results)
        assert outcome.seconds > 0

    def test_failures_are_reported_by_block_id_and_the_rest_finish(self, executor: Executor, tmp_path: Path) -> None:
        todo = blocks()
        broken = frozenset({todo[0].id, todo[13].id})
        job = ConformanceJob(str(tmp_path), broken=broken)
        outcome, _ = self._run(executor, job, todo)
        assert set(outcome.failed) == broken and outcome.fatal is None
        for block_id in broken:
            assert outcome.failed[block_id] == f"RuntimeError: block {block_id} is broken (attempt {self.RETRIES + 1})"
            assert "RuntimeError" in outcome.tracebacks[block_id]
            assert attempts(job, block_id) == self.RETRIES + 1
        assert sorted(r["block_id"] for r in outcome.results) == sorted(b.id for b in todo if b.id not in broken)

    def test_failed_attempts_are_retried(self, executor: Executor, tmp_path: Path) -> None:
        todo = blocks(2)
        flaky = frozenset(b.id for b in todo[:3])
        job = ConformanceJob(str(tmp_path), flaky=flaky, flaky_attempts=self.RETRIES)
        outcome, _ = self._run(executor, job, todo)
        assert not outcome.failed and len(outcome.results) == len(todo)
        for r in outcome.results:
            expected = self.RETRIES + 1 if r["block_id"] in flaky else 1
            assert r["attempt"] == expected and attempts(job, r["block_id"]) == expected

    def test_more_failures_than_retries_fail_the_block(self, executor: Executor, tmp_path: Path) -> None:
        todo = blocks(2)
        job = ConformanceJob(str(tmp_path), flaky=frozenset({todo[1].id}), flaky_attempts=self.RETRIES + 1)
        outcome, _ = self._run(executor, job, todo)
        assert list(outcome.failed) == [todo[1].id] and len(outcome.results) == len(todo) - 1

    def test_progress_is_reported_per_finished_block(self, executor: Executor, tmp_path: Path) -> None:
        todo = blocks()
        job = ConformanceJob(str(tmp_path), broken=frozenset({todo[5].id}))
        _, reporter = self._run(executor, job, todo)
        assert reporter.events[0] == ("start", ("segment", len(todo)))
        assert reporter.events[-1] == ("finish", None)
        advances = [e for e in reporter.events if e[0] == "advance"]
        assert advances == [("advance", (1, 64))] * (len(todo) - 1)
        assert reporter.advanced == len(todo) - 1

    def test_a_full_disk_stops_the_run(self, executor: Executor, tmp_path: Path) -> None:
        todo = blocks(4)
        job = ConformanceJob(str(tmp_path), disk_full=frozenset({todo[0].id}))
        outcome, _ = self._run(executor, job, todo)
        assert outcome.fatal is not None and "No space left" in outcome.fatal
        assert outcome.failed[todo[0].id].startswith("DiskFullError:")
        assert attempts(job, todo[0].id) <= self.RETRIES + 1
        assert len(outcome.results) < len(todo) - 1  # the blocks not yet started were not run

    def test_no_blocks_is_an_empty_outcome(self, executor: Executor, tmp_path: Path) -> None:
        outcome, reporter = self._run(executor, ConformanceJob(str(tmp_path)), [])
        assert outcome.results == [] and outcome.failed == {} and outcome.fatal is None
        assert reporter.events == [("start", ("segment", 0)), ("finish", None)]
