"""Flows, run profiles, the folder watcher and deployments, with the real services.

A Prefect server is started on loopback with its own temporary PREFECT_HOME (its own SQLite
database), analytics off. Flows run through it as a user would run them: ``studios run``,
``studios serve`` (deployments triggered through the REST API), ``studios deploy``. The test
process itself talks to the server over plain HTTP only.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "import sys; from pipeline.cli.main import main; sys.exit(main())"]  # = `studios`
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prefect_env(home: Path, api_url: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_HOME=str(home),
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120", PYTHONPATH=str(ROOT), **extra)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    """Stop a process group this test started (its own session)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@dataclass
class Server:
    url: str
    home: Path

    def get(self, path: str) -> Any:
        r = httpx.get(self.url + path, timeout=10)
        return r.json() if r.status_code == 200 else None

    def post(self, path: str, body: dict[str, Any]) -> Any:
        r = httpx.post(self.url + path, json=body, timeout=10)
        r.raise_for_status()
        return r.json()

    def state(self, flow_run_id: str) -> str:
        return str(self.get(f"/flow_runs/{flow_run_id}")["state"]["type"])

    def wait(self, flow_run_id: str, timeout: float = 240) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state(flow_run_id)
            if state in TERMINAL:
                return state
            time.sleep(1)
        raise AssertionError(f"flow run {flow_run_id} still {state} after {timeout}s")

    def run_deployment(self, name: str, parameters: dict[str, Any] | None = None) -> str:
        dep = self.get(f"/deployments/name/{name}")
        assert dep is not None, f"deployment {name} is not registered"
        run = self.post(f"/deployments/{dep['id']}/create_flow_run", {"parameters": parameters or {}})
        return str(run["id"])

    def artifacts(self, flow_run_id: str) -> list[dict[str, Any]]:
        return list(self.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}))

    def log_names(self, flow_run_id: str) -> set[str]:
        logs = self.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200})
        return {entry["name"] for entry in logs}


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = prefect_env(home, PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port),
                      PREFECT_SERVER_UI_ENABLED="false")
    log = open(home / "server.log", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).json() is True:
                    break
            except (httpx.HTTPError, ValueError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("prefect server did not start:\n" + (home / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield Server(url=url, home=home)
    finally:
        stop(proc)
        log.close()


def tiny_model(path: Path) -> Path:
    from pipeline.io.bundle import init_bundle, save_bundle

    save_bundle(init_bundle(classes=("dark", "bright"), params={"channels": 4, "dilations": [1], "head": 4}), path)
    return path


def write_slices(folder: Path, start: int, stop_: int, n: int = 24) -> None:
    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    for i in range(start, stop_):
        tifffile.imwrite(folder / f"slice_{i:04d}.tif", rng.integers(0, 255, (n, n), dtype=np.uint8))


# ---------------------------------------------------------------------------- run profiles


def test_profiles_in_configs_are_valid(tmp_path: Path) -> None:
    from pipeline.core.schema import load_yaml
    from pipeline.core.settings import ClusterOptions, load_run_config

    demo = load_run_config(ROOT / "configs" / "demo.yaml")  # files checked: the bundled scan exists
    assert Path(demo.source or "").is_file() and demo.model is not None and demo.model.kind == "train"
    assert demo.model.train is not None and demo.model.train.annotations.is_file()  # bundled: resolved
    for name in ("laptop", "gpu-node", "beamline"):
        cfg = load_run_config(ROOT / "configs" / f"{name}.yaml", require_source=False, check_files=False)
        assert cfg.model is not None
    beamline = load_run_config(ROOT / "configs" / "beamline.yaml", require_source=False, check_files=False)
    assert beamline.watch is not None and beamline.watch.interval == 60
    # the site profile written for `studios segment --cluster-config` plugs into a run profile
    site = ROOT / "configs" / "slurm-site.yaml"
    if site.exists():
        opts = ClusterOptions.parse(load_yaml(site)["cluster"], f"{site}: cluster")
        assert opts.kind == "slurm" and opts.spec().slurm
    params = demo.to_parameters()
    json.dumps(params)  # flow parameters are plain JSON


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("source: bundled:cement_128x128x128.tif\noutput: out\nmodel: {init: {}}\nsegmnt: {}\n",
         "unknown key(s) segmnt"),
        ("source: bundled:cement_128x128x128.tif\noutput: out\nmodel: {init: {}}\nsegment: {block: big}\n",
         "segment.block"),
        ("source: /no/such/scan.tif\noutput: out\nmodel: {init: {}}\n", "source: /no/such/scan.tif does not exist"),
        ("source: bundled:cement_128x128x128.tif\noutput: out\nmodel: {bundle: /no/model}\n", "model.bundle"),
        ("source: bundled:cement_128x128x128.tif\noutput: out\nmodel: {init: {}, bundle: x}\n",
         "exactly one of bundle, init, train"),
        ("source: bundled:cement_128x128x128.tif\noutput: out\nmodel: {init: {}}\ncluster: {kind: moon}\n",
         "cluster.kind"),
        ("source: bundled:nothing.tif\noutput: out\nmodel: {init: {}}\n", "no bundled file"),
        ("source: [1, 2\n", "not valid YAML"),
    ],
    ids=["unknown-key", "wrong-type", "missing-source", "missing-bundle", "two-models", "bad-kind", "bad-bundled",
         "bad-yaml"],
)
def test_bad_profile_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                                       expected: str) -> None:
    from pipeline.cli.main import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    code = main(["run", str(bad), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1, err
    assert err.startswith("studios: error: ") and str(bad) in err and expected in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- artifacts


def test_progress_reporter_is_throttled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """10^4 blocks make a handful of progress updates; the status file carries the same numbers."""
    import prefect.artifacts

    from flows.artifacts import ArtifactReporter
    from pipeline.service.runstate import RunStatus

    calls: list[tuple[str, float]] = []
    monkeypatch.setattr(prefect.artifacts, "create_progress_artifact",
                        lambda progress, key=None, description=None: calls.append(("create", progress)) or "id")
    monkeypatch.setattr(prefect.artifacts, "update_progress_artifact",
                        lambda artifact_id, progress, description=None: calls.append(("update", progress)) or "id")
    status = RunStatus(tmp_path, name="s")
    reporter = ArtifactReporter("segment-progress-s", status=status, min_interval=0.05)
    reporter.start("segment", 10_000)
    t0 = time.monotonic()
    for _ in range(10_000):
        reporter.advance(1, voxels=64**3)
    reporter.finish()
    elapsed = time.monotonic() - t0
    assert calls[0] == ("create", 0.0) and calls[-1] == ("update", 100.0)
    assert len(calls) <= 3 + elapsed / 0.05
    progress = json.loads((tmp_path / "studios-run.json").read_text())["progress"]
    assert progress["done"] == progress["total"] == 10_000 and progress["voxels_per_second"] > 0


# ---------------------------------------------------------------------------- with a server


@pytest.mark.prefect_server
def test_stage_flows_in_process(prefect_server: Server, tmp_path: Path) -> None:
    """ingest_flow (twice: the second reuses) -> segment_flow (blocks in-process) -> qc_flow with truth."""
    import tifffile
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.process import ingest_flow, qc_flow, segment_flow

    volume = np.random.default_rng(5).integers(0, 255, (16, 16, 16), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "vol.tif", volume)
    model = tiny_model(tmp_path / "model")
    with temporary_settings({PREFECT_API_URL: prefect_server.url}):
        scan = ingest_flow(str(tmp_path / "vol.tif"), str(tmp_path / "scan.zarr"), ingest={"chunks": [8, 8, 8]})
        again = ingest_flow(str(tmp_path / "vol.tif"), str(tmp_path / "scan.zarr"), ingest={"chunks": [8, 8, 8]})
        seg = segment_flow(str(tmp_path / "scan.zarr"), str(model), str(tmp_path / "seg.zarr"),
                           segment={"block": 8}, cluster={"kind": "serial"}, qc=False)
        truth = np.where(volume > 127, 2, 1).astype(np.uint8)
        np.save(tmp_path / "truth.npy", truth)
        qc = qc_flow(str(tmp_path / "seg.zarr"), truth=str(tmp_path / "truth.npy"), out_dir=str(tmp_path / "qc"))
    assert scan["shape"] == [16, 16, 16] and not scan["reused"] and again["reused"]
    assert seg["blocks_done"] == seg["blocks_total"] == 8 and not (tmp_path / "seg.zarr" / "qc").exists()
    assert qc["data"]["truth"]["mean_iou"] is not None and Path(qc["html"]).is_file()


@pytest.mark.prefect_server
def test_demo_profile_runs_on_server(prefect_server: Server, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run([*CLI, "run", str(ROOT / "configs" / "demo.yaml"), "--output", str(out)],
                          env=prefect_env(prefect_server.home, prefect_server.url), cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)  # ingest, train, segment, QC, analyse
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: cement-demo" in proc.stdout and "report" in proc.stdout
    status = json.loads((out / "studios-run.json").read_text())
    assert status["state"] == "done" and Path(status["outputs"]["report"]).is_file()
    analysis = json.loads(Path(status["outputs"]["analysis_json"]).read_text())  # the profile's analyse: stage
    porosity = analysis["phases"]["classes"]["void"]["fraction"]
    assert status["analysis"]["pore"] == {"class": "void", "fraction": porosity} and analysis["objects"]["count"] > 0
    assert '<section id="analysis">' in Path(status["outputs"]["report"]).read_text()
    assert len(json.loads(Path(status["outputs"]["qc_json"]).read_text())["suggestions"]) == 3  # qc: {suggest: 3}
    assert (out / "seg.analysis" / "meshes" / "void.stl").is_file() and "analysis_json" in proc.stdout
    run_id = status["flow_run_id"]
    assert status["flow_run_url"].endswith(run_id)
    assert prefect_server.state(run_id) == "COMPLETED"
    arts = {a["key"]: a for a in prefect_server.artifacts(run_id)}
    summary = arts["process-scan-cement-demo"]
    assert summary["type"] == "markdown" and "## QC" in summary["data"] and str(out / "seg.zarr") in summary["data"]
    assert f"porosity (void) | {100 * porosity:.3g} %" in summary["data"], summary["data"]
    progress = arts["segment-progress-cement-demo"]
    assert progress["type"] == "progress" and float(progress["data"]) == 100.0
    assert "8/8 blocks" in progress["description"]
    # library logs in the run
    assert {"pipeline.ingest.run", "pipeline.qc.run", "pipeline.analyse.run"} <= prefect_server.log_names(run_id)


@pytest.mark.prefect_server
def test_served_watcher_processes_each_complete_scan_once(
    prefect_server: Server, dask_address: str, tmp_path: Path
) -> None:
    inc, out = tmp_path / "incoming", tmp_path / "processed"
    inc.mkdir()
    model = tiny_model(tmp_path / "model")
    profile = tmp_path / "beamline.yaml"
    profile.write_text(f"""
output: {out}
watch: {{incoming: {inc}, interval: 3600, completion: either, settle_seconds: 3600}}
model: {{bundle: {model}}}
ingest: {{chunks: [16, 16, 16]}}
segment: {{block: 16}}
cluster: {{kind: address, address: "{dask_address}"}}
qc: {{enabled: false}}   # QC through a server is covered by the demo test
""")
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115
    serve = subprocess.Popen([*CLI, "serve", str(profile), "--paused"], cwd=ROOT, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True,
                             env=prefect_env(prefect_server.home, prefect_server.url))
    try:
        deadline = time.monotonic() + 120
        while prefect_server.get("/deployments/name/watch-folder/watch-beamline") is None:
            assert serve.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        assert prefect_server.get("/deployments/name/process-scan/process-scan") is not None

        write_slices(inc / "scan_a", 0, 24)
        (inc / "scan_a.complete").touch()
        write_slices(inc / "scan_b", 0, 10)  # still being written: no marker yet
        (inc / "scan_b" / "slice_0010.tif").write_bytes(b"II*\x00\x08\x00")  # a half-written TIFF
        (inc / "broken.tif").write_bytes(b"II*\x00not a tiff")  # complete but unreadable: fails alone
        (inc / "broken.complete").touch()

        first = prefect_server.run_deployment("watch-folder/watch-beamline")
        assert prefect_server.wait(first) == "COMPLETED", (tmp_path / "serve.log").read_text()[-4000:]
        status_a = json.loads((out / "scan_a" / "studios-run.json").read_text())
        assert status_a["state"] == "done" and not (out / "scan_b").exists()
        state = json.loads((out / ".studios-watch" / "state.json").read_text())
        assert state["scans"]["scan_a"]["state"] == "done" and "scan_b" not in state["scans"]
        assert "scan_b" in state["seen"]
        broken = state["scans"]["broken"]
        assert broken["state"] == "failed" and "broken.tif" in broken["error"]
        assert json.loads((out / "broken" / "studios-run.json").read_text())["state"] == "failed"
        firing_art = {a["key"]: a for a in prefect_server.artifacts(first)}["watch-folder"]
        assert "scan_a" in firing_art["data"] and "scan_b" in firing_art["data"]  # processed / waiting
        assert "1 failed" in firing_art["data"]
        sub = {a["key"]: a for a in prefect_server.artifacts(status_a["flow_run_id"])}
        assert sub["process-scan-scan-a"]["type"] == "markdown" and float(sub["segment-progress-scan-a"]["data"]) == 100

        write_slices(inc / "scan_b", 10, 24)  # the writer finishes, then drops its marker
        (inc / "scan_b" / "DONE").touch()
        second = prefect_server.run_deployment("watch-folder/watch-beamline")
        assert prefect_server.wait(second) == "COMPLETED", (tmp_path / "serve.log").read_text()[-4000:]
        state = json.loads((out / ".studios-watch" / "state.json").read_text())
        assert state["scans"]["scan_b"]["state"] == "done" and state["scans"]["scan_b"]["attempts"] == 1
        assert state["scans"]["scan_a"]["attempts"] == state["scans"]["broken"]["attempts"] == 1  # not again
        assert json.loads((out / "scan_a" / "studios-run.json").read_text())["flow_run_id"] == status_a["flow_run_id"]
        firing2 = {a["key"]: a for a in prefect_server.artifacts(second)}["watch-folder"]["data"]
        assert "1 processed now" in firing2 and "scan_b" in firing2
        from pipeline.io.store import open_image

        assert open_image(out / "scan_b" / "seg.zarr", kind="segmentation").shape == (24, 24, 24)
    except (AssertionError, KeyError, FileNotFoundError) as exc:  # keep what the server saw with the failure
        log.flush()
        raise AssertionError(f"{type(exc).__name__}: {exc}\n--- serve.log (tail) ---\n"
                             f"{(tmp_path / 'serve.log').read_text()[-4000:]}") from exc
    finally:
        stop(serve, signal.SIGINT)
        log.close()


@pytest.mark.prefect_server
def test_studios_deploy_registers_the_deployments(prefect_server: Server, tmp_path: Path) -> None:
    proc = subprocess.run([*CLI, "deploy"], env=prefect_env(prefect_server.home, prefect_server.url), cwd=tmp_path,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    watch = prefect_server.get("/deployments/name/watch-folder/watch-beamline")
    scan = prefect_server.get("/deployments/name/process-scan/process-scan")
    assert watch["work_pool_name"] == scan["work_pool_name"] == "studios"
    assert watch["entrypoint"] == "flows/watch.py:watch_folder"
    assert scan["entrypoint"] == "flows/process.py:process_scan"
    assert [s["schedule"]["interval"] for s in watch["schedules"]] == [120.0]
    assert prefect_server.get("/work_pools/studios")["type"] == "process"
