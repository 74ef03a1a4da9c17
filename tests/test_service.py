"""pipeline.service without Prefect: the exactly-once watcher, the run decisions, run state, summaries.

Everything here runs on real files (real TIFF stacks, real ingest and segmentation on tiny
volumes); no Prefect server, no Prefect import (checked in a subprocess).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.core.errors import ConfigError, InputError, ModelError, OutputExistsError, StorageError
from pipeline.core.settings import (
    ClusterOptions,
    IngestOptions,
    ModelInit,
    ModelOptions,
    RunConfig,
    SegmentOptions,
)
from pipeline.core.settings import TrainOptions as TrainOpts
from pipeline.service import incoming
from pipeline.service import process as proc
from pipeline.service.runstate import RunStatus, StatusReporter
from pipeline.service.summary import look_markdown, md, summary_markdown

ROOT = Path(__file__).resolve().parents[1]


def write_slices(folder: Path, start: int, stop: int, n: int = 16) -> None:
    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        tifffile.imwrite(folder / f"slice_{i:04d}.tif", rng.integers(0, 255, (n, n), dtype=np.uint8))


def test_service_and_dashboard_data_import_without_prefect(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "import pipeline.service.incoming, pipeline.service.process, pipeline.service.runstate\n"
        "import pipeline.service.scans, pipeline.service.summary, pipeline.qc.report\n"
        "from pipeline.service.scans import PrefectLinks, collect\n"
        f"print(collect(Path({str(tmp_path)!r}), PrefectLinks(None, None)))\n"
        "bad = sorted(m for m in ('prefect', 'fastapi', 'distributed') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"


# ---------------------------------------------------------------------------- watcher rules


def test_watch_completion_rules_and_claims(tmp_path: Path) -> None:
    from pipeline.service.incoming import WatchState, discover, ready_scans

    inc = tmp_path / "incoming"
    write_slices(inc / "a", 0, 8)
    (inc / "a.complete").touch()  # the writer's marker
    write_slices(inc / "b", 0, 4)  # a TIFF stack still being written, no marker
    np.save(inc / "c.npy", np.zeros((4, 4, 4), np.uint8))  # no marker: must settle
    (inc / ".hidden.tif").write_bytes(b"x")
    (inc / "d.tif.part").write_bytes(b"x")
    found = {c.name: c for c in discover(inc)}
    assert set(found) == {"a", "b", "c"}

    state = WatchState(tmp_path / "state")
    with state.edit() as data:
        ready, waiting = ready_scans(list(found.values()), data, completion="either", settle_seconds=60, now=1000)
    assert [c.name for c in ready] == ["a"] and set(waiting) == {"b", "c"}
    write_slices(inc / "b", 4, 5)  # b grows between looks; c does not change
    with state.edit() as data:
        ready, _ = ready_scans(discover(inc), data, completion="either", settle_seconds=60, now=1070)
    assert {c.name for c in ready} == {"a", "c"}  # c settled across two looks; b changed, never picked up
    with WatchState(tmp_path / "state").edit() as data:  # a restart reads the same looks
        ready, waiting = ready_scans(discover(inc), data, completion="marker", settle_seconds=0, now=5000)
    assert {c.name for c in ready} == {"a"} and waiting["b"] == "no completion marker yet"

    # two overlapping firings: exactly one claim wins
    wins: list[bool] = []
    barrier = threading.Barrier(6)

    def firing() -> None:
        barrier.wait()
        wins.append(WatchState(tmp_path / "state").claim("a", {"scan": "a"}))

    threads = [threading.Thread(target=firing) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 5 + [True]

    # a claim left by a process that died on this host is taken over
    dead = subprocess.Popen(["true"])
    dead.wait()
    state.claim_path("b").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    assert state.claim("b", {"scan": "b"})
    assert not state.claim("b", {"scan": "b"})


def _settings(tmp_path: Path, **kw: Any) -> incoming.WatchSettings:
    return incoming.WatchSettings(tmp_path / "incoming", tmp_path / "out", completion="marker", **kw)


def test_looks_process_each_scan_exactly_once(tmp_path: Path) -> None:
    inc = tmp_path / "incoming"
    for name in ("good", "bad", "crash"):
        write_slices(inc / name, 0, 4)
        (inc / f"{name}.complete").touch()
    settings = _settings(tmp_path)
    calls: list[str] = []

    def runner(c: incoming.Candidate, out: Path) -> str | None:
        calls.append(c.name)
        if c.name == "crash":
            raise RuntimeError("worker lost\nsecond line")
        return "InputError: unreadable slice" if c.name == "bad" else None

    state = incoming.WatchState(settings.state_path)
    look = incoming.claim_ready(state, settings, firing="f1")
    assert [c.name for c in look.claimed] == ["good", "bad", "crash"] and look.seen == 3
    assert json.loads((tmp_path / "out" / "good" / "studios-run.json").read_text())["state"] == "queued"
    results = {c.name: incoming.process_claimed(state, c, settings.output_root, runner) for c in look.claimed}
    assert {n: r["state"] for n, r in results.items()} == {"good": "done", "bad": "failed", "crash": "failed"}
    assert results["crash"]["error"] == "RuntimeError: worker lost second line"
    assert json.loads((tmp_path / "out" / "bad" / "studios-run.json").read_text())["state"] == "failed"
    claims = settings.state_path / "claims"
    assert json.loads((claims / "good.claim").read_text())["state"] == "done"
    assert not (claims / "bad.claim").exists() and not (claims / "crash.claim").exists()  # released

    again = incoming.claim_ready(incoming.WatchState(settings.state_path), settings, firing="f2")  # a restart
    assert again.claimed == () and again.waiting["bad"] == "failed earlier; waits for its files to change"
    write_slices(inc / "bad", 4, 5)  # the failed scan's files change: retried, once
    third = incoming.claim_ready(state, settings, firing="f3")
    assert [c.name for c in third.claimed] == ["bad"]
    incoming.process_claimed(state, third.claimed[0], settings.output_root, lambda c, out: None)
    record = json.loads((settings.state_path / "state.json").read_text())["scans"]
    assert record["bad"]["state"] == "done" and record["bad"]["attempts"] == 2 and record["good"]["attempts"] == 1
    assert calls == ["good", "bad", "crash"]
    table = look_markdown(inc, results, again.waiting)
    assert "3 processed now, 2 waiting, 2 failed" in table and "| crash | failed | RuntimeError" in table


def test_concurrent_looks_claim_a_scan_once(tmp_path: Path) -> None:
    inc = tmp_path / "incoming"
    inc.mkdir()
    for i in range(4):
        np.save(inc / f"s{i}.npy", np.zeros((2, 2, 2)))
        (inc / f"s{i}.complete").touch()
    settings = _settings(tmp_path, max_scans=3)
    looks: list[incoming.Look] = []
    barrier = threading.Barrier(4)

    def firing(i: int) -> None:
        barrier.wait()
        looks.append(incoming.claim_ready(incoming.WatchState(settings.state_path), settings, firing=f"f{i}"))

    threads = [threading.Thread(target=firing, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = [c.name for look in looks for c in look.claimed]
    assert sorted(claimed) == ["s0", "s1", "s2", "s3"]  # each once, whoever looked first
    assert max(len(look.claimed) for look in looks) <= 3  # max_scans per look


def test_watch_settings_errors_name_the_problem(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    with pytest.raises(ConfigError, match="no output root"):
        incoming.watch_settings(None, str(tmp_path / "in"), None, {})
    with pytest.raises(ConfigError, match="incoming folder .* does not exist"):
        incoming.watch_settings(None, str(tmp_path / "nowhere"), str(tmp_path / "out"), {})
    with pytest.raises(ConfigError, match="completion"):
        incoming.watch_settings(None, str(tmp_path / "in"), str(tmp_path / "out"), {"completion": "soon"})
    profile = tmp_path / "p.yaml"
    profile.write_text(f"output: {tmp_path / 'out'}\nwatch: {{incoming: {tmp_path / 'in'}, max_scans: 2}}\n")
    s = incoming.watch_settings(str(profile), None, None, {"settle_seconds": 5})
    assert (s.max_scans, s.settle_seconds, s.state_path) == (2, 5, tmp_path / "out" / ".studios-watch")


# ---------------------------------------------------------------------------- run decisions


def test_parameters_and_plan(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        proc.parse_options({"chunk": 8}, IngestOptions, "ingest")
    with pytest.raises(ConfigError, match="missing source, model"):
        proc.plan_run(RunConfig(output=tmp_path / "o"))
    cfg = proc.resolve_parameters(str(ROOT / "pipeline" / "data" / "cement_128x128x128.tif"), str(tmp_path / "o"),
                                  model={"init": {}}, qc={"enabled": False})
    plan = proc.plan_run(cfg)
    assert plan.name == "cement_128x128x128" and plan.segmentation == tmp_path / "o" / "seg.zarr"
    assert set(plan.outputs()) == {"scan", "model", "segmentation"}  # no QC outputs when QC is off
    assert proc.train_options("a.json", epochs=3, arch=None).train == TrainOpts(annotations=Path("a.json"), epochs=3)
    assert not proc.retryable(InputError("x")) and not proc.retryable(OutputExistsError("x"))
    assert proc.retryable(StorageError("disk")) and proc.retryable(RuntimeError("cluster lost"))


def test_model_source_decisions(tmp_path: Path) -> None:
    from pipeline.io.bundle import load_bundle

    init = ModelOptions(init=ModelInit(classes=("a", "b"), params={"channels": 4, "dilations": [1], "head": 4}))
    first = proc.prepare_model(tmp_path / "scan.zarr", init, tmp_path / "model")
    again = proc.prepare_model(tmp_path / "scan.zarr", init, tmp_path / "model")
    assert first["kind"] == "init" and first["fingerprint"] == again["fingerprint"]
    other = ModelOptions(init=ModelInit(classes=("a", "b"), params={"channels": 4, "dilations": [1], "head": 4},
                                        seed=1))
    with pytest.raises(OutputExistsError, match="holds another model"):
        proc.prepare_model(tmp_path / "scan.zarr", other, tmp_path / "model")
    replaced = proc.prepare_model(tmp_path / "scan.zarr", other, tmp_path / "model", overwrite=True)
    assert load_bundle(tmp_path / "model").fingerprint == replaced["fingerprint"] != first["fingerprint"]
    bundle = proc.prepare_model(tmp_path / "scan.zarr", ModelOptions(bundle=tmp_path / "model"), tmp_path / "x")
    assert bundle == {"bundle": str(tmp_path / "model"), "kind": "bundle"} and not (tmp_path / "x").exists()
    with pytest.raises(ModelError):
        proc.prepare_model(tmp_path / "scan.zarr", ModelOptions(bundle=tmp_path / "none"), tmp_path / "x")
    # a trained model already in the folder is reused: no training (the annotations do not even exist)
    train = ModelOptions(train=TrainOpts(annotations=tmp_path / "no-annotations.json"))
    assert proc.prepare_model(tmp_path / "scan.zarr", train, tmp_path / "model")["reused"] is True


def test_finished_outputs_are_reused_only_for_the_same_inputs(tmp_path: Path) -> None:
    np.save(tmp_path / "vol.npy", np.random.default_rng(0).integers(0, 255, (16, 16, 16), dtype=np.uint8))
    np.save(tmp_path / "other.npy", np.zeros((16, 16, 16), dtype=np.uint8))
    status = RunStatus(tmp_path / "run", name="vol")
    options = IngestOptions(chunks=(8, 8, 8))
    scan = tmp_path / "run" / "scan.zarr"
    made = proc.ingest_scan(str(tmp_path / "vol.npy"), scan, options, status=status)
    reused = proc.ingest_scan(str(tmp_path / "vol.npy"), scan, options, status=status)
    assert not made["reused"] and reused["reused"] and reused["shape"] == [16, 16, 16]
    assert status.data["stage"] == "ingest" and status.data["progress"]["stage"] == "ingest"
    with pytest.raises(OutputExistsError):  # same output, another source: not reused, not replaced
        proc.ingest_scan(str(tmp_path / "other.npy"), scan, options)

    model = tmp_path / "model"
    proc.prepare_model(scan, ModelOptions(init=ModelInit(params={"channels": 4, "dilations": [1], "head": 4})), model)
    seg = tmp_path / "run" / "seg.zarr"
    args = (SegmentOptions(block=8), ClusterOptions(kind="serial"))
    first = proc.segment_scan(scan, model, seg, *args)
    second = proc.segment_scan(scan, model, seg, *args)
    assert not first["reused"] and second["reused"] and second["blocks_done"] == first["blocks_done"] == 8
    assert proc.reusable_segmentation(seg, tmp_path / "elsewhere.zarr", model) is None
    qc = proc.check_segmentation(seg, scan=scan, out_dir=tmp_path / "run" / "qc")
    warnings, data = proc.qc_parts(qc)
    assert Path(qc["json"]).is_file() and data["status"] == "complete" and warnings == data["warnings"]
    assert proc.qc_parts(None) == ([], {})
    assert ("blocks", "8/8 (0 resumed, 0 skipped)") in proc.segment_facts(first)


# ---------------------------------------------------------------------------- run state, summaries


def test_status_reporter_is_throttled_and_mirrors_progress(tmp_path: Path) -> None:
    published: list[bool] = []

    class Counting(StatusReporter):
        def published(self, *, first: bool) -> None:
            published.append(first)

    status = RunStatus(tmp_path, name="s")
    reporter = Counting(status, min_interval=0.05)
    reporter.start("segment", 10_000)
    t0 = time.monotonic()
    for _ in range(10_000):
        reporter.advance(1, voxels=32**3)
    reporter.finish()
    elapsed = time.monotonic() - t0
    assert published[0] is True and published.count(True) == 1 and 2 <= len(published) <= 3 + elapsed / 0.05
    progress = json.loads((tmp_path / "studios-run.json").read_text())["progress"]
    assert progress["done"] == progress["total"] == 10_000 and progress["eta_seconds"] == 0.0
    assert reporter.describe().startswith("segment: 10000/10000 blocks (100%), ")
    with pytest.raises(ConfigError, match="not one of"):
        status.update(state="exploded")


def test_summaries_escape_markup() -> None:
    assert md("<b>a|b</b>\n`x`") == "&lt;b&gt;a\\|b&lt;/b&gt; 'x'"
    text = summary_markdown("t <i>", state="done", facts=[("shape", "8x8x8"), ("mean", 0.123456)],
                            qc={"status": "complete", "classes": [{"name": "pore", "fraction": 0.25}]},
                            warnings=["<script>"], outputs={"report": "/a|b"})
    assert "# t &lt;i&gt;" in text and "| mean | 0.1235 |" in text and "| fraction pore | 25.00 % |" in text
    assert "- &lt;script&gt;" in text and "| report | /a\\|b |" in text and "<script>" not in text


def test_watch_schedule_arguments_win_over_the_profile(tmp_path: Path) -> None:
    from pipeline.core.settings import WatchOptions

    every = WatchOptions(incoming=tmp_path, interval=60)
    cron = WatchOptions(incoming=tmp_path, cron="*/5 * * * *")
    assert incoming.watch_schedule(WatchOptions(incoming=tmp_path)) == ("interval", 120.0)
    assert incoming.watch_schedule(every) == ("interval", 60.0)
    assert incoming.watch_schedule(every, interval=5) == ("interval", 5.0)
    assert incoming.watch_schedule(every, cron="0 * * * *") == ("cron", "0 * * * *")
    assert incoming.watch_schedule(cron) == ("cron", "*/5 * * * *")
    assert incoming.watch_schedule(cron, interval=30) == ("interval", 30.0)  # --interval overrides


def test_run_lines() -> None:
    from pipeline.service.summary import run_lines

    result = {"name": "s", "seconds": 3.21, "segment": {"blocks_done": 8, "blocks_total": 8, "reused": True},
              "outputs": {"scan": "/o/scan.zarr", "report": "", "segmentation": "/o/seg.zarr"},
              "qc_warnings": ["class pore covers 0.01 % of the volume"]}
    assert run_lines(result) == ["done: s in 3.2s; 8/8 blocks (reused)", "  scan          /o/scan.zarr",
                                 "  segmentation  /o/seg.zarr", "  warning: class pore covers 0.01 % of the volume"]
