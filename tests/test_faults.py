"""Fault injection: a run killed with SIGKILL resumes to a byte-identical output, and a Dask
worker killed mid-run does not change the result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import CEMENT, ROOT

from pipeline.compute.cluster import ClusterSpec
from pipeline.compute.executors import DaskExecutor, SerialExecutor
from pipeline.ingest.run import ingest
from pipeline.io.bundle import init_bundle, save_bundle
from pipeline.segment.run import segment
from pipeline.testing.faults import FaultyExecutor

ENV = {**os.environ, "DO_NOT_TRACK": "1"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    ingest(CEMENT, d / "scan.zarr")
    save_bundle(init_bundle(classes=("void", "cement"), params={"channels": 4, "dilations": [1, 2]}, seed=11),
                d / "model")
    return d


def _chunk_bytes(path: Path) -> dict[str, bytes]:
    root = path / "0"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _done_count(out: Path) -> int:
    done = out / "ledger" / "done"
    return sum(1 for p in done.rglob("*") if p.is_file() and p.name != "zarr.json") if done.exists() else 0


def test_sigkill_at_half_then_resume_is_byte_identical(inputs, tmp_path):
    scan, model = inputs / "scan.zarr", inputs / "model"
    reference = tmp_path / "reference.zarr"
    segment(scan, model, reference, block=32, executor=SerialExecutor(), qc=False)
    out = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "pipeline.cli", "segment", str(scan), str(model), str(out), "--block", "32",
           "--cluster", "serial", "--no-qc"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while _done_count(out) < 32 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = _done_count(out)
    assert 32 <= done_at_kill < 64
    assert zarr.open_group(str(out), mode="r").attrs["studios"]["complete"] is False

    # the dead run's lock is taken over by the same command (no --take-over-lock), which resumes
    rerun = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "taking over the lock of a run that is gone" in rerun.stderr
    assert not out.with_name(out.name + ".lock").exists()
    resumed = int(rerun.stdout.split("(")[1].split(" resumed")[0])
    assert resumed == done_at_kill  # only unfinished blocks were recomputed
    assert _chunk_bytes(out) == _chunk_bytes(reference)
    assert zarr.open_group(str(out), mode="r").attrs["studios"]["complete"] is True


def test_killed_dask_worker_blocks_rerun_elsewhere(inputs, tmp_path, dask_address):
    """SIGKILL one worker process of a real LocalCluster mid-run; its nanny restarts it and the
    blocks it held run again: the output equals an uninterrupted run."""
    from distributed import Client

    scan, model = inputs / "scan.zarr", inputs / "model"
    reference = tmp_path / "reference.zarr"
    segment(scan, model, reference, block=32, executor=SerialExecutor(), qc=False)
    out = tmp_path / "out.zarr"
    with Client(dask_address) as client:
        pids = list(client.run(os.getpid).values())
    killed: list[int] = []

    def killer() -> None:
        deadline = time.time() + 120
        while _done_count(out) < 8 and time.time() < deadline:
            time.sleep(0.02)
        os.kill(pids[0], signal.SIGKILL)
        killed.append(pids[0])

    thread = threading.Thread(target=killer)
    thread.start()
    result = segment(scan, model, out, block=32, retries=3, qc=False,
                     cluster=ClusterSpec(kind="address", address=dask_address))
    thread.join()
    assert killed and not result.failed and result.blocks_done == 64
    np.testing.assert_array_equal(np.asarray(zarr.open_group(str(out))["0"][...]),
                                  np.asarray(zarr.open_group(str(reference))["0"][...]))


def test_hanging_block_times_out_and_is_retried(inputs, tmp_path, dask_address):
    from distributed import Client

    scan, model = inputs / "scan.zarr", inputs / "model"
    out = tmp_path / "out.zarr"
    with Client(dask_address) as client:
        executor = FaultyExecutor(DaskExecutor(client, retries=1, timeout=15.0), tmp_path / "faults", hang=("0-1-0",))
        result = segment(scan, model, out, block=64, qc=False, executor=executor)
    assert not result.failed and result.blocks_done == 8
    reference = tmp_path / "reference.zarr"
    segment(scan, model, reference, block=64, executor=SerialExecutor(), qc=False)
    np.testing.assert_array_equal(np.asarray(zarr.open_group(str(out))["0"][...]),
                                  np.asarray(zarr.open_group(str(reference))["0"][...]))


def test_hanging_block_without_retries_fails_with_its_id(inputs, tmp_path, dask_address):
    from distributed import Client

    from pipeline.core.errors import BlockFailedError

    expected = r"\(1-1-1\).*TimeoutError: no result after 15s"
    with Client(dask_address) as client, pytest.raises(BlockFailedError, match=expected):
        executor = FaultyExecutor(DaskExecutor(client, retries=0, timeout=15.0), tmp_path / "faults", hang=("1-1-1",))
        segment(inputs / "scan.zarr", inputs / "model", tmp_path / "out.zarr", block=64, qc=False, executor=executor)


def test_corrupted_input_chunk_is_named(inputs, tmp_path):
    import shutil

    from pipeline.core.errors import BlockFailedError

    scan = tmp_path / "scan.zarr"
    shutil.copytree(inputs / "scan.zarr", scan)
    chunk = scan / "0" / "c" / "0" / "0" / "0"
    chunk.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(BlockFailedError, match=r"0-0-0.*could not be read.*re-ingest the scan"):
        segment(scan, inputs / "model", tmp_path / "out.zarr", block=64, executor=SerialExecutor(retries=0), qc=False)
    # ingest from the damaged zarr names it too
    from pipeline.core.errors import InputError

    with pytest.raises(InputError, match="could not be read.*damaged"):
        ingest(scan, tmp_path / "again.zarr")
    assert not (tmp_path / "again.zarr").exists()
