"""Reliability: locks that cannot outlive their holder, graceful SIGTERM / SIGINT with resume,
a block that keeps killing its worker, and the bad inputs that must write nothing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import CEMENT, ROOT

from pipeline.compute.cluster import ClusterSpec
from pipeline.compute.executors import SerialExecutor
from pipeline.core import interrupt
from pipeline.core.errors import BlockFailedError, LockError
from pipeline.core.progress import NullReporter
from pipeline.ingest.run import ingest
from pipeline.io.bundle import init_bundle, save_bundle
from pipeline.io.lease import process_start_time
from pipeline.io.outputs import OutputLock
from pipeline.segment.run import segment
from pipeline.testing.faults import slow_blocks_env

ENV = {**os.environ, "DO_NOT_TRACK": "1", "PYTHONPATH": str(ROOT)}
CLI = [sys.executable, "-m", "pipeline.cli"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("reliab")
    ingest(CEMENT, d / "scan.zarr")
    save_bundle(init_bundle(classes=("void", "cement"), params={"channels": 4, "dilations": [1, 2]}, seed=11),
                d / "model")
    segment(d / "scan.zarr", d / "model", d / "reference.zarr", block=32, executor=SerialExecutor(), qc=False)
    return d


def array_bytes(path: Path) -> dict[str, bytes]:
    """Every chunk file of every array of an output (labels and pyramid), not the run metadata."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != "zarr.json" and "ledger" not in p.parts and "model" not in p.parts}


def done_count(out: Path) -> int:
    done = out / "ledger" / "done" / "c"
    return sum(1 for p in done.rglob("*") if p.is_file()) if done.exists() else 0


# ------------------------------------------------------------------------------------ locks


def _holder_script(out: Path) -> str:
    return (f"import time; from pathlib import Path; from pipeline.io.outputs import OutputLock\n"
            f"lock = OutputLock(Path({str(out)!r})); lock.acquire(); print('held', flush=True); time.sleep(120)\n")


def test_lock_of_a_live_process_is_refused_and_of_a_killed_one_taken_over(tmp_path, caplog):
    out = tmp_path / "o.zarr"
    holder = subprocess.Popen([sys.executable, "-c", _holder_script(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        busy = f"another run is writing it \\(host {socket.gethostname()}, pid {holder.pid}"
        with pytest.raises(LockError, match=busy):
            OutputLock(out).acquire()
        with pytest.raises(LockError, match="another run is writing it"):  # a flock-ed live holder: never taken
            OutputLock(out, take_over=True).acquire()
    finally:
        holder.kill()  # SIGKILL: no cleanup ran, the lock file stays behind
        holder.wait()
    lock_file = out.with_name("o.zarr.lock")
    assert json.loads(lock_file.read_text())["pid"] == holder.pid
    with OutputLock(out) as lock:  # taken over without --take-over-lock
        assert lock.held and json.loads(lock_file.read_text())["pid"] == os.getpid()
    assert not lock_file.exists()
    takeovers = [r.getMessage() for r in caplog.records if "taking over" in r.getMessage()]
    assert len(takeovers) == 1 and f"pid {holder.pid} is gone" in takeovers[0], takeovers


def test_reused_pid_and_other_hosts_leases(tmp_path, caplog):
    out = tmp_path / "o.zarr"
    lock_file = out.with_name("o.zarr.lock")
    # our own pid, but recorded with another start time: the pid was reused, the holder is gone
    lock_file.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "pid_started": 12345.0,
                                     "started": "2026-01-01T00:00:00+00:00"}))
    with OutputLock(out):
        pass
    assert "now belongs to another process (reused)" in caplog.text and not lock_file.exists()
    # another host: a lease renewed recently is respected, one not renewed for longer than stale_after is taken
    lock_file.write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "pid_started": 1.0, "started": "x"}))
    with pytest.raises(LockError, match="another run is writing it \\(host node-elsewhere.*lease renewed"):
        OutputLock(out).acquire()
    old = time.time() - 31
    os.utime(lock_file, (old, old))
    with OutputLock(out):
        pass
    assert "lease not renewed for 31s" in caplog.text and not lock_file.exists()


def test_holder_renews_its_lease(tmp_path):
    out = tmp_path / "o.zarr"
    with OutputLock(out, period=0.2) as lock:
        old = time.time() - 100
        os.utime(lock.path, (old, old))
        time.sleep(0.7)
        assert time.time() - lock.path.stat().st_mtime < 1.0  # renewed by the heartbeat
        info = json.loads(lock.path.read_text())
        assert info["pid"] == os.getpid() and info["pid_started"] == process_start_time(os.getpid())
    assert not lock.path.exists()


# ---------------------------------------------------------------------- signals, resume


def _start_segment(inputs: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    cmd = [*CLI, "segment", str(inputs / "scan.zarr"), str(inputs / "model"), str(out), "--block", "32", "--no-qc",
           *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stop_at(proc: subprocess.Popen[str], out: Path, blocks: int, sig: int) -> tuple[str, int]:
    deadline = time.time() + 240
    while done_count(out) < blocks and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be stopped"
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    return err, done_count(out)


@pytest.mark.parametrize("cluster", [["--cluster", "serial"], ["--workers", "1", "--threads-per-worker", "2"]],
                         ids=["serial", "dask"])
def test_sigterm_at_half_stops_cleanly_and_the_same_command_resumes(inputs, tmp_path, cluster):
    out = tmp_path / "out.zarr"
    proc = _start_segment(inputs, out, *cluster)
    err, done_at_stop = _stop_at(proc, out, 32, signal.SIGTERM)
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last == f"studios: interrupted: {done_at_stop}/64 blocks done; run the same command to resume", err
    assert 32 <= done_at_stop < 64
    assert not out.with_name("out.zarr.lock").exists()
    assert zarr.open_group(str(out), mode="r").attrs["studios"]["complete"] is False

    rerun = _start_segment(inputs, out, *cluster)
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert f"({done_at_stop} resumed" in stdout  # nothing that finished before the stop is computed again
    assert array_bytes(out) == array_bytes(inputs / "reference.zarr")
    assert not out.with_name("out.zarr.lock").exists()


def test_sigint_exits_130_and_resumes(inputs, tmp_path):
    out = tmp_path / "out.zarr"
    proc = _start_segment(inputs, out, "--cluster", "serial")
    err, done_at_stop = _stop_at(proc, out, 16, signal.SIGINT)
    assert proc.returncode == 130, err
    assert f"interrupted: {done_at_stop}/64 blocks done" in err
    rerun = subprocess.run([*CLI, "segment", str(inputs / "scan.zarr"), str(inputs / "model"), str(out), "--block",
                            "32", "--no-qc", "--cluster", "serial"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert rerun.returncode == 0 and f"({done_at_stop} resumed" in rerun.stdout, rerun.stderr
    assert array_bytes(out) == array_bytes(inputs / "reference.zarr")


class _StopAfter(NullReporter):
    """Sends the stop request a SIGTERM handler would, after ``n`` units of progress."""

    def __init__(self, n: int) -> None:
        self.n = n

    def advance(self, n: int = 1, **kwargs: object) -> None:
        self.n -= n
        if self.n <= 0:
            interrupt.request(signal.SIGTERM)


def test_interrupted_ingest_and_train_write_nothing(inputs, tmp_path):
    from pipeline.train.annotations import from_array
    from pipeline.train.loop import train

    try:
        with pytest.raises(interrupt.Interrupted, match="interrupted: ingest of .* nothing was written") as info:
            ingest(CEMENT, tmp_path / "scan.zarr", chunks=(16, 64, 64), workers=1, reporter=_StopAfter(2))
        assert info.value.exit_code == 143
        assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no partial, no lock
        interrupt.clear()
        labels = np.zeros((128, 128, 128), np.uint8)
        labels[64, :40, :40], labels[64, 80:, 80:] = 1, 2
        with pytest.raises(interrupt.Interrupted, match="training stopped in epoch 1; no model was written"):
            train(inputs / "scan.zarr", from_array(labels), tmp_path / "model", epochs=3, steps_per_epoch=4,
                  reporter=_StopAfter(2))
        assert not (tmp_path / "model").exists()
    finally:
        interrupt.clear()


def test_block_that_keeps_killing_its_worker_is_named_with_a_hint(inputs, tmp_path):
    """The worker running block 0-1-0 is SIGKILLed on every attempt (what the kernel's OOM killer
    does); the other blocks finish, the block is reported by id with the fix, and a rerun resumes."""
    import dask
    import distributed  # noqa: F401  (its config defaults must exist before dask.config.set, or leaving it drops them)

    from pipeline.compute.cluster import open_client
    from pipeline.compute.executors import DaskExecutor
    from pipeline.testing.faults import FaultyExecutor

    out = tmp_path / "out.zarr"
    spec = ClusterSpec(kind="local", workers=1, threads_per_worker=1)
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}), open_client(spec) as client, \
            pytest.raises(BlockFailedError) as info:
        executor = FaultyExecutor(DaskExecutor(client, retries=2), tmp_path / "faults", kill=("0-1-0",))
        segment(inputs / "scan.zarr", inputs / "model", out, block=64, qc=False, executor=executor)
    msg = str(info.value)
    assert "1 of 8 blocks failed (0-1-0)" in msg and "died each time it ran it (2 attempts" in msg
    assert "out of memory" in msg and "smaller --block" in msg and "fewer --threads-per-worker" in msg
    assert done_count(out) == 7 and not out.with_name("out.zarr.lock").exists()
    result = segment(inputs / "scan.zarr", inputs / "model", out, block=64, qc=False, executor=SerialExecutor())
    assert result.blocks_resumed == 7 and result.blocks_done == 8


# ------------------------------------------------------------------------------ bad inputs


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=tmp_path, env=ENV, capture_output=True, text=True)


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_bad_inputs_are_one_line_nonzero_and_write_nothing(inputs, tmp_path):
    import shutil

    shutil.copytree(inputs / "scan.zarr", tmp_path / "scan.zarr")
    shutil.copytree(inputs / "model", tmp_path / "model")
    shutil.copytree(inputs / "scan.zarr", tmp_path / "writing.zarr")
    shutil.copytree(inputs / "reference.zarr", tmp_path / "seg.zarr")
    g = zarr.open_group(str(tmp_path / "writing.zarr"), mode="r+")
    g.attrs["studios"] = {**dict(g.attrs["studios"]), "complete": False}  # a scan still being written
    labels = np.zeros((128, 128, 128), np.uint8)
    labels[64, :30, :30] = 9  # a single class
    np.save(tmp_path / "one_class.npy", labels)
    cases = {
        "ingest into an existing zarr store": (
            ["ingest", str(CEMENT), "scan.zarr/inside.zarr"], "output lies inside the existing zarr store"),
        "segment into the scan": (
            ["segment", "scan.zarr", "model", "scan.zarr/seg.zarr", "--cluster", "serial"], "lies inside the input"),
        "segment into another zarr store": (
            ["segment", "scan.zarr", "model", "writing.zarr/seg.zarr", "--cluster", "serial"],
            "inside the existing zarr store"),
        "segment a scan being written": (
            ["segment", "writing.zarr", "model", "seg.zarr", "--cluster", "serial"], "is incomplete"),
        "train on a scan being written": (
            ["train", "writing.zarr", "one_class.npy", "m", "--epochs", "1"], "is incomplete"),
        "ingest a scan being written": (["ingest", "writing.zarr", "again.zarr"], "is not marked complete"),
        "QC against a scan being written": (["qc", "seg.zarr", "--scan", "writing.zarr"], "is incomplete"),
        "annotations with one class": (
            ["train", "scan.zarr", "one_class.npy", "m", "--epochs", "1"], "every labelled voxel is class 9"),
        "model with one class (count)": (["model", "init", "m", "--classes", "1"], "at least two classes"),
        "model with one class (name)": (["model", "init", "m", "--classes", "fibre"], "two or more names"),
    }
    before = _listing(tmp_path)
    for name, (args, expected) in cases.items():
        r = _cli(tmp_path, *args)
        assert r.returncode != 0, name
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("studios: error: ") and expected in lines[0], (name, r.stderr)
        assert _listing(tmp_path) == before, name  # nothing created, nothing changed
    r = _cli(tmp_path, "model", "init", "m3", "--classes", "3")  # a count of two or more names class_1..class_N
    assert r.returncode == 0 and "classes class_1, class_2, class_3" in r.stdout, r.stderr


# ------------------------------------------------------------------------- scheduled flows


WATCH = """
import sys
from flows.watch import watch_folder
result = watch_folder(config=sys.argv[1])
print("processed", {name: r["state"] for name, r in result["processed"].items()})
"""


def test_scan_interrupted_in_a_watch_firing_is_resumed_by_the_next(inputs, tmp_path):
    """SIGTERM during a watch firing: the scan is recorded 'interrupted' and its claim released;
    the next firing processes it again and the segmentation resumes instead of starting over."""
    import shutil

    inc, root = tmp_path / "incoming", tmp_path / "processed"
    inc.mkdir()
    shutil.copy(CEMENT, inc / "scan_a.tif")
    (inc / "scan_a.complete").touch()
    profile = tmp_path / "beamline.yaml"
    profile.write_text(f"""
output: {root}
watch: {{incoming: {inc}, interval: 3600, completion: marker}}
model: {{bundle: {inputs / 'model'}}}
segment: {{block: 32}}
cluster: {{kind: serial}}
qc: {{enabled: false}}
""")
    env = {**slow_blocks_env(0.2, ENV), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    seg = root / "scan_a" / "seg.zarr"
    first = subprocess.Popen([sys.executable, "-c", WATCH, str(profile)], cwd=ROOT, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while done_count(seg) < 12 and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, first.communicate()[1][-3000:]
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    done_at_stop = done_count(seg)
    assert first.returncode != 0 and "interrupted: " in err and 12 <= done_at_stop < 64, err[-3000:]
    state = json.loads((root / ".studios-watch" / "state.json").read_text())
    assert state["scans"]["scan_a"]["state"] == "interrupted"
    assert not (root / ".studios-watch" / "claims" / "scan_a.claim").exists()
    assert not seg.with_name("seg.zarr.lock").exists()

    second = subprocess.run([sys.executable, "-c", WATCH, str(profile)], cwd=ROOT, env=env, text=True,
                            capture_output=True, timeout=600)
    assert second.returncode == 0 and "processed {'scan_a': 'done'}" in second.stdout, second.stderr[-3000:]
    run = zarr.open_group(str(seg), mode="r").attrs["studios"]
    assert run["complete"] is True and run["run"]["blocks_resumed"] == done_at_stop  # resumed, not redone
    assert array_bytes(seg) == array_bytes(inputs / "reference.zarr")
