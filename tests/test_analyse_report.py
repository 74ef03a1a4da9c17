"""Where people look at an analysis: the report's Analysis section (rendered in headless Chromium),
``studios qc`` / ``studios analyse`` keeping it current, the flow stage's reuse, and its bad inputs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from pipeline.cli import main

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHAPE = (40, 40, 40)


def _labels() -> np.ndarray[Any, Any]:
    """Matrix (1) with straight fibres along x (2) and spherical pores (3), crossing 20^3 blocks."""
    lab = np.ones(SHAPE, np.uint8)
    z, y, x = np.indices(SHAPE)
    for cz, cy in ((8, 9), (20, 21), (31, 12), (12, 30), (30, 31)):
        lab[(z - cz) ** 2 + (y - cy) ** 2 <= 6] = 2
    for cz, cy, cx, r in ((20, 10, 20, 4), (9, 20, 8, 3), (30, 22, 30, 5), (21, 32, 19, 3)):
        lab[((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= r * r) & (lab == 1)] = 3
    return lab


def _segmentation(folder: Path) -> Path:
    """A finished studios segmentation (ledger, attributes, scan beside) holding :func:`_labels`."""
    from pipeline.compute.executors import SerialExecutor
    from pipeline.ingest.run import ingest_array
    from pipeline.io.bundle import init_bundle, save_bundle
    from pipeline.segment.run import segment

    folder.mkdir(parents=True, exist_ok=True)
    lab = _labels()
    model = folder / "model"
    if not model.exists():
        ingest_array((lab * 60).astype(np.uint8), folder / "scan.zarr", chunks=(20, 20, 20))
        save_bundle(init_bundle(classes=("matrix", "fibre", "pore"), params={"channels": 4, "dilations": [1],
                                                                            "head": 4}), model)
    seg = folder / "seg.zarr"
    segment(folder / "scan.zarr", model, seg, block=20, executor=SerialExecutor(), qc=False, overwrite=True)
    zarr.open_group(str(seg), mode="r+")["0"][...] = lab  # the labels this test knows
    return seg


@pytest.fixture(scope="module")
def analysed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    seg = _segmentation(tmp_path_factory.mktemp("report") / "run")
    assert main(["qc", str(seg), "--seam-samples", "0"]) == 0  # QC first: its report has no analysis yet
    assert 'id="analysis"' not in (seg / "qc" / "report.html").read_text()
    assert main(["analyse", str(seg), "--block", "20", "--rho", "1.5", "--max-radius", "4"]) == 0
    return {"seg": seg, "report": seg / "qc" / "report.html", "analysis": seg.with_name("seg.analysis")}


def test_analyse_adds_its_section_to_the_qc_report(analysed: dict[str, Path]) -> None:
    from pipeline.qc.report import SECTIONS

    page = analysed["report"].read_text()
    assert re.findall(r'<section id="(\w+)">', page) == [s for s in SECTIONS if s != "suggestions"]
    section = page[page.index('<section id="analysis">'):]
    section = section[: section.index("</section>")]
    for alt in ("volume fraction profiles along z, y and x", "fibre orientation distribution",
                "pore size distribution and local thickness histogram"):
        assert re.search(rf'<img alt="{alt}[^"]*" src="data:image/png;base64,', section), alt
    data = json.loads((analysed["analysis"] / "analysis.json").read_text())
    fibre = data["phases"]["classes"]["fibre"]["fraction"]
    assert f"{100 * fibre:.3g} %" in section
    assert abs(abs(data["orientation"]["main_direction"][2]) - 1) < 0.01  # the fibres run along x
    qc = json.loads((analysed["seg"] / "qc" / "qc.json").read_text())
    assert qc["analysis"]["fibre"] == {"class": "fibre", "fraction": pytest.approx(fibre, rel=1e-5)}
    assert qc["analysis"]["pore"]["class"] == "pore" and qc["analysis"]["objects"] == data["objects"]["count"]


def test_qc_again_finds_the_analysis_and_refuses_a_stale_one(analysed: dict[str, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    seg = analysed["seg"]
    out = tmp_path / "qc"
    assert main(["qc", str(seg), "--seam-samples", "0", "--out", str(out)]) == 0  # found beside SEG.zarr
    assert '<section id="analysis">' in (out / "report.html").read_text()
    copy = tmp_path / "other" / "seg.zarr"  # another segmentation: the analysis is not its own
    shutil.copytree(seg, copy)
    before = (copy / "qc" / "qc.json").read_bytes()
    capsys.readouterr()
    code = main(["qc", str(copy), "--seam-samples", "0", "--analysis", str(analysed["analysis"])])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1
    assert "analysis.json: analyses" in err and "rerun 'studios analyse --overwrite'" in err
    assert (copy / "qc" / "qc.json").read_bytes() == before  # nothing written
    assert main(["qc", str(copy), "--seam-samples", "0"]) == 0  # nothing beside it: no section
    assert '<section id="analysis">' not in (copy / "qc" / "report.html").read_text()


@pytest.mark.parametrize(("args", "expected"), [
    (["--report", "{tmp}/nowhere"], "nowhere: holds no qc.json; run 'studios qc"),
    (["--report", "{tmp}", "--no-report"], "give --report QC_DIR or --no-report, not both"),
])
def test_analyse_report_errors_are_one_line(analysed: dict[str, Path], tmp_path: Path, args: list[str],
                                            expected: str) -> None:
    out = tmp_path / "a"
    cmd = [sys.executable, "-m", "pipeline.cli", "analyse", str(analysed["seg"]), "--out", str(out),
           *[a.format(tmp=tmp_path) for a in args]]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and expected in r.stderr, r.stderr
    assert not out.exists()


def test_flow_stage_reuses_an_analysis_of_the_same_output(analysed: dict[str, Path], tmp_path: Path) -> None:
    from pipeline.core.errors import OutputExistsError
    from pipeline.core.settings import AnalyseOptions
    from pipeline.service.process import analyse_segmentation
    from pipeline.service.runstate import RunStatus

    run = tmp_path / "run"
    seg = _segmentation(run)
    opts = AnalyseOptions(meshes=False, max_radius=2, rho=1.5)
    status = RunStatus(run, name="run")
    first = analyse_segmentation(seg, opts, run / "seg.analysis", status=status)
    assert not first["reused"] and first["data"]["surfaces"] is None
    again = analyse_segmentation(seg, opts, run / "seg.analysis")
    assert again["reused"] and again["data"] == first["data"]
    assert json.loads((run / "studios-run.json").read_text())["analysis"]["pore"]["class"] == "pore"
    _segmentation(run)  # the segmentation is written again: the analysis is stale
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        analyse_segmentation(seg, opts, run / "seg.analysis")
    assert analyse_segmentation(seg, opts, run / "seg.analysis", overwrite=True)["reused"] is False


def test_bad_analyse_profile_keys_are_named() -> None:
    from pipeline.core.errors import ConfigError
    from pipeline.core.settings import parse_run_config

    base = {"source": "bundled:cement_128x128x128.tif", "output": "out", "model": {"init": {}}}
    for bad, key in (({"sigma": 0}, "analyse.sigma"), ({"fibres": "x"}, "fibres"), ({"max_radius": "8"}, "max_radius")):
        with pytest.raises(ConfigError, match=key):
            parse_run_config({**base, "analyse": bad}, "p.yaml", check_files=False)
    cfg = parse_run_config({**base, "analyse": {"pore": "void", "classes": ["void", 2]}}, "p.yaml", check_files=False)
    assert cfg.analyse is not None and cfg.analyse.classes == ("void", 2)


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian chromium")
def test_analysis_section_renders_in_headless_chromium(analysed: dict[str, Path], tmp_path: Path) -> None:
    """The section as Chromium draws it: the report's own styles, its three figures, their colours."""
    from PIL import Image

    page = analysed["report"].read_text()
    head = page[: page.index("<body>") + len("<body>")]
    section = page[page.index('<section id="analysis">'):]
    section = section[: section.index("</section>") + len("</section>")]
    only = tmp_path / "analysis.html"  # the section alone, so it fills the screenshot
    only.write_text(head + section + "</body></html>")
    shot = tmp_path / "analysis.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", f"--user-data-dir={tmp_path / 'profile'}",
           f"--screenshot={shot}", "--window-size=1300,2200", only.as_uri()]
    subprocess.run(cmd, check=True, timeout=120, capture_output=True)
    print(f"analysis screenshot: {shot}")
    rgb = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert rgb.shape == (2200, 1300, 3) and rgb.std() > 20, "the screenshot is blank"

    def share(colour: tuple[int, int, int]) -> float:
        return float((np.abs(rgb - np.array(colour)).sum(axis=2) < 30).mean())

    assert share((0, 114, 178)) > 1e-3  # orientation bars and pore volumes (Okabe-Ito blue)
    assert share((230, 159, 0)) > 1e-4  # pore numbers (orange)
    assert share((0, 158, 115)) > 1e-4  # local thickness (green)
