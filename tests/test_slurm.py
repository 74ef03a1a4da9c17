"""Segmentation through a real one-node SLURM (deploy/slurm/start-local-slurm.sh).

The session fixture starts slurmctld + slurmd + munged on localhost in a temporary directory
(on free ports) and stops them at the end; it skips only when the SLURM/munge binaries are
missing (deploy/ci/system-packages.sh installs them). With ``STUDIOS_SLURM_DIR`` set it uses
(and leaves running) the SLURM in that directory instead.

Checked: labels through ``SLURMCluster`` with two jobs equal a local serial run exactly; the
jobs show in ``squeue``/``scontrol`` while the run goes on; no job of ours is left afterwards,
on success, on a job stuck pending, on a job SLURM rejects, and on Ctrl-C of the CLI.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
import zarr
from conftest import CEMENT, ROOT, make_scan

from pipeline.compute.cluster import ClusterSpec, open_client
from pipeline.compute.executors import SerialExecutor
from pipeline.compute.slurm import squeue_jobs
from pipeline.core.errors import ClusterError
from pipeline.io.bundle import init_bundle, save_bundle
from pipeline.segment.run import segment
from pipeline.testing.faults import slow_blocks_env

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]

BINARIES = ("slurmctld", "slurmd", "sinfo", "sbatch", "squeue", "scontrol", "scancel", "munged", "mungekey")
START = ROOT / "deploy" / "slurm" / "start-local-slurm.sh"
STOP = ROOT / "deploy" / "slurm" / "stop-local-slurm.sh"
PREFIX = "studiostest"
SMALL = {"channels": 4, "dilations": [1, 2], "head": 4}
SHAPE = (40, 48, 48)
BLOCK = 24  # 2 x 2 x 2 blocks


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _our_jobs() -> dict[str, tuple[str, str]]:
    """{id: (name, state)} of this module's jobs still known to squeue (any state but finished)."""
    r = subprocess.run(["squeue", "-h", "-o", "%i|%j|%T"], capture_output=True, text=True, check=True)
    jobs = {}
    for line in r.stdout.splitlines():
        job_id, name, state = line.strip().split("|")
        if name.startswith(PREFIX):
            jobs[job_id] = (name, state)
    return jobs


def _wait_no_jobs(timeout: float = 20.0) -> dict[str, tuple[str, str]]:
    deadline = time.monotonic() + timeout
    left = _our_jobs()
    while left and time.monotonic() < deadline:
        time.sleep(0.25)
        left = _our_jobs()
    return left


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    missing = [b for b in BINARIES if _which(b) is None]
    if missing:
        pytest.skip(f"SLURM/munge not installed ({', '.join(missing)}); run deploy/ci/system-packages.sh")
    given = os.environ.get("STUDIOS_SLURM_DIR")
    directory = Path(given) if given else tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}
    if not given:
        env["STUDIOS_SLURMCTLD_PORT"] = str(_free_port())
        env["STUDIOS_SLURMD_PORT"] = str(_free_port())
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(START), str(directory)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, f"start-local-slurm.sh failed: {r.stderr.strip()}"
    export = r.stdout.strip().splitlines()[-1]
    assert export == f"export SLURM_CONF={directory.resolve()}/slurm.conf", export
    started = time.monotonic() - t0
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "PATH")}
    os.environ["SLURM_CONF"] = export.split("=", 1)[1]
    os.environ["PATH"] = env["PATH"]
    print(f"\none-node SLURM up in {started:.1f}s in {directory}")
    try:
        # idempotent: a second start finds it running and prints the same export line
        again = subprocess.run(["bash", str(START), str(directory)], capture_output=True, text=True, env=env,
                               timeout=60)
        assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == export, again.stderr
        yield directory
    finally:
        try:
            left = _wait_no_jobs(5.0)
        finally:
            if not given:
                subprocess.run(["bash", str(STOP), str(directory)], capture_output=True, text=True, env=env,
                               timeout=120)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        assert not left, f"SLURM jobs left at the end of the session: {left}"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A crop of the bundled cement tomogram, a small random-weight model, and a serial run."""
    root = tmp_path_factory.mktemp("slurm-data")
    volume = tifffile.imread(CEMENT)[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    scan = make_scan(root, np.ascontiguousarray(volume), chunks=(24, 24, 24))
    model = save_bundle(init_bundle(classes=("pore", "paste", "grain"), params=SMALL, seed=7), root / "model")
    reference = root / "serial.zarr"
    segment(scan, model, reference, block=48, executor=SerialExecutor(), exact=True, qc=False)
    return {"root": root, "scan": scan, "model": model, "reference": reference}


def _labels(path: Path) -> np.ndarray:
    return np.asarray(zarr.open_group(str(path), mode="r")["0"][...])


def _slurm_options(root: Path) -> dict:
    return {
        "cores": 1,
        "memory": "1GB",
        "processes": 1,
        "walltime": "00:10:00",
        "job_name": PREFIX,
        "scheduler_options": {"host": "127.0.0.1"},
        "local_directory": str(root / "dask-local"),
        "log_directory": str(root / "slurm-logs"),
        "death_timeout": 60,
    }


class SqueueWatcher(threading.Thread):
    """Polls squeue (and scontrol for running jobs) while a run goes on."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.seen: dict[str, set[str]] = {}
        self.scontrol: dict[str, str] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for job_id, (_, state) in _our_jobs().items():
                self.seen.setdefault(job_id, set()).add(state)
                if state == "RUNNING" and job_id not in self.scontrol:
                    r = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True)
                    self.scontrol[job_id] = r.stdout
            time.sleep(0.2)


def test_segment_through_two_slurm_jobs_equals_serial_run(slurm, data, tmp_path):
    spec = ClusterSpec(kind="slurm", workers=2, slurm=_slurm_options(tmp_path), wait_timeout=90)
    assert spec.jobs_for(8) == 2 and spec.jobs_for(1) == 1
    watcher = SqueueWatcher()
    watcher.start()
    try:
        r = segment(data["scan"], data["model"], tmp_path / "slurm.zarr", block=BLOCK, cluster=spec, exact=True,
                    qc=False)
    finally:
        watcher.stop.set()
        watcher.join()
    assert r.blocks_total == r.blocks_done == 8
    np.testing.assert_array_equal(_labels(tmp_path / "slurm.zarr"), _labels(data["reference"]))
    # squeue saw two jobs of ours, running; scontrol described them
    assert len(watcher.seen) >= 2, watcher.seen
    assert sum("RUNNING" in states for states in watcher.seen.values()) >= 2, watcher.seen
    for job_id, text in watcher.scontrol.items():
        assert f"JobId={job_id}" in text and "JobState=RUNNING" in text and f"JobName={PREFIX}-" in text
        assert "NumCPUs=1" in text
    assert not _wait_no_jobs(), "SLURM jobs left after the run"


def test_cli_segment_with_cluster_config(slurm, data, tmp_path):
    profile = tmp_path / "site.yaml"
    profile.write_text(yaml.safe_dump({"cluster": {"kind": "slurm", "workers": 2, "wait_timeout": 90,
                                                   "slurm": _slurm_options(tmp_path)}}))
    out = tmp_path / "cli.zarr"
    cmd = [sys.executable, "-m", "pipeline.cli", "segment", str(data["scan"]), str(data["model"]), str(out),
           "--block", str(BLOCK), "--exact", "--no-qc", "--cluster", "slurm", "--cluster-config", str(profile)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "8/8 blocks" in r.stdout
    np.testing.assert_array_equal(_labels(out), _labels(data["reference"]))
    assert not _wait_no_jobs(), "SLURM jobs left after the CLI run"
    assert not list(tmp_path.glob("slurm-*.out")), "job logs belong in log_directory"


def test_job_stuck_pending_is_a_clear_error_and_cancelled(slurm, tmp_path):
    options = {**_slurm_options(tmp_path), "job_extra_directives": ["--begin=now+1hour"]}
    spec = ClusterSpec(kind="slurm", workers=1, slurm=options, wait_timeout=3)
    with pytest.raises(ClusterError) as info, open_client(spec, tasks=4):
        pytest.fail("no worker can have started")
    message = str(info.value)
    assert "no Dask worker started within 3s" in message and "PENDING (BeginTime)" in message
    assert "\n" not in message
    job_id = message.split("job ", 1)[1].split()[0]
    assert job_id.isdigit()
    assert not _wait_no_jobs(), "the pending job was not cancelled"
    assert job_id not in squeue_jobs(ids=[job_id])


def test_job_rejected_by_slurm_is_a_clear_error(slurm, tmp_path):
    options = {**_slurm_options(tmp_path), "memory": "100000GB"}
    spec = ClusterSpec(kind="slurm", workers=1, slurm=options, wait_timeout=30)
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match=r"SLURM rejects the worker job \(.*\).*--mem="), open_client(spec):
        pytest.fail("unreachable")
    assert time.monotonic() - t0 < 20
    assert not _our_jobs()


def test_ctrl_c_of_the_cli_cancels_the_worker_jobs(slurm, data, tmp_path):
    profile = tmp_path / "site.yaml"
    profile.write_text(yaml.safe_dump({"cluster": {"kind": "slurm", "workers": 2, "slurm": _slurm_options(tmp_path)}}))
    cmd = [sys.executable, "-m", "pipeline.cli", "segment", str(data["scan"]), str(data["model"]),
           str(tmp_path / "int.zarr"), "--block", "8", "--exact", "--no-qc", "--cluster", "slurm",
           "--cluster-config", str(profile)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 90
        running: list[str] = []
        while time.monotonic() < deadline and proc.poll() is None:
            running = [i for i, (_, state) in _our_jobs().items() if state == "RUNNING"]
            if len(running) >= 2:
                break
            time.sleep(0.2)
        assert len(running) >= 2, f"jobs never ran: {_our_jobs()}"
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert not _wait_no_jobs(), "Ctrl-C left SLURM jobs behind"


def test_sbatch_template_is_accepted(slurm, tmp_path):
    template = ROOT / "deploy" / "slurm" / "studios-run.sbatch"
    config = tmp_path / "run.yaml"
    config.write_text("scan: {}\n")
    r = subprocess.run(["sbatch", "--test-only", "--cpus-per-task=1", "--mem=500M", "--time=00:05:00",
                        f"--job-name={PREFIX}-template", str(template), str(config)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "to start at" in r.stderr
    assert not _our_jobs()


def _job_state(job_id: str) -> tuple[str, str]:
    """(JobState, ExitCode) of a job from scontrol ("" while it is unknown)."""
    r = subprocess.run(["scontrol", "show", "job", job_id, "-o"], capture_output=True, text=True)
    fields = dict(f.split("=", 1) for f in r.stdout.split() if "=" in f)
    return fields.get("JobState", ""), fields.get("ExitCode", "")


def _done_blocks(seg: Path) -> int:
    done = seg / "ledger" / "done" / "c"
    return sum(1 for p in done.rglob("*") if p.is_file()) if done.exists() else 0


@pytest.mark.timeout(900)
def test_walltime_stop_then_the_same_sbatch_resumes(slurm, tmp_path):
    """The run job (deploy/slurm/studios-run.sbatch, unchanged) with a 3-minute time limit gets
    SLURM's pre-walltime SIGTERM, stops cleanly, and the same sbatch command, submitted again
    until it completes, resumes where each job stopped: output equal to an uninterrupted run."""
    template = ROOT / "deploy" / "slurm" / "studios-run.sbatch"
    model = save_bundle(init_bundle(classes=("void", "cement"), params=SMALL, seed=3), tmp_path / "model")
    out = tmp_path / "run"
    config = tmp_path / "walltime.yaml"
    config.write_text(yaml.safe_dump({
        "name": "walltime", "source": str(CEMENT), "output": str(out), "model": {"bundle": str(model)},
        "segment": {"block": [32, 32, 32]}, "cluster": {"kind": "local", "workers": 1, "threads_per_worker": 1},
        "qc": {"enabled": False}}))
    env = slow_blocks_env(1.5, {**os.environ, "STUDIOS_VENV": str(Path(sys.executable).parents[1]),
                                "PYTHONPATH": str(ROOT)})  # 64 blocks of >= 1.5 s: the run outlasts the first signal
    # 3 minutes: the template's --signal=B:TERM@90 arrives 60-90 s into each job (SLURM sends it
    # up to 30-60 s early), mid-run; the hard limit is the fallback
    cmd = ["sbatch", "--parsable", "--time=3", "--cpus-per-task=1", "--mem=2G", f"--job-name={PREFIX}-walltime",
           f"--output={tmp_path}/job-%j.out", str(template), str(config)]
    seg = out / "seg.zarr"
    jobs: list[tuple[str, str, str, int]] = []
    late = False
    for _ in range(5):
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        job_id = r.stdout.strip().split(";")[0]
        deadline = time.monotonic() + 240
        state, code = _job_state(job_id)
        while state in ("", "PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SIGNALING") and (
                time.monotonic() < deadline):
            time.sleep(1)
            state, code = _job_state(job_id)
        log = (tmp_path / f"job-{job_id}.out").read_text()
        jobs.append((job_id, state, code, _done_blocks(seg)))
        print(f"job {job_id}: {state} exit {code}, {jobs[-1][3]}/64 blocks done; log tail: {log.strip()[-300:]}")
        assert not seg.with_name("seg.zarr.lock").exists(), f"job {job_id} left the lock behind"
        if state == "COMPLETED":
            break
        assert state in ("FAILED", "TIMEOUT"), (state, log[-2000:])
        finished = seg.exists() and zarr.open_group(str(seg), mode="r").attrs["studios"].get("complete") is True
        if state == "FAILED" and not code.startswith("143") and finished and jobs[-1][3] == 64:
            late = True  # the signal landed after the output was complete (teardown): nothing to redo
            break
        if state == "FAILED":  # stopped by the pre-walltime SIGTERM: a clean stop
            assert code.startswith("143"), (code, log[-2000:])
            assert "studios: interrupted: " in log and "run the same command to" in log, log[-2000:]
    assert (jobs[-1][1] == "COMPLETED" or late) and len(jobs) >= 2, jobs
    assert any(0 < done < 64 for _, _, _, done in jobs[:-1]), jobs  # some job stopped half-way
    run = zarr.open_group(str(seg), mode="r").attrs["studios"]
    assert run["complete"] is True and run["run"]["blocks_resumed"] == jobs[-2][3], (run["run"], jobs)
    reference = tmp_path / "reference.zarr"
    segment(out / "scan.zarr", model, reference, block=32, executor=SerialExecutor(), qc=False)
    np.testing.assert_array_equal(_labels(seg), _labels(reference))
    assert not _wait_no_jobs(), "jobs left behind"
