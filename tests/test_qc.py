"""Quality control: qc.json numbers against independent numpy, the merge of components across
blocks, the seam check, incomplete outputs, bad inputs, and the report in headless Chromium.

One phantom (fibres and pores with dense truth) is segmented once with a threshold-like model
that is exact (a valid operator with known weights), in 16^3 blocks, so fibres and pores cross
many block faces.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from conftest import ROOT, make_scan
from scipy import ndimage

from pipeline.cli.main import main
from pipeline.compute.executors import SerialExecutor
from pipeline.core.errors import BlockFailedError, InputError
from pipeline.core.normalize import Normalization
from pipeline.io.bundle import ModelBundle, from_model, save_bundle
from pipeline.io.store import open_image
from pipeline.models.dilated import DilatedResNet
from pipeline.qc.report import SECTIONS, render_report
from pipeline.qc.run import SCHEMA, run_qc
from pipeline.segment.run import segment
from pipeline.testing.faults import FaultyExecutor
from pipeline.testing.phantom import make_phantom

SHAPE = (40, 48, 56)
BLOCK = 16
QC_BLOCK = (8, 16, 24)  # does not divide 56: the last x block is shrunk
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def threshold_bundle(scan: Path, classes: tuple[str, ...] = ("matrix", "fibre", "pore")) -> ModelBundle:
    """A DilatedResNet (halo 2) whose weights make it a soft 3-way threshold of the intensity.

    Logits (normalised intensity x): matrix s(x - t1), fibre 2s x - s(t1 + t2), pore 0, i.e.
    pore below t1, matrix between, fibre above t2, with t1/t2 = raw 0.77/1.25 (phantom matrix 1.0,
    fibre 1.6, pore 0.05 attenuation).
    """
    model = DilatedResNet(classes=3, channels=1, dilations=[1], head=0)
    offset, scale = Normalization().affine(open_image(scan).stats)
    t1, t2 = ((t - offset) * scale for t in (0.77, 1.25))
    s = 40.0
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.stem.weight[0, 0, 1, 1, 1] = 1.0
        model.head[0].weight[:, 0, 0, 0, 0] = torch.tensor([s, 2 * s, 0.0])
        model.head[0].bias[:] = torch.tensor([-s * t1, -s * (t1 + t2), 0.0])
    return from_model(model, classes=classes)


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("qc")
    ph = make_phantom(SHAPE, seed=1)
    scan = make_scan(tmp, ph.volume, chunks=(BLOCK,) * 3)
    truth = tmp / "truth.npy"
    np.save(truth, ph.labels)
    bundle = threshold_bundle(scan)
    seg = tmp / "seg.zarr"
    segment(scan, bundle, seg, block=BLOCK, executor=SerialExecutor(retries=0), exact=True, probabilities=True,
            qc=False)
    return {"tmp": tmp, "scan": scan, "truth": truth, "seg": seg, "bundle": bundle, "labels": ph.labels}


@pytest.fixture(scope="module")
def full_qc(phantom_run: dict[str, Any]) -> Any:
    return run_qc(phantom_run["seg"], truth=phantom_run["truth"], block=QC_BLOCK,
                  out_dir=phantom_run["tmp"] / "qc-full")


def _written(seg: Path) -> np.ndarray:
    return np.asarray(zarr.open_group(str(seg), mode="r")["0"][...])


def test_truth_metrics_match_numpy(phantom_run: dict[str, Any], full_qc: Any) -> None:
    from sklearn.metrics import cohen_kappa_score

    pred = _written(phantom_run["seg"]).astype(np.int64)
    truth = phantom_run["labels"].astype(np.int64)
    data = json.loads(full_qc.json_path.read_text())
    assert data["schema"] == SCHEMA and data["status"] == "complete"
    got = {c["label"]: c for c in data["truth"]["per_class"]}
    keep = truth > 0
    for c in (1, 2, 3):
        p, t = (pred == c) & keep, (truth == c) & keep
        tp = np.count_nonzero(p & t)
        assert got[c]["iou"] == pytest.approx(tp / np.count_nonzero(p | t), rel=1e-5)
        assert got[c]["dice"] == pytest.approx(2 * tp / (p.sum() + t.sum()), rel=1e-5)
        assert got[c]["precision"] == pytest.approx(tp / p.sum(), rel=1e-5)
        assert got[c]["recall"] == pytest.approx(tp / t.sum(), rel=1e-5)
    assert data["truth"]["kappa"] == pytest.approx(cohen_kappa_score(truth[keep], pred[keep]), rel=1e-5)
    matrix = np.array(data["truth"]["confusion"]["matrix"])
    assert matrix.sum() == keep.sum()
    assert matrix[0, 1] == np.count_nonzero((truth == 1) & (pred == 2))
    assert 0.5 < data["truth"]["mean_iou"] < 1.0  # a real segmentation, not a degenerate one
    counts = np.bincount(pred.ravel(), minlength=4)
    for c in data["classes"]:
        assert c["voxels"] == counts[c["label"]]
        assert c["fraction"] == pytest.approx(counts[c["label"]] / counts[1:].sum(), rel=1e-5)
        mask = pred == c["label"]
        raw = np.asarray(zarr.open_group(str(phantom_run["scan"]), mode="r")["0"][...], dtype=np.float64)
        assert c["intensity_mean"] == pytest.approx(raw[mask].mean(), rel=1e-4)
    fibre_y = data["profiles"]["y"]["fractions"]["fibre"]
    expect = (pred == 2).sum(axis=(0, 2)) / (pred > 0).sum(axis=(0, 2))
    np.testing.assert_allclose(fibre_y, expect, rtol=1e-5)


@pytest.mark.parametrize("qc_block", [QC_BLOCK, (7, 11, 13)])
def test_components_match_whole_volume(phantom_run: dict[str, Any], full_qc: Any, qc_block: tuple[int, ...]) -> None:
    pred = _written(phantom_run["seg"])
    if qc_block == QC_BLOCK:
        data = full_qc.data
    else:
        data = run_qc(phantom_run["seg"], block=qc_block, seam_samples=0, report=False,
                      out_dir=phantom_run["tmp"] / "qc-odd").data
    comps = data["components"]["classes"]
    assert set(comps) == {"fibre", "pore"}  # every class but the majority (matrix)
    crossing = 0
    for name, label in (("fibre", 2), ("pore", 3)):
        lab, n = ndimage.label(pred == label)
        volumes = np.bincount(lab.ravel())[1:]
        faces = np.concatenate([np.take(lab, i, axis=a).ravel() for a in range(3) for i in (0, -1)])
        assert comps[name]["count"] == n
        assert comps[name]["voxels"] == volumes.sum()
        assert comps[name]["largest"] == volumes.max()
        assert comps[name]["top"] == sorted(volumes.tolist(), reverse=True)[:5]
        assert comps[name]["single_voxel"] == np.count_nonzero(volumes == 1)
        assert comps[name]["touching_border"] == len(set(faces.tolist()) - {0})
        for sl in ndimage.find_objects(lab):
            first = [s.start // b for s, b in zip(sl, qc_block, strict=True)]
            last = [(s.stop - 1) // b for s, b in zip(sl, qc_block, strict=True)]
            crossing += first != last
    assert crossing >= 10, "the test needs components that cross block faces"


def test_seam_check_is_zero_for_an_exact_run(full_qc: Any) -> None:
    seam = full_qc.data["seam_check"]
    assert seam["status"] == "ok", seam
    assert seam["exact"] is True and seam["probability_reference"] == "stored"
    assert len(seam["samples"]) == 2 and seam["compared_voxels"] == 2 * BLOCK**3
    assert seam["label_differences"] == 0 and seam["max_abs_probability_difference"] == 0
    for sample in seam["samples"]:  # each box straddles block faces of the run
        assert all(o % BLOCK == BLOCK // 2 for o in sample["offset"])


def test_incomplete_output_is_reported_incomplete(phantom_run: dict[str, Any]) -> None:
    tmp = phantom_run["tmp"]
    bundle = threshold_bundle(phantom_run["scan"], classes=("matrix", "fibre", "<i>pore</i>"))
    seg = tmp / "partial.zarr"
    with pytest.raises(BlockFailedError, match="1 of 36 blocks failed"):
        segment(phantom_run["scan"], bundle, seg, block=BLOCK, exact=True, qc=True,
                executor=FaultyExecutor(SerialExecutor(retries=0), tmp / "faults", fail=("1-1-1",)))
    assert not (seg / "qc").exists()  # no automatic QC of an unfinished run
    result = run_qc(seg, component_classes=["fibre"])
    data = result.data
    assert result.status == "incomplete" and not result.complete
    assert data["blocks"]["missing"] == 1 and data["blocks"]["missing_ids"] == ["1-1-1"]
    assert "1-1-1" in data["blocks"]["failed"]
    assert data["warnings"][0].startswith("output is incomplete: 1 of 36 blocks missing (1-1-1)")
    assert data["volume"]["not_computed_fraction"] == pytest.approx(BLOCK**3 / np.prod(SHAPE), rel=1e-5)
    # no stored probabilities: confidence from the ledger, seam check against a recomputation
    assert data["confidence"]["source"] == "ledger" and data["confidence"]["lowest_blocks"]
    seam = data["seam_check"]
    assert seam["probability_reference"] == "recomputed_on_run_grid"
    assert seam["status"] == "ok" and seam["label_differences"] == 0 and seam["max_abs_probability_difference"] == 0
    page = result.report_path.read_text()
    assert "INCOMPLETE" in page and "complete</span>" not in page.replace("INCOMPLETE", "")
    assert "&lt;i&gt;pore&lt;/i&gt;" in page and "<i>pore</i>" not in page  # names are escaped


def test_segment_cli_runs_qc_then_qc_cli(phantom_run: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    tmp = phantom_run["tmp"]
    model = save_bundle(phantom_run["bundle"], tmp / "model")
    out = tmp / "cli-seg.zarr"
    rc = main(["segment", str(phantom_run["scan"]), str(model), str(out), "--block", "16", "--cluster", "serial",
               "--exact"])
    printed = capsys.readouterr().out
    assert rc == 0 and f"QC report: {out / 'qc' / 'report.html'}" in printed
    run = zarr.open_group(str(out), mode="r").attrs["studios"]["run"]
    assert run["qc"]["status"] == "complete" and Path(run["qc"]["json"]).exists()
    rc = main(["qc", str(out), "--truth", str(phantom_run["truth"]), "--out", str(tmp / "cli-qc"), "--no-report",
               "--classes", "pore", "--seam-samples", "1"])
    printed = capsys.readouterr().out
    assert rc == 0 and "mean IoU" in printed
    data = json.loads((tmp / "cli-qc" / "qc.json").read_text())
    assert list(data["components"]["classes"]) == ["pore"] and not (tmp / "cli-qc" / "report.html").exists()


def test_bad_inputs_are_one_line_errors(phantom_run: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    tmp = phantom_run["tmp"]
    seg = phantom_run["seg"]
    wrong = tmp / "wrong.npy"
    np.save(wrong, np.ones((4, 5, 6), dtype=np.uint8))
    bad_label = tmp / "bad-label.npy"
    np.save(bad_label, np.full(SHAPE, 7, dtype=np.uint8))
    cases = [
        ((tmp / "missing.zarr",), {}, "does not exist"),
        ((phantom_run["scan"],), {}, "expected 'segmentation'"),
        ((seg,), {"truth": wrong}, "differs from the segmentation"),
        ((seg,), {"truth": bad_label}, "truth has label 7"),
        ((seg,), {"component_classes": ["glass"]}, "not one of"),
    ]
    for args, kwargs, match in cases:
        with pytest.raises(InputError, match=match):
            run_qc(*args, seam_samples=0, report=False, out_dir=tmp / "bad", **kwargs)
    for argv in (["qc", str(tmp / "missing.zarr")], ["qc", str(seg), "--truth", str(wrong)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("studios: error: ") and "\n" not in err and "Traceback" not in err


def test_qc_json_keys_are_documented(full_qc: Any) -> None:
    doc = (ROOT / "docs" / "qc.md").read_text()
    import pipeline.qc.run as qc

    for key in full_qc.data:
        assert f"`{key}`" in doc, f"qc.json key {key!r} is not documented in docs/qc.md"
        assert key in (qc.__doc__ or ""), f"qc.json key {key!r} is not in the pipeline.qc.run docstring"


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian chromium")
def test_report_renders_in_headless_chromium(full_qc: Any, tmp_path: Path) -> None:
    from PIL import Image

    page = full_qc.report_path.read_text()
    expected = [s for s in SECTIONS if s not in ("suggestions", "analysis")]  # neither in this qc.json
    assert re.findall(r'<section id="(\w+)">', page) == expected  # every section, in order
    assert len(re.findall(r"<img [^>]*src=\"data:image/png;base64,", page)) >= 8
    assert not re.search(r"(src|href)=\"(https?:)?//", page), "the report must not load external resources"
    shot = tmp_path / "report.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", f"--user-data-dir={tmp_path / 'profile'}",
           f"--screenshot={shot}", "--window-size=1400,3000", full_qc.report_path.as_uri()]
    subprocess.run(cmd, check=True, timeout=120, capture_output=True)
    print(f"report screenshot: {shot}")
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (3000, 1400)
    assert pixels.std() > 20, "the screenshot is blank"
    assert (pixels < 128).mean() > 0.05  # text and images, not an empty page


def test_report_where_to_annotate_next(phantom_run: dict[str, Any], full_qc: Any) -> None:
    """The suggestions of qc.json become a table between confidence and components, escaped."""
    data = json.loads(full_qc.json_path.read_text())
    data["suggestions"] = [
        {"axis": "z", "index": 41, "score": 0.73, "reason": "low confidence near <b>the rim</b>"},
        {"axis": "x", "index": 7, "score": 0.5125, "reason": "class fractions drift"},
    ]
    group = zarr.open_group(str(phantom_run["seg"]), mode="r")
    page = render_report(data, labels=group, scan=open_image(phantom_run["scan"]),
                         probabilities=group["probabilities"]["0"])
    assert re.findall(r'<section id="(\w+)">', page) == [s for s in SECTIONS if s != "analysis"]
    section = page[page.index('<section id="suggestions">'):]
    section = section[: section.index("</section>")]
    assert "<h2>Where to annotate next</h2>" in section
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", section)
    assert cells == ["1", "z", "41", "0.73", "low confidence near &lt;b&gt;the rim&lt;/b&gt;",
                     "2", "x", "7", "0.512", "class fractions drift"]
    assert "<b>the rim" not in page
    data["suggestions"] = []
    empty = render_report(data, labels=group)
    assert "No suggestions." in empty and '<section id="suggestions">' in empty
    assert '<p class="muted">The scan is not available: labels only.</p>' in empty


def test_warnings_in_plain_words() -> None:
    from pipeline.qc.warnings import confidence_drop as _confidence_drop
    from pipeline.qc.warnings import drift as _drift
    from pipeline.qc.warnings import pct as _pct

    assert _confidence_drop([0.95] * 30 + [0.7] * 10, "z") == (
        "confidence drops at z >= 30 (mean max probability 0.70 vs 0.95 elsewhere); annotate there next")
    assert _confidence_drop([0.6] * 5 + [0.95] * 35, "y").startswith("confidence drops at y < 5 ")
    assert _confidence_drop([0.95] * 40, "x") is None
    assert _pct(0.0001) == "0.01 %"
    assert "varies from 10.0 % to 60.0 % along z" in _drift([0.1] * 20 + [0.6] * 20, "pore", "z", 0.25)
    assert _drift([0.3] * 40, "pore", "z", 0.25) is None
