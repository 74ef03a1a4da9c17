"""Every executor passes the conformance suite of pipeline.testing.conformance."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pipeline.compute.executors import DaskExecutor, SerialExecutor
from pipeline.testing.conformance import ExecutorTests


class TestSerialExecutor(ExecutorTests):
    @pytest.fixture
    def executor(self) -> SerialExecutor:
        return SerialExecutor(retries=ExecutorTests.RETRIES)


class TestDaskExecutor(ExecutorTests):
    """On a real LocalCluster: two worker processes, blocks run in other processes."""

    @pytest.fixture
    def executor(self, dask_address: str) -> Iterator[DaskExecutor]:
        from distributed import Client

        with Client(dask_address, timeout="30s") as client:
            yield DaskExecutor(client, retries=ExecutorTests.RETRIES, poll=0.1)

    def test_blocks_run_in_the_worker_processes(self, executor: DaskExecutor, tmp_path) -> None:
        import os

        from pipeline.testing.conformance import ConformanceJob, blocks, conformance_block

        outcome = executor.run(conformance_block, ConformanceJob(str(tmp_path)), blocks())
        assert os.getpid() not in {r["pid"] for r in outcome.results}
