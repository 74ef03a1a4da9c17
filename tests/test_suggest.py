"""``studios suggest``: uncertainty of a known model picks the ambiguous slices, spread and boxed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_scan

from pipeline.cli.main import main
from pipeline.core.errors import ConfigError, InputError
from pipeline.core.normalize import Normalization
from pipeline.core.progress import RecordingReporter
from pipeline.io.bundle import ModelBundle, from_model, init_bundle, save_bundle
from pipeline.io.store import open_image
from pipeline.models.filterbank import FilterBankMLP
from pipeline.segment.predict import numerics, predict_volume
from pipeline.train.annotations import from_array
from pipeline.train.suggest import Suggestion, candidate_indices, slice_probabilities, suggest, suggestions_for_qc

SHAPE = (24, 40, 40)
REGION_A = (slice(4, 7), slice(20, 36), slice(4, 20))  # ambiguous 3 x 16 x 16 box
BAND_B = slice(16, 18)  # ambiguous whole z-slices


def _volume() -> np.ndarray:
    """Clearly bright (+100) or dark (-100) voxels, except intensity 0 (undecidable) in A and B."""
    rng = np.random.default_rng(0)
    vol = np.where(rng.random(SHAPE) < 0.5, 100.0, -100.0).astype(np.float32)
    vol[REGION_A] = 0.0
    vol[BAND_B] = 0.0
    return vol


def _model() -> ModelBundle:
    """A linear head on the raw intensity: p(bright) = sigmoid(10 x); x = 0 is a coin toss."""
    net = FilterBankMLP(classes=2, sigmas=[0.7], layers=0)
    with torch.no_grad():
        net.mlp[0].weight.zero_()
        net.mlp[0].weight[0, 0] = -5.0
        net.mlp[0].weight[1, 0] = 5.0
        net.mlp[0].bias.zero_()
    return from_model(net, classes=("dark", "bright"), normalization=Normalization(method="zscore"))


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_scan(tmp_path_factory.mktemp("suggest"), _volume())


def test_slab_probabilities_equal_the_whole_volume_prediction(scan):
    image = open_image(scan)
    bundle = init_bundle(classes=("a", "b", "c"), params={"channels": 4, "dilations": [2, 1], "head": 4}, seed=3)
    net = bundle.build()
    offset, scale = bundle.normalization.affine(image.stats)
    vol = np.asarray(image.array[...])
    whole = predict_volume(net, vol, offset=offset, scale=scale, exact=True)
    with numerics(exact=True):
        for axis, index in ((0, 0), (1, 17), (2, 39)):
            got = slice_probabilities(image, net, axis, index, offset=offset, scale=scale)
            np.testing.assert_allclose(got, np.take(whole, index, axis=1 + axis), atol=1e-6)


def test_ranks_ambiguous_slices_spreads_and_boxes(scan):
    rec = RecordingReporter()
    found = suggest(scan, _model(), n=3, candidates=12, reporter=rec)  # z = 1, 3, ..., 23
    assert [type(s) for s in found] == [Suggestion] * 3
    assert found[0].axis == "z" and found[0].index in (16, 17) and found[0].score > 0.9
    assert found[1].axis == "z" and found[1].index in (4, 5, 6)
    assert found[1].box is not None and found[1].box.offset == (found[1].index, 20, 4)
    assert found[1].box.shape == (1, 16, 16)
    assert [s.score for s in found] == sorted((s.score for s in found), reverse=True)
    assert rec.events[0] == ("start", ("suggest", 36)) and rec.advanced == 36


def test_annotated_slices_are_avoided(scan):
    labels = np.zeros(SHAPE, np.uint8)
    labels[16] = np.where(_volume()[16] > 0, 2, 1)
    labels[16, 0, 0], labels[16, 0, 1] = 1, 2
    free = suggest(scan, _model(), n=2, axes=("z",), candidates=SHAPE[0])
    # the neighbour of the first pick is suppressed: the second is in the other ambiguous region
    assert free[0].index in (16, 17) and free[1].index in (4, 5, 6)
    found = suggest(scan, _model(), from_array(labels), n=2, axes=("z",), candidates=SHAPE[0])
    assert found[0].index in (4, 5, 6) and found[0].box is not None and found[0].box.offset[1:] == (20, 4)
    assert "nearest annotated z-slice" in found[0].reason
    assert all(s.index != 16 for s in found) and found[1].score < 0.2


def test_json_form_and_qc_helper(scan):
    items = suggestions_for_qc(scan, _model(), n=2, candidates=6)
    assert len(items) == 2
    for item in items:
        assert set(item) == {"axis", "index", "score", "box", "reason"}
        assert set(item["box"]) == {"offset", "shape"}
        assert item["box"]["shape"][("z", "y", "x").index(item["axis"])] == 1
        json.dumps(item)


def test_candidates_and_bad_options(scan):
    assert candidate_indices(40, 4) == [5, 15, 25, 35]
    assert candidate_indices(5, 16) == [0, 1, 2, 3, 4]
    with pytest.raises(ConfigError):
        suggest(scan, _model(), axes=("w",))
    with pytest.raises(ConfigError):
        suggest(scan, _model(), n=0)
    small = np.zeros((4, 4, 4), np.uint8)
    small[0, 0, :2] = (1, 2)
    with pytest.raises(InputError) as exc:
        suggest(scan, _model(), from_array(small))
    assert "shape" in str(exc.value)


def test_cli_prints_table_writes_json_and_refuses_bad_input(scan, tmp_path, capsys):
    model = save_bundle(_model(), tmp_path / "model")
    out = tmp_path / "s.json"
    assert main(["suggest", str(scan), str(model), "-n", "2", "--candidates", "8", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rank" in printed and "reason" in printed and f"wrote {out}" in printed
    data = json.loads(out.read_text())
    assert len(data) == 2 and data[0]["axis"] == "z" and data[0]["index"] in (16, 17)
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.ones((4, 4, 4), np.uint8))
    assert main(["suggest", str(scan), str(model), str(wrong)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("studios: error: ") and "wrong.npy" in err and "\n" not in err
    assert main(["suggest", str(scan), str(tmp_path / "nomodel")]) == 2
    assert "nomodel" in capsys.readouterr().err


def test_active_learning_bench_quick(tmp_path, capsys):
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("active_learning", ROOT / "bench" / "active_learning.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--quick", "--json", str(tmp_path / "al.json")]) == 0
    out = capsys.readouterr().out
    assert "suggested" in out and "uniform" in out and "random" in out
    data = json.loads((tmp_path / "al.json").read_text())["results"][0]
    for name in ("suggested", "uniform", "random"):
        assert len(data[name]["iou"]) == 3 and all(0.0 <= v <= 1.0 for v in data[name]["iou"])
        assert len(data[name]["picks"]) == 2 and len(set(data[name]["picks"])) == 2
    assert data["uniform"]["picks"][0].startswith("z")
    assert bench.uniform_next([(0, 6)], 12) == (0, 2)  # towards 2, 6, 10: uniform for three slices
    plane = np.repeat([[1, 1, 1, 2, 2, 2]], 6, axis=0).repeat(2, axis=1)
    drawn = bench.scribble(plane, np.random.default_rng(0), strokes=2, length=5)
    assert drawn.any() and np.all((drawn == 0) | (drawn == plane))


def test_qc_ranks_the_same_slices_with_the_outputs_model(scan, tmp_path, capsys):
    """``studios qc --suggest N``: qc.json and the report carry what ``suggest`` gives with the saved model."""
    from pipeline.compute.executors import SerialExecutor
    from pipeline.segment.run import segment

    model = save_bundle(_model(), tmp_path / "model")
    seg = tmp_path / "seg.zarr"
    segment(scan, model, seg, block=(24, 20, 20), executor=SerialExecutor(), qc=False)
    assert main(["qc", str(seg), "--seam-samples", "0", "--suggest", "2"]) == 0
    data = json.loads((seg / "qc" / "qc.json").read_text())
    expected = [s.to_json() for s in suggest(scan, model, n=2)]
    assert data["suggestions"] == json.loads(json.dumps(expected)) and len(expected) == 2
    assert {(s["axis"], s["index"]) for s in data["suggestions"]} & {("z", 16), ("z", 17)}  # the ambiguous band
    page = (seg / "qc" / "report.html").read_text()
    section = page[page.index('<section id="suggestions">'):]
    assert f">{data['suggestions'][0]['reason']}</td>" in section[: section.index("</section>")]
    capsys.readouterr()
    assert main(["qc", str(seg), "--suggest", "-1"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--suggest must be >= 0" in err


def test_qc_without_the_saved_model_notes_why_there_are_no_suggestions(scan, tmp_path):
    import shutil

    from pipeline.compute.executors import SerialExecutor
    from pipeline.qc.run import run_qc
    from pipeline.segment.run import segment

    seg = tmp_path / "seg.zarr"
    segment(scan, save_bundle(_model(), tmp_path / "model"), seg, block=(24, 20, 20), executor=SerialExecutor(),
            qc=False)
    shutil.rmtree(seg / "model")
    result = run_qc(seg, seam_samples=0, suggest=3)
    assert "suggestions" not in result.data
    assert any("no saved model: no suggestions" in w for w in result.data["warnings"])
