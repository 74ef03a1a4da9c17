"""Segmentation runs: resume, force, overwrite, locks, failures and retries, skipping."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import make_scan

from pipeline.compute.executors import SerialExecutor
from pipeline.core.errors import BlockFailedError, InputError, LedgerMismatchError, LockError, OutputExistsError
from pipeline.core.progress import RecordingReporter
from pipeline.io.bundle import init_bundle, save_bundle
from pipeline.io.store import open_image
from pipeline.segment.ledger import Ledger
from pipeline.segment.run import segment
from pipeline.testing.faults import FaultyExecutor

SMALL = {"channels": 4, "dilations": [1, 2], "head": 4}


@pytest.fixture
def scan(tmp_path, rng):
    return make_scan(tmp_path, rng.integers(0, 200, (24, 30, 33)).astype(np.uint8))


@pytest.fixture
def model(tmp_path):
    return save_bundle(init_bundle(classes=("a", "b"), params=SMALL, seed=2), tmp_path / "model")


def _labels(path: Path) -> np.ndarray:
    return np.asarray(zarr.open_group(str(path), mode="r")["0"][...])


def _run(scan, model, out, **kw):
    kw.setdefault("block", 16)
    kw.setdefault("executor", SerialExecutor())
    return segment(scan, model, out, **kw)


def test_summary_progress_and_ome_metadata(tmp_path, scan, model):
    rec = RecordingReporter()
    r = _run(scan, model, tmp_path / "s.zarr", reporter=rec, probabilities=True)
    assert r.blocks_total == r.blocks_done == 2 * 2 * 3
    assert rec.advanced == r.blocks_total
    assert sum(r.class_fractions.values()) == pytest.approx(1.0)
    labels = _labels(tmp_path / "s.zarr")
    assert labels.min() >= 1 and labels.max() <= 2
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert group.attrs["studios"]["complete"] is True
    assert group.attrs["ome"]["multiscales"][0]["datasets"][0]["path"] == "0"
    assert group["probabilities/0"].shape == (2, 24, 30, 33)
    img = open_image(tmp_path / "s.zarr", kind="segmentation")
    assert img.attrs["classes"] == ["a", "b"]


def test_rerun_of_finished_output_is_refused_then_overwritten(tmp_path, scan, model):
    out = tmp_path / "s.zarr"
    _run(scan, model, out)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        _run(scan, model, out)
    r = _run(scan, model, out, overwrite=True, block=32, chunks=(16, 16, 16))
    assert r.blocks_total == 1 * 1 * 2


def test_failed_block_reported_by_id_output_incomplete_then_resumed(tmp_path, scan, model):
    out = tmp_path / "s.zarr"
    # fails on the first attempt and no retries allowed: the run fails, naming the block
    with pytest.raises(BlockFailedError, match="1 of 12 blocks failed \\(0-1-2\\).*injected fault") as info:
        _run(scan, model, out, executor=FaultyExecutor(SerialExecutor(retries=0), tmp_path / "faults", fail=("0-1-2",)))
    assert set(info.value.failed) == {"0-1-2"}
    assert open_image(out, kind="segmentation", require_complete=False).complete is False
    with pytest.raises(InputError, match="incomplete"):
        open_image(out, kind="segmentation")
    # a writer killed between zarr's temporary file and its rename leaves an orphan: swept on resume
    orphan = out / "0" / "c" / "0" / f"0.{'ab' * 16}.partial"
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"half a chunk")
    keep = out / "0" / "c" / "notes.partial"  # not zarr's pattern: left alone
    keep.write_bytes(b"x")
    # the rerun resumes: only the failed block is computed
    rec = RecordingReporter()
    r = _run(scan, model, out, reporter=rec)
    assert r.blocks_resumed == 11 and rec.advanced == 1
    assert not orphan.exists() and keep.exists()
    keep.unlink()
    reference = tmp_path / "ref.zarr"
    _run(scan, model, reference)
    np.testing.assert_array_equal(_labels(out), _labels(reference))


def test_block_that_fails_once_is_retried(tmp_path, scan, model):
    executor = FaultyExecutor(SerialExecutor(retries=1), tmp_path / "faults", fail=("1-0-0",))
    r = _run(scan, model, tmp_path / "s.zarr", executor=executor)
    assert not r.failed and r.blocks_done == 12


def test_block_retried_on_dask(tmp_path, scan, model, dask_address):
    from distributed import Client

    from pipeline.compute.executors import DaskExecutor

    with Client(dask_address) as client:
        executor = FaultyExecutor(DaskExecutor(client, retries=1), tmp_path / "faults", fail=("0-0-1", "1-1-2"))
        r = segment(scan, model, tmp_path / "s.zarr", block=16, executor=executor)
    assert not r.failed and r.blocks_done == 12
    ref = tmp_path / "ref.zarr"
    _run(scan, model, ref)
    np.testing.assert_array_equal(_labels(tmp_path / "s.zarr"), _labels(ref))


def test_force_recomputes_all_blocks(tmp_path, scan, model):
    out = tmp_path / "s.zarr"
    with pytest.raises(BlockFailedError):
        _run(scan, model, out, executor=FaultyExecutor(SerialExecutor(retries=0), tmp_path / "faults", fail=("0-0-0",)))
    rec = RecordingReporter()
    _run(scan, model, out, force=True, reporter=rec)
    assert rec.advanced == 12


def test_changed_model_or_blocks_invalidate_ledger(tmp_path, scan, model):
    out = tmp_path / "s.zarr"
    with pytest.raises(BlockFailedError):
        _run(scan, model, out, executor=FaultyExecutor(SerialExecutor(retries=0), tmp_path / "faults", fail=("0-0-0",)))
    other = save_bundle(init_bundle(classes=("a", "b"), params=SMALL, seed=99), tmp_path / "other")
    with pytest.raises(LedgerMismatchError, match="model_fingerprint"):
        _run(scan, other, out)
    with pytest.raises(LedgerMismatchError, match="block"):
        _run(scan, model, out, block=8, chunks=(8, 8, 8))


def test_lock_names_holder_and_stale_lock_takeover(tmp_path, scan, model, caplog):
    from pipeline.io.lease import process_start_time

    out = tmp_path / "s.zarr"
    lock = tmp_path / "s.zarr.lock"
    me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": process_start_time(os.getpid()),
          "started": "2026-01-01T00:00:00"}
    lock.write_text(json.dumps(me))  # a live process with its start time: busy
    with pytest.raises(LockError, match=f"another run is writing it \\(host {socket.gethostname()}, pid {os.getpid()}"):
        _run(scan, model, out)
    assert not out.exists()
    # a live pid without a recorded start time cannot be checked: only --take-over-lock takes it
    lock.write_text(json.dumps({**me, "pid_started": 0}))
    with pytest.raises(LockError, match="cannot be checked.*--take-over-lock"):
        _run(scan, model, out)
    # a dead pid is taken over automatically, with one warning
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 12345, "started": "x"}))
    r = _run(scan, model, out)
    assert r.blocks_done == 12 and not lock.exists()
    assert "taking over the lock of a run that is gone" in caplog.text and "is gone" in caplog.text


def test_skip_constant_blocks_and_mask(tmp_path, rng, model):
    vol = rng.integers(0, 200, (32, 32, 32)).astype(np.uint8)
    vol[:16] = 7  # air: constant upper half
    scan = make_scan(tmp_path, vol)
    r = _run(scan, model, tmp_path / "s.zarr", skip_constant=True)
    labels = _labels(tmp_path / "s.zarr")
    # blocks whose read box (with halo) is constant are skipped and stay 0 = not computed
    assert r.blocks_skipped >= 1
    assert (labels[:16 - 3] == 0).all() and (labels[16:] > 0).all()
    mask = np.zeros_like(vol)
    mask[:, :, 16:] = 1
    mask_scan = make_scan(tmp_path, mask, name="mask.zarr")
    r = _run(scan, model, tmp_path / "m.zarr", mask=mask_scan)
    labels = _labels(tmp_path / "m.zarr")
    assert r.blocks_skipped == 4 and (labels[:, :, :16] == 0).all() and (labels[:, :, 16:] > 0).all()
    ledger = Ledger(zarr.open_group(str(tmp_path / "m.zarr"), mode="r"))
    assert (ledger.done_mask() == 2).sum() == 4


def test_bad_inputs_leave_nothing_behind(tmp_path, scan, model, rng):
    out = tmp_path / "s.zarr"
    with pytest.raises(InputError, match="does not exist"):
        _run(tmp_path / "missing.zarr", model, out)
    with pytest.raises(InputError, match="expected 'scan'"):
        _run(scan, model, tmp_path / "first.zarr")
        _run(tmp_path / "first.zarr", model, out)
    with pytest.raises(InputError, match="inside the input"):
        _run(scan, model, scan / "inner.zarr")
    bad_mask = make_scan(tmp_path, np.ones((5, 5, 5), np.uint8), name="badmask.zarr")
    with pytest.raises(InputError, match="mask shape"):
        _run(scan, model, out, mask=bad_mask)
    assert not out.exists() and not (tmp_path / "s.zarr.lock").exists()
