"""A bounded chaos test: ten rounds, each killing the driver or a Dask worker with SIGTERM or
SIGKILL at a random moment, then rerunning the same command until it completes.

Every round must end with an output byte-identical to an uninterrupted run, no lock file, and,
after a clean stop (SIGTERM to the driver), no block computed twice: the rerun resumes exactly
the blocks the stopped run reported done. The seed is fixed (``STUDIOS_CHAOS_SEED`` overrides it)
so a failure can be replayed.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import tifffile
import zarr
from conftest import CEMENT, ROOT

from pipeline.compute.executors import SerialExecutor
from pipeline.ingest.run import ingest
from pipeline.io.bundle import init_bundle, save_bundle
from pipeline.segment.run import segment

ENV = {**os.environ, "DO_NOT_TRACK": "1", "PYTHONPATH": str(ROOT)}
ROUNDS = 10
BLOCKS = 27  # a 48^3 crop of the real cement scan in 16^3 blocks
MAX_RUNS = 6  # per round: the killed run and its reruns


@dataclass
class Round:
    target: str  # "driver" | "worker"
    sig: int
    after_blocks: int
    injected: bool = False
    survived: bool = False
    runs: int = 0
    detail: str = ""


def _done(out: Path) -> int:
    done = out / "ledger" / "done" / "c"
    return sum(1 for p in done.rglob("*") if p.is_file()) if done.exists() else 0


def _complete(out: Path) -> bool:
    try:
        return bool(zarr.open_group(str(out), mode="r").attrs.get("studios", {}).get("complete"))
    except Exception:
        return False


def _array_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != "zarr.json" and "ledger" not in p.parts and "model" not in p.parts}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("chaos")
    tifffile.imwrite(d / "crop.tif", tifffile.imread(CEMENT)[40:88, 40:88, 40:88])
    ingest(d / "crop.tif", d / "scan.zarr", chunks=(16, 16, 16))
    save_bundle(init_bundle(classes=("void", "cement"), params={"channels": 4, "dilations": [1, 2]}, seed=5),
                d / "model")
    segment(d / "scan.zarr", d / "model", d / "reference.zarr", block=16, executor=SerialExecutor(), qc=False)
    return d


def _command(small: Path, out: Path, target: str, address: str) -> list[str]:
    where = ["--cluster", "serial"] if target == "driver" else ["--scheduler", address, "--retries", "4"]
    return [sys.executable, "-m", "pipeline.cli", "segment", str(small / "scan.zarr"), str(small / "model"), str(out),
            "--block", "16", "--no-qc", *where]


def _worker_pids(address: str) -> list[int]:
    from distributed import Client

    with Client(address, timeout=30) as client:
        client.wait_for_workers(2, timeout=60)
        return sorted(client.run(os.getpid).values())


def _play(rnd: Round, rng: random.Random, small: Path, out: Path, address: str) -> None:
    cmd = _command(small, out, rnd.target, address)
    victims = _worker_pids(address) if rnd.target == "worker" else []
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rnd.runs = 1
    deadline = time.time() + 120
    while _done(out) < rnd.after_blocks and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.3))
    done_at_stop = -1
    if proc.poll() is None:
        victim = proc.pid if rnd.target == "driver" else rng.choice(victims)
        os.kill(victim, rnd.sig)
        rnd.injected = True
    stdout, stderr = proc.communicate(timeout=180)
    if rnd.target == "driver" and rnd.injected:
        done_at_stop = _done(out)
        if rnd.sig == signal.SIGTERM and proc.returncode == 143:
            line = stderr.strip().splitlines()[-1]
            assert line == f"studios: interrupted: {done_at_stop}/{BLOCKS} blocks done; run the same command to resume"
    # the same command until it completes (a signal that lands after the last block and the
    # output's completion, while the process exits, leaves a finished output: nothing to rerun)
    while proc.returncode != 0 and not _complete(out):
        assert rnd.runs < MAX_RUNS, f"round {rnd}: still failing after {rnd.runs} runs: {stderr[-2000:]}"
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stdout, stderr = proc.communicate(timeout=180)
        rnd.runs += 1
        if rnd.runs == 2 and done_at_stop >= 0 and rnd.sig == signal.SIGTERM and proc.returncode == 0:
            # a clean stop: the rerun resumes exactly what the stopped run finished, nothing twice
            assert f"({done_at_stop} resumed" in stdout, (done_at_stop, stdout)
    assert "--take-over-lock" not in stderr
    assert _array_bytes(out) == _array_bytes(small / "reference.zarr"), f"round {rnd}: output differs"
    assert not out.with_name(out.name + ".lock").exists(), f"round {rnd}: lock left behind"
    rnd.survived = True
    rnd.detail = f"{rnd.runs} run(s)" + (f", {done_at_stop} done at stop" if done_at_stop >= 0 else "")


def test_ten_rounds_of_random_kills(small, tmp_path, dask_address):
    seed = int(os.environ.get("STUDIOS_CHAOS_SEED", "20261202"))
    rng = random.Random(seed)
    targets = ["driver"] * 6 + ["worker"] * 4
    rng.shuffle(targets)
    rounds = [Round(target=t, sig=rng.choice([signal.SIGTERM, signal.SIGKILL]), after_blocks=rng.randint(1, 20))
              for t in targets[:ROUNDS]]
    t0 = time.time()
    for i, rnd in enumerate(rounds):
        _play(rnd, rng, small, tmp_path / f"round{i}.zarr", dask_address)
        print(f"chaos round {i}: {rnd.target} {signal.Signals(rnd.sig).name} after {rnd.after_blocks} blocks: "
              f"{'injected' if rnd.injected else 'run finished first'}, survived, {rnd.detail}")
    injected = sum(r.injected for r in rounds)
    survived = sum(r.survived and r.injected for r in rounds)
    print(f"chaos seed {seed}: {injected} faults injected, {survived} survived, {time.time() - t0:.0f}s")
    assert injected >= ROUNDS - 2 and survived == injected
