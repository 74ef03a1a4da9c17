"""A full disk is a clear error and leaves nothing that looks complete.

The disk is a real 256 KiB tmpfs mounted for the test (CI runs as root); where mounting is not
permitted, the same error path is driven by a file-size limit (RLIMIT_FSIZE) in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CEMENT, ROOT

ENV = {**os.environ, "DO_NOT_TRACK": "1"}


@pytest.fixture
def small_disk(tmp_path) -> Iterator[tuple[Path, list[str]]]:
    """(folder, command prefix): a tiny filesystem, or a size-limited process."""
    mnt = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode == 0
    if ok:
        yield mnt, [sys.executable, "-m", "pipeline.cli"]
        subprocess.run(["umount", str(mnt)], check=False)
    else:
        limit = "import resource,runpy,sys; resource.setrlimit(resource.RLIMIT_FSIZE,(200000,200000)); "
        code = limit + "sys.argv=['studios']+sys.argv[1:]; runpy.run_module('pipeline.cli.main', run_name='__main__')"
        yield mnt, [sys.executable, "-c", code]


def test_ingest_on_full_disk(small_disk):
    folder, cmd = small_disk
    out = folder / "scan.zarr"
    proc = subprocess.run([*cmd, "ingest", str(CEMENT), str(out)], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "writing failed" in lines[0] and "free space" in lines[0], proc.stderr
    assert not out.exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".scan.zarr.partial")]


def test_segment_on_full_disk(small_disk, tmp_path):
    folder, cmd = small_disk
    base = [sys.executable, "-m", "pipeline.cli"]
    subprocess.run([*base, "ingest", str(CEMENT), str(tmp_path / "scan.zarr")], cwd=ROOT, env=ENV, check=True)
    subprocess.run([*base, "model", "init", str(tmp_path / "m"), "--params", '{"channels": 4, "dilations": [1]}'],
                   cwd=ROOT, env=ENV, check=True)
    out = folder / "seg.zarr"
    proc = subprocess.run([*cmd, "segment", str(tmp_path / "scan.zarr"), str(tmp_path / "m"), str(out),
                           "--block", "32", "--probabilities", "--cluster", "serial", "--retries", "0", "--no-qc"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "free space" in lines[0], proc.stderr
    if out.exists():  # whatever was written is marked incomplete
        import zarr

        assert zarr.open_group(str(out), mode="r").attrs["studios"]["complete"] is False
