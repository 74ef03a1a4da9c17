"""The monitoring dashboard (`studios dashboard`), served for real and opened in headless Chromium.

The root holds what runs leave behind: a finished scan (complete segmentation, QC report, run
status), a running one (an incomplete ledger: half of its blocks done, a live status file), one
whose name carries markup, an incoming scan the watcher is still waiting for, and a series of
three analysed scans (``studios analyse``: fibre fraction, porosity, thumbnail, trend).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "import sys; from pipeline.cli.main import main; sys.exit(main())"]  # = `studios`
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
EVIL = "<script>alert(1)</script>"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _segmented(folder: Path, model: Path) -> Path:
    """A small ingested + segmented scan in ``folder`` (in-process, serial: no cluster needed)."""
    from pipeline.compute.executors import SerialExecutor
    from pipeline.ingest.run import ingest_array
    from pipeline.segment.run import segment

    folder.mkdir(parents=True)
    volume = np.random.default_rng(3).integers(0, 255, (16, 16, 16), dtype=np.uint8)
    ingest_array(volume, folder / "scan.zarr", chunks=(8, 8, 8))
    segment(folder / "scan.zarr", model, folder / "seg.zarr", block=8, executor=SerialExecutor(), qc=False)
    return folder / "seg.zarr"


@pytest.fixture(scope="module")
def scans_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import zarr

    from pipeline.io.bundle import init_bundle, save_bundle
    from pipeline.io.store import set_studios_attrs
    from pipeline.qc.run import run_qc
    from pipeline.service.runstate import RunStatus

    base = tmp_path_factory.mktemp("dash")
    root = base / "processed"
    model = save_bundle(init_bundle(classes=("pore", "matrix"), params={"channels": 4, "dilations": [1], "head": 4}),
                        base / "model")
    (base / "secret.txt").write_text("outside the root\n")

    done = _segmented(root / "scan_done", model)
    qc = run_qc(done, out_dir=root / "scan_done" / "qc", seam_samples=0)
    RunStatus(root / "scan_done", name="scan_done").update(
        state="done", source="/beamline/incoming/scan_done", started="2026-01-01T10:00:00+00:00",
        finished="2026-01-01T10:01:00+00:00", flow_run_id="0f0e0d0c-1111-2222-3333-444455556666",
        flow_run_url="http://127.0.0.1:4200/runs/flow-run/0f0e0d0c-1111-2222-3333-444455556666",
        outputs={"segmentation": str(done), "qc_json": str(qc.json_path), "report": str(qc.report_path)},
        qc={"warnings": list(qc.warnings)})

    running = _segmented(root / "scan_running", model)
    group = zarr.open_group(str(running), mode="r+")
    group["ledger"]["done"][0] = 0  # half the blocks not done yet: an incomplete ledger
    set_studios_attrs(group, complete=False)
    RunStatus(root / "scan_running", name="scan_running").update(
        state="running", stage="segment", started="2026-01-01T10:00:00+00:00",
        flow_run_id="aaaaaaaa-1111-2222-3333-444455556666", dask_dashboard="http://127.0.0.1:8787/status",
        progress={"stage": "segment", "done": 4, "total": 8, "voxels": 2048, "voxels_per_second": 1.5e6,
                  "eta_seconds": 42.0})

    RunStatus(root / "evil", name=EVIL).update(state="failed", error=f"boom {EVIL}", source=f"/in/{EVIL}",
                                              flow_run_url="javascript:alert(2)")
    watch = root / ".studios-watch"
    watch.mkdir()
    (watch / "state.json").write_text(json.dumps({
        "schema": "studios-watch/1", "scans": {},
        "seen": {"scan_incoming": {"fingerprint": "x", "since": time.time(), "files": 12, "bytes": 3000}}}))
    (root / "link_out").symlink_to(base / "secret.txt")
    _series(root / "series_a")
    return root


#: (name, started, fibre fraction, pore fraction) of the series; started out of name order.
SERIES = (("t002", "2026-01-02T09:00:00+00:00", 0.30, 0.02), ("t000", "2026-01-02T07:00:00+00:00", 0.10, 0.06),
          ("t001", "2026-01-02T08:00:00+00:00", 0.20, 0.04))


def _series(folder: Path) -> None:
    """Three analysed segmentations of an in-situ series (fibre grows, porosity shrinks)."""
    from analyse_helpers import blobs, make_seg

    from pipeline.analyse import analyse
    from pipeline.service.runstate import RunStatus

    shape = (16, 16, 16)
    for i, (name, started, fibre, pore) in enumerate(SERIES):
        scan = folder / name
        scan.mkdir(parents=True)
        lab = np.ones(shape, np.uint8)
        lab[blobs(shape, 10 + i, fraction=fibre)] = 2
        lab[blobs(shape, 20 + i, fraction=pore) & (lab == 1)] = 3
        analyse(make_seg(scan / "seg.zarr", lab, ("matrix", "fibre", "pore")), meshes=False, max_radius=2, rho=1.0)
        RunStatus(scan, name=name).update(state="done", started=started, finished=started)


@pytest.fixture(scope="module")
def dashboard(scans_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    log_path = tmp_path_factory.mktemp("dash-log") / "dashboard.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONPATH=str(ROOT))
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*CLI, "dashboard", "--root", str(scans_root), "--port", str(port), "--refresh", "2"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=2).text == "ok":
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-2000:]
            time.sleep(0.3)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(20)


def _raw_get(url: str, path: str) -> tuple[int, bytes]:
    """GET with the path sent exactly as written (no client-side normalisation of ``..``)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_dashboard_imports_and_serves_without_prefect(scans_root: Path) -> None:
    """The app module, its data collection and a page render never import Prefect."""
    code = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "from flows.dashboard.app import create_app\n"
        f"client = TestClient(create_app({str(scans_root)!r}, prefect_api='http://127.0.0.1:9/api'))\n"
        "page = client.get('/')\n"
        "assert page.status_code == 200 and 'scan_done' in page.text, page.status_code\n"
        "scans = client.get('/api/scans').json()['scans']\n"
        "print(sorted(s['state'] for s in scans))\n"
        "assert 'prefect' not in sys.modules, 'prefect was imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PYTHONPATH"] = str(ROOT)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split("\n")[-2] == "['done', 'done', 'done', 'done', 'failed', 'running', 'waiting']"


def test_scans_with_state_progress_and_qc(dashboard: str) -> None:
    scans = {s["name"]: s for s in httpx.get(dashboard + "/api/scans", timeout=10).json()["scans"]}
    assert {k: v["state"] for k, v in scans.items()} == {
        "scan_done": "done", "scan_running": "running", EVIL: "failed", "scan_incoming": "waiting",
        **{name: "done" for name, *_ in SERIES}}
    done, running = scans["scan_done"], scans["scan_running"]
    assert done["progress"]["done"] == done["progress"]["total"] == 8
    assert set(done["class_fractions"]) == {"pore", "matrix"} and done["qc_status"] == "complete"
    assert done["report"] == "/files/scan_done/qc/report.html" and done["flow_run_url"].startswith("http://")
    assert running["progress"]["done"] == 4 and running["progress"]["total"] == 8
    assert running["progress"]["voxels_per_second"] == 1.5e6 and running["progress"]["eta_seconds"] > 0
    assert running["dask_dashboard"] == "http://127.0.0.1:8787/status"
    page = httpx.get(dashboard + "/", timeout=10).text
    assert 'http-equiv="refresh"' in page and "4/8 blocks" in page and "Dask dashboard" in page
    assert httpx.get(dashboard + done["report"], timeout=10).headers["content-type"].startswith("text/html")


def test_analysed_scans_show_fractions_thumbnails_and_the_series_trend(dashboard: str, scans_root: Path) -> None:
    from PIL import Image

    body = httpx.get(dashboard + "/api/scans", timeout=10).json()
    scans = {s["name"]: s for s in body["scans"]}
    assert scans["scan_done"]["analysis"] is None  # not analysed
    truth = {}
    for name, *_ in SERIES:
        data = json.loads((scans_root / "series_a" / name / "seg.analysis" / "analysis.json").read_text())
        truth[name] = (data["phases"]["classes"]["fibre"]["fraction"], data["phases"]["classes"]["pore"]["fraction"])
        a = scans[name]["analysis"]
        assert (a["fibre"]["class"], a["pore"]["class"]) == ("fibre", "pore")
        assert (a["fibre"]["fraction"], a["pore"]["fraction"]) == pytest.approx(truth[name])
        thumb = httpx.get(dashboard + a["thumbnail"], timeout=10)
        assert thumb.headers["content-type"] == "image/png"
        import io

        pixels = np.asarray(Image.open(io.BytesIO(thumb.content)).convert("RGB"))
        assert pixels.shape == (16, 16, 3) and len(np.unique(pixels.reshape(-1, 3), axis=0)) == 3  # three classes
    (series,) = body["series"]
    assert series["name"] == "series_a" and series["fibre_class"] == "fibre" and series["pore_class"] == "pore"
    assert [p["scan"] for p in series["points"]] == ["t000", "t001", "t002"]  # time order, not name order
    assert [(p["fibre"], p["porosity"]) for p in series["points"]] == [pytest.approx(truth[n]) for n in
                                                                          ("t000", "t001", "t002")]
    assert truth["t000"][0] < truth["t001"][0] < truth["t002"][0]  # the trend the chart draws
    assert len(series["chart"]["fibre"].split()) == 3 and len(series["chart"]["porosity"].split()) == 3
    page = httpx.get(dashboard + "/", timeout=10).text
    assert f"fibre (fibre): {100 * truth['t002'][0]:.1f} %" in page
    assert f"porosity (pore): {100 * truth['t000'][1]:.1f} %" in page
    assert 'class="trend-fibre"' in page and 'data-series="series_a"' in page


def test_markup_in_names_is_escaped(dashboard: str) -> None:
    page = httpx.get(dashboard + "/", timeout=10).text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>alert" not in page and "<script" not in page.lower()
    assert "javascript:" not in page  # links are http(s) or the dashboard's own files only


@pytest.mark.parametrize("path", [
    "/files/../secret.txt", "/files/%2e%2e/secret.txt", "/files/scan_done/../../secret.txt",
    "/files/scan_done/%2E%2E/%2E%2E/secret.txt", "/files//etc/passwd", "/files/%2Fetc%2Fpasswd",
    "/files/link_out", "/files/scan_done", "/files/scan_done\\..\\..\\secret.txt",
])
def test_files_outside_the_root_are_refused(dashboard: str, path: str) -> None:
    status, body = _raw_get(dashboard, path)
    assert status in (400, 404), (path, status)
    assert b"outside the root" not in body and b"root:" not in body


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian chromium")
def test_dashboard_in_headless_chromium(dashboard: str, tmp_path: Path) -> None:
    from PIL import Image

    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", dashboard + "/"], check=True, timeout=120, capture_output=True,
                         text=True).stdout
    assert 'data-state="done"' in dom and 'data-state="running"' in dom
    assert "scan_done" in dom and "scan_running" in dom and "4/8 blocks" in dom and ">report<" in dom
    assert 'class="trend-fibre"' in dom and 'class="thumb"' in dom
    shot = tmp_path / "dashboard.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1400,900", dashboard + "/"], check=True,
                   timeout=120, capture_output=True)
    print(f"dashboard screenshot: {shot}")
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (900, 1400)
    assert pixels.std() > 10, "the screenshot is blank"
    colours: Any = np.unique(np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3), axis=0)
    assert len(colours) > 20  # text, state badges, progress bar


def test_bad_options_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli.main import main

    for argv, fragment in ((["--root", str(tmp_path / "missing")], "dashboard root folder does not exist"),
                           (["--root", str(tmp_path), "--port", "70000"], "is not a TCP port"),
                           (["--root", str(tmp_path), "--refresh", "0"], "--refresh must be at least 1")):
        assert main(["dashboard", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("studios: error: ") and fragment in err and "\n" not in err, err
