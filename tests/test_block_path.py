"""A block's path: plan, typed block stats, the worker cache, race-free numerics, fault injection."""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import zarr
from conftest import CEMENT

from pipeline.compute.executors import SerialExecutor
from pipeline.core.errors import DiskFullError, GeometryError, InputError, LedgerMismatchError, StorageError
from pipeline.core.tiling import plan_blocks
from pipeline.ingest.run import ingest
from pipeline.io.bundle import init_bundle, save_bundle
from pipeline.io.outputs import storage_error
from pipeline.io.store import read_padded
from pipeline.segment import plan as planning
from pipeline.segment.ledger import CONF_BINS, BlockStats, Ledger
from pipeline.segment.predict import NumericsGate, predict, predict_volume
from pipeline.segment.run import segment
from pipeline.segment.worker import CACHE, SegmentJob, run_block
from pipeline.testing.faults import FaultyBlock, FaultyExecutor, InjectedFault

SMALL = {"channels": 4, "dilations": [1, 2]}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("path")
    ingest(CEMENT, d / "scan.zarr")
    save_bundle(init_bundle(classes=("void", "cement"), params=SMALL, seed=3), d / "model")
    return d


# --- plan ----------------------------------------------------------------------------------------------


def test_plan_defaults_and_alignment():
    p = planning.make_plan((100, 300, 50), 4)
    assert p.block == (128, 128, 128) and p.chunks == (100, 128, 50) and p.grid == (1, 3, 1)
    assert len(p.blocks) == 3 and p.blocks[1].read.offset == (-4, 124, -4)
    p = planning.make_plan((64, 64, 64), 2, block=32)
    assert p.block == (32, 32, 32) and p.chunks == (32, 32, 32) and len(p.blocks) == 8
    with pytest.raises(GeometryError, match="multiple of 16"):
        planning.make_plan((64, 64, 64), 2, block=24, chunks=(16, 16, 16))
    with pytest.raises(InputError, match="one or three positive integers"):
        planning.make_plan((64, 64, 64), 2, block=(8, 8))


def test_gpu_block_comes_from_the_plan_module_with_given_memory():
    model = init_bundle(classes=("a", "b"), params=SMALL).build()
    small = planning.auto_block(model, chunks=(32, 32, 32), volume=(512,) * 3, free_bytes=2**30)
    large = planning.auto_block(model, chunks=(32, 32, 32), volume=(512,) * 3, free_bytes=8 * 2**30)
    assert small is not None and large is not None and np.prod(large) > np.prod(small)
    assert all(b % 32 == 0 for b in large)


# --- typed block stats ---------------------------------------------------------------------------------


def test_block_stats_round_trip_sum_and_validation():
    a = BlockStats(classes=3, voxels=8, read_s=0.5, counts=[1, 2, 5], isum=[1.0, 2.0, 3.0], isum2=[1, 4, 9],
                   confidence=np.arange(CONF_BINS), entropy_sum=0.25)
    row = a.to_row()
    assert row.dtype == np.float64 and row.shape == (BlockStats.width(3),)
    assert BlockStats.from_row(row, 3) == a
    b = a + a
    assert b.voxels == 16 and b.counts.tolist() == [2, 4, 10] and b.stage_seconds["read_s"] == 1.0
    with pytest.raises(ValueError, match="3 values"):
        BlockStats(classes=3, counts=[1, 2])
    with pytest.raises(ValueError):
        a.counts[0] = 7  # frozen arrays too
    assert BlockStats(classes=2).counts.tolist() == [0.0, 0.0]


def test_ledger_of_an_older_layout_is_refused_with_overwrite_hint(tmp_path, inputs):
    out = tmp_path / "s.zarr"
    segment(inputs / "scan.zarr", inputs / "model", out, block=64, executor=SerialExecutor(), qc=False)
    group = zarr.open_group(str(out), mode="r+")
    totals = Ledger(group).totals()
    assert totals.voxels == 128**3 and totals.counts.sum() == 128**3
    # an unfinished output written with the old string-keyed layout: resume is refused
    attrs = dict(group.attrs["studios"])
    group.attrs["studios"] = {**attrs, "complete": False}
    ledger = group["ledger"]
    del ledger.attrs["layout"]
    ledger.attrs["fields"] = ["voxels", "read_s"]
    old = Ledger(zarr.open_group(str(out), mode="r"))
    assert int((old.done_mask() > 0).sum()) == 8  # progress (dashboard) stays readable
    with pytest.raises(LedgerMismatchError, match="another studios version"):
        old.totals()
    with pytest.raises(LedgerMismatchError, match="another studios version.*--overwrite"):
        segment(inputs / "scan.zarr", inputs / "model", out, block=64, executor=SerialExecutor(), qc=False)


# --- worker cache --------------------------------------------------------------------------------------


def test_worker_cache_opens_once_per_run_and_never_serves_stale_handles(tmp_path, inputs):
    out = tmp_path / "s.zarr"
    before = dict(CACHE.misses)
    segment(inputs / "scan.zarr", inputs / "model", out, block=32, executor=SerialExecutor(), qc=False)
    assert CACHE.misses["runs"] == before["runs"] + 1  # 64 blocks, one opening
    first = np.asarray(zarr.open_group(str(out))["0"][...])
    # the output is replaced at the same path: the new run opens the new arrays
    segment(inputs / "scan.zarr", inputs / "model", out, block=64, chunks=(32, 32, 32), executor=SerialExecutor(),
            qc=False, overwrite=True, probabilities=True)
    assert CACHE.misses["runs"] == before["runs"] + 2
    group = zarr.open_group(str(out), mode="r")
    np.testing.assert_array_equal(np.asarray(group["0"][...]), first)
    assert Ledger(group).done_mask().shape == (2, 2, 2) and int(np.asarray(group["probabilities/0"][...]).max()) > 0


def test_run_block_returns_typed_stats(tmp_path, inputs):
    out = tmp_path / "s.zarr"
    segment(inputs / "scan.zarr", inputs / "model", out, block=64, executor=SerialExecutor(), qc=False)
    group = zarr.open_group(str(out), mode="r+")
    job = SegmentJob(scan=str(inputs / "scan.zarr"), output=str(out), model=str(out / "model"),
                     fingerprint="x", classes=2, offset=0.0, scale=1.0, run_id="test")
    from pipeline.io.bundle import load_bundle

    block = plan_blocks((128,) * 3, (64,) * 3, load_bundle(out / "model").halo)[5]
    result = run_block(job, block)
    stats = result["stats"]
    assert isinstance(stats, BlockStats) and stats.voxels == 64**3 and stats.counts.sum() == 64**3
    assert dict(Ledger(group).records())[block.index] == stats


# --- storage errors ------------------------------------------------------------------------------------


def test_one_errno_mapping_for_every_write():
    full = storage_error(Path("/x/seg.zarr"), OSError(errno.ENOSPC, "No space left on device"), what="block 0-1-2")
    assert isinstance(full, DiskFullError) and "writing block 0-1-2 failed" in str(full) and "free space" in str(full)
    other = storage_error(Path("/x/seg.zarr"), OSError(errno.EACCES, "Permission denied"))
    assert type(other) is StorageError and "writing failed" in str(other)


# --- numerics ------------------------------------------------------------------------------------------


def test_gate_keeps_other_numerics_out_until_the_running_block_leaves():
    gate = NumericsGate()
    original = torch.backends.mkldnn.enabled
    inside, events = threading.Event(), []

    def exact() -> None:
        with gate.hold(exact=True):
            inside.set()
            events.append(("exact in", torch.backends.mkldnn.enabled))
            time.sleep(0.3)
            events.append(("exact out", torch.backends.mkldnn.enabled))

    def default() -> None:
        inside.wait()
        with gate.hold(exact=False):
            events.append(("default in", torch.backends.mkldnn.enabled))

    threads = [threading.Thread(target=exact), threading.Thread(target=default)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert events == [("exact in", False), ("exact out", False), ("default in", original)]
    assert torch.backends.mkldnn.enabled == original
    with gate.hold(exact=True), gate.hold(exact=True):  # re-entry in the held mode
        assert not torch.backends.mkldnn.enabled
    with gate.hold(exact=True), pytest.raises(RuntimeError, match="cannot switch"), gate.hold(exact=False):
        pass


class _FlagProbe(torch.nn.Module):
    """A real model that records, per thread, the oneDNN flag it ran under (start and end of forward)."""

    seen: ClassVar[list[tuple[str, bool]]] = []  # class attribute: shared by deep copies (channels-last)

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = threading.current_thread().name
        self.seen.append((name, bool(torch.backends.mkldnn.enabled)))
        y = self.inner(x)
        time.sleep(0.005)  # widen the window in which another thread could flip the flag
        self.seen.append((name, bool(torch.backends.mkldnn.enabled)))
        return y


def test_exact_and_default_blocks_in_two_threads_equal_each_alone():
    """Real threads in one process: an exact and a default-numerics stream of blocks at once.

    Each gives the same probabilities as when run alone (exact: bit-identical to the exact
    whole-volume reference), and every forward pass ran under its own mode's oneDNN flag.
    """
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(40, 36, 44)).astype(np.float32)
    inner = init_bundle(classes=("a", "b", "c"), params={"channels": 8, "dilations": [1, 2, 4]}, seed=1).build()
    model: Any = _FlagProbe(inner)
    blocks = plan_blocks(volume.shape, (20, 18, 22), inner.halo)
    raws = [read_padded(volume, b, volume.shape) for b in blocks]
    reference = predict_volume(inner, volume, offset=0.0, scale=1.0, exact=True)
    default_flag = bool(torch.backends.mkldnn.enabled)

    def run(exact: bool) -> list[np.ndarray]:
        return [predict(model, r, offset=0.0, scale=1.0, exact=exact) for r in raws]

    alone = {False: run(False), True: run(True)}
    for b, p in zip(blocks, alone[True], strict=True):
        np.testing.assert_array_equal(p, reference[(slice(None), *b.write.to_slices())])
    together: dict[bool, list[list[np.ndarray]]] = {False: [], True: []}
    start = threading.Barrier(2)

    def worker(exact: bool) -> None:
        start.wait()
        for _ in range(3):
            together[exact].append(run(exact))

    _FlagProbe.seen.clear()
    threads = [threading.Thread(target=worker, args=(m,), name=f"exact={m}") for m in (True, False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for exact in (True, False):
        assert len(together[exact]) == 3
        for repeat in together[exact]:
            for got, want in zip(repeat, alone[exact], strict=True):
                np.testing.assert_array_equal(got, want)
    flags = {name: {flag for n, flag in _FlagProbe.seen if n == name} for name in ("exact=True", "exact=False")}
    assert flags == {"exact=True": {False}, "exact=False": {default_flag}}
    assert len(_FlagProbe.seen) == 2 * 2 * 3 * len(blocks)


# --- fault injection -----------------------------------------------------------------------------------


def test_faulty_block_fails_each_named_block_once(tmp_path):
    blocks = plan_blocks((8, 8, 8), (4, 4, 4), 0)
    fn = FaultyBlock(lambda job, block: {"id": block.id}, str(tmp_path / "state"), fail=("0-0-1",))
    outcome = SerialExecutor(retries=0).run(fn, None, blocks)
    assert list(outcome.failed) == ["0-0-1"] and "InjectedFault" in outcome.failed["0-0-1"]
    assert (tmp_path / "state" / "0-0-1").exists()
    outcome = SerialExecutor(retries=0).run(fn, None, blocks)  # the marker is on disk: it passes now
    assert not outcome.failed and len(outcome.results) == 8
    with pytest.raises(InjectedFault):
        FaultyBlock(fn.fn, str(tmp_path / "other"), fail=("0-0-0",))(None, blocks[0])


def test_faulty_executor_retries_and_resumes_a_real_segmentation(tmp_path, inputs):
    out = tmp_path / "s.zarr"
    executor = FaultyExecutor(SerialExecutor(retries=1), tmp_path / "faults", fail=("0-1-1",))
    result = segment(inputs / "scan.zarr", inputs / "model", out, block=64, executor=executor, qc=False)
    assert not result.failed and result.blocks_done == 8
    assert (tmp_path / "faults" / "0-1-1").exists()
