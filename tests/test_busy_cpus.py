"""How many CPUs other processes keep busy now (/proc/stat), and the training threads it leaves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.compute.hosts import busy_cpus, cpu_count
from pipeline.train.loop import default_threads

linux = pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux /proc/stat")


@linux
def test_a_spinning_process_counts_as_a_busy_cpu():
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = busy_cpus(interval=0.5)
    finally:
        spin.kill()
        spin.wait()
    assert busy is not None and 0.5 <= busy <= (os.cpu_count() or 1) + 1e-9


@linux
def test_default_threads_lie_between_one_and_the_cpus():
    assert 1 <= default_threads() <= cpu_count()


def test_an_unreadable_or_frozen_stat_gives_none(tmp_path):
    assert busy_cpus(interval=0.01, stat=tmp_path / "missing") is None
    frozen = tmp_path / "stat"
    frozen.write_text("cpu  10 0 5 100 1 0 0 0 0 0\ncpu0 10 0 5 100 1 0 0 0 0 0\n")
    assert busy_cpus(interval=0.01, stat=frozen) is None  # no tick between the samples
    frozen.write_text("intr 1 2 3\n")
    assert busy_cpus(interval=0.01, stat=frozen) is None
