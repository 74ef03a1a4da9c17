"""Training from sparse annotations: loading, validation, the training loop, bundle, CLI.

Small volumes, tiny models and a few steps: the accuracy acceptance figure (phantom 128^3,
3 slices, 5 minutes) is measured by hand / in bench/, not here.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
import yaml
from conftest import ROOT, make_scan
from PIL import Image
from scipy import ndimage

from pipeline.compute.executors import SerialExecutor
from pipeline.core.errors import ConfigError, InputError, OutputExistsError
from pipeline.core.progress import RecordingReporter
from pipeline.io.bundle import load_bundle
from pipeline.io.store import open_image
from pipeline.models import ARCHITECTURES
from pipeline.segment.predict import predict_volume, to_labels
from pipeline.segment.run import segment
from pipeline.train.annotations import Annotations, from_array, load_annotations, parse_slice_spec
from pipeline.train.loop import train

SHAPE = (20, 34, 38)
TINY = {"channels": 4, "dilations": [1, 2], "head": 0}
FAST: dict[str, Any] = {"params": TINY, "batch_size": 2, "patch": 16, "steps_per_epoch": 6, "threads": 1}
#: Small configurations of every registered architecture (others run with their defaults).
SMALL: dict[str, dict[str, Any]] = {
    "dilated_resnet": TINY,
    "rotinv_dilated": {"channels": 4, "dilations": [1, 2], "head": 4},
    "filterbank_mlp": {"sigmas": [0.7, 1.6], "hidden": 8, "layers": 1},
}
STUDIOS = ROOT / ".venv" / "bin" / "studios"


def two_phase(shape: tuple[int, int, int] = SHAPE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A trivially separable scan: blobs (label 2, bright) in a matrix (label 1, dark), mild noise."""
    rng = np.random.default_rng(seed)
    labels = np.where(ndimage.gaussian_filter(rng.normal(size=shape), 2.5) > 0, 2, 1).astype(np.uint8)
    volume = (np.where(labels == 2, 180.0, 70.0) + rng.normal(0, 12, shape)).astype(np.float32)
    return volume, labels


def sparse(labels: np.ndarray, indices: tuple[int, ...] = (5, 14), axis: int = 0) -> np.ndarray:
    out = np.zeros_like(labels)
    for i in indices:
        idx = [slice(None)] * 3
        idx[axis] = i  # type: ignore[call-overload]
        out[tuple(idx)] = labels[tuple(idx)]
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("train")
    volume, labels = two_phase()
    ann = sparse(labels)
    ann[:, 20, :] = labels[:, 20, :]  # two z-slices and a y-slice: patches of two orientations
    return {"tmp": tmp, "volume": volume, "labels": labels, "scan": make_scan(tmp, volume),
            "ann": from_array(ann, source="two-phase")}


# --------------------------------------------------------------------------- annotation forms


def _planes(ann: Annotations) -> list[tuple[int, int]]:
    return [(p.axis, p.index) for p in ann.planes]


def test_label_volume_npy_tif_zarr(tmp_path, data):
    import zarr

    vol = sparse(data["labels"], (3, 30), axis=2)  # two x-slices
    np.save(tmp_path / "a.npy", vol)
    tifffile.imwrite(tmp_path / "a.tif", vol)
    z = zarr.create_array(str(tmp_path / "a.zarr"), shape=vol.shape, chunks=(8, 16, 16), dtype="uint8")
    z[...] = vol
    expected = int((vol > 0).sum())
    for name in ("a.npy", "a.tif", "a.zarr"):
        ann = load_annotations(tmp_path / name, SHAPE)
        assert _planes(ann) == [(2, 3), (2, 30)]
        assert ann.total == expected and ann.n_classes == 2 and ann.missing == ()
        assert np.array_equal(ann.planes[0].labels, vol[:, :, 3])
    # a studios image (group with level 0) works too, e.g. an earlier segmentation or ingested labels
    ann = load_annotations(make_scan(tmp_path, vol, name="labels.zarr"), SHAPE)
    assert ann.total == expected


def test_scribbles_and_mixed_axes_group_into_few_planes(data):
    vol = sparse(data["labels"], (4,), axis=0)
    vol[:, 20, :] = data["labels"][:, 20, :]  # plus a y-slice crossing it
    ann = from_array(vol)
    assert _planes(ann) == [(0, 4), (1, 20)]
    assert sum(p.count for p in ann.planes) == ann.total == int((vol > 0).sum())


def test_slice_images_png_palette_grey_tiff_and_yaml(tmp_path, data):
    labels = data["labels"]
    pal = Image.fromarray(labels[5], mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    pal.save(tmp_path / "z5.png")
    Image.fromarray(labels[14], mode="L").save(tmp_path / "z14.png")
    tifffile.imwrite(tmp_path / "y7.tif", labels[:, 7, :])
    specs = ["z:5:" + str(tmp_path / "z5.png"), "z:14:" + str(tmp_path / "z14.png"), "y:7:" + str(tmp_path / "y7.tif")]
    ann = load_annotations(None, SHAPE, slices=specs)
    assert _planes(ann) == [(0, 5), (0, 14), (1, 7)]
    assert np.array_equal(ann.planes[0].labels, labels[5])
    listing = {"slices": [{"axis": "z", "index": 5, "file": "z5.png"}, {"axis": 1, "index": 7, "file": "y7.tif"}]}
    (tmp_path / "ann.yaml").write_text(yaml.safe_dump(listing))
    ann = load_annotations(tmp_path / "ann.yaml", SHAPE)
    assert _planes(ann) == [(0, 5), (1, 7)] and ann.source == str(tmp_path / "ann.yaml")
    assert parse_slice_spec("x:3:a.png").axis == 2


# --------------------------------------------------------------------------- validation


def _error(exc: pytest.ExceptionInfo[BaseException], name: str) -> str:
    message = str(exc.value)
    assert name in message and "\n" not in message and ";" in message  # names the file, states the fix
    return message


def test_validation_errors_name_the_file(tmp_path, data, monkeypatch):
    labels = data["labels"]
    cases: dict[str, np.ndarray] = {
        "shape.npy": sparse(labels)[:, :-1],
        "negative.npy": sparse(labels).astype(np.int16) - 1,
        "big.npy": sparse(labels).astype(np.int16) * 200,
        "empty.npy": np.zeros(SHAPE, np.uint8),
        "float.npy": sparse(labels).astype(np.float32) * 0.5,
    }
    expect = {"shape.npy": "shape", "negative.npy": "outside", "big.npy": "outside", "empty.npy": "no labelled",
              "float.npy": "non-integer"}
    for name, array in cases.items():
        np.save(tmp_path / name, array)
        with pytest.raises(InputError) as exc:
            load_annotations(tmp_path / name, SHAPE)
        assert expect[name] in _error(exc, name)
    np.save(tmp_path / "whole.npy", sparse(labels).astype(np.float64))  # whole-number floats are fine
    assert load_annotations(tmp_path / "whole.npy", SHAPE).n_classes == 2
    with pytest.raises(InputError) as exc:  # more classes in the data than named
        load_annotations(tmp_path / "whole.npy", SHAPE, classes=1)
    _error(exc, "whole.npy")
    monkeypatch.setattr("pipeline.train.annotations.MAX_LABELLED", 100)  # dense labels are refused
    with pytest.raises(InputError) as exc:
        load_annotations(tmp_path / "whole.npy", SHAPE)
    assert "sparse" in _error(exc, "whole.npy")


def test_slice_errors(tmp_path, data):
    labels = data["labels"]
    Image.fromarray(labels[5], mode="L").save(tmp_path / "ok.png")
    Image.fromarray(np.stack([labels[5] * 40, labels[5], labels[5]], -1), mode="RGB").save(tmp_path / "rgb.png")
    with pytest.raises(InputError) as exc:
        load_annotations(None, SHAPE, slices=[f"z:{SHAPE[0]}:{tmp_path / 'ok.png'}"])
    assert "outside the scan" in _error(exc, "ok.png")
    with pytest.raises(InputError) as exc:
        load_annotations(None, SHAPE, slices=[f"y:3:{tmp_path / 'ok.png'}"])
    assert "check the axis" in _error(exc, "ok.png")
    with pytest.raises(InputError) as exc:
        load_annotations(None, SHAPE, slices=[f"z:3:{tmp_path / 'rgb.png'}"])
    assert "colour" in _error(exc, "rgb.png")
    with pytest.raises(InputError) as exc:
        load_annotations(None, SHAPE, slices=[f"z:3:{tmp_path / 'missing.png'}"])
    _error(exc, "missing.png")
    with pytest.raises(ConfigError):
        parse_slice_spec("q:3:a.png")
    (tmp_path / "bad.yaml").write_text("slices: [{axis: z, file: a.png}]\n")
    with pytest.raises(ConfigError) as exc:
        load_annotations(tmp_path / "bad.yaml", SHAPE)
    _error(exc, "bad.yaml")


def test_missing_class_warns_and_is_recorded(tmp_path, data, caplog):
    vol = sparse(data["labels"])
    vol[vol == 2] = 3  # classes 1 and 3 labelled, 2 never
    np.save(tmp_path / "gap.npy", vol)
    with caplog.at_level(logging.WARNING, logger="pipeline.train.annotations"):
        ann = load_annotations(tmp_path / "gap.npy", SHAPE)
    assert ann.missing == (2,) and ann.counts[1] == 0 and ann.to_json()["missing_classes"] == [2]
    assert any("class 2" in r.getMessage() and "gap.npy" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- training


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return dict(load_bundle(path).state)


def test_training_is_reproducible_with_a_seed(data):
    tmp = data["tmp"]
    a = train(data["scan"], data["ann"], tmp / "rep_a", epochs=1, seed=3, **FAST)
    b = train(data["scan"], data["ann"], tmp / "rep_b", epochs=1, seed=3, **FAST)
    c = train(data["scan"], data["ann"], tmp / "rep_c", epochs=1, seed=4, **FAST)
    wa, wb, wc = _weights(a.bundle_path), _weights(b.bundle_path), _weights(c.bundle_path)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_learns_a_separable_volume_and_bundle_segments_exactly(data):
    tmp = data["tmp"]
    reporter = RecordingReporter()
    result = train(data["scan"], data["ann"], tmp / "model", epochs=4, seed=0, classes=("matrix", "blob"),
                   reporter=reporter, **{**FAST, "steps_per_epoch": 10})
    m = result.metrics
    assert m["loss_last"] < m["loss_first"]
    assert m["val_accuracy"] > 0.9 and m["val_voxels"] > 0 and set(m["val_iou"]) == {"matrix", "blob"}
    # 4 validated epochs, then training continues on all labels (held-out strokes included)
    assert result.epochs == 4 and m["final_steps"] >= 10 and result.steps == 40 + m["final_steps"]
    assert reporter.advanced == result.steps and m["final_voxels"] == data["ann"].total > m["train_voxels"]
    bundle = load_bundle(result.bundle_path)
    prov = bundle.provenance
    assert bundle.classes == ("matrix", "blob") and prov["seed"] == 0 and prov["arch"] == "dilated_resnet"
    assert prov["class_counts"]["blob"] > 0 and prov["metrics"]["val_mean_iou"] == m["val_mean_iou"]
    assert prov["scan"] == str(Path(data["scan"]).resolve()) and prov["annotations"]["source"] == "two-phase"
    # whole-volume prediction on unannotated voxels is good, and blockwise segmentation equals it
    image = open_image(data["scan"])
    offset, scale = bundle.normalization.affine(image.stats)
    reference = to_labels(predict_volume(bundle.build(), data["volume"], offset=offset, scale=scale, exact=True))
    assert (reference == data["labels"]).mean() > 0.9
    out = tmp / "seg.zarr"
    segment(data["scan"], result.bundle_path, out, block=(16, 32, 32), executor=SerialExecutor(), exact=True, qc=False)
    assert np.array_equal(np.asarray(open_image(out, kind="segmentation").array[...]), reference)
    with pytest.raises(OutputExistsError):
        train(data["scan"], data["ann"], tmp / "model", epochs=1, **FAST)


@pytest.mark.parametrize("arch", sorted(a for a in ARCHITECTURES if not a.startswith("test_")))
def test_every_registered_architecture_trains(data, arch):
    result = train(data["scan"], data["ann"], data["tmp"] / f"arch_{arch}", arch=arch, epochs=1,
                   **{**FAST, "params": SMALL.get(arch, {}), "steps_per_epoch": 2})
    bundle = load_bundle(result.bundle_path)
    assert bundle.arch == arch and result.steps == 2 + result.metrics["final_steps"]


def test_more_class_names_than_labels_warns_and_trains(data, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.train.loop"):
        result = train(data["scan"], data["ann"], data["tmp"] / "three", classes=("a", "b", "c"), epochs=1,
                       **{**FAST, "steps_per_epoch": 1})
    assert any("class 3 (c)" in r.getMessage() for r in caplog.records)
    assert result.provenance["class_counts"]["c"] == 0 and load_bundle(result.bundle_path).classes == ("a", "b", "c")


def test_training_option_errors(data):
    with pytest.raises(ConfigError):
        train(data["scan"], data["ann"], data["tmp"] / "x", epochs=0)
    with pytest.raises(ConfigError):
        train(data["scan"], data["ann"], data["tmp"] / "x", val_fraction=1.0)
    with pytest.raises(ConfigError, match="unlabelled"):
        train(data["scan"], data["ann"], data["tmp"] / "x", unlabelled="magic", epochs=1)
    with pytest.raises(InputError):  # annotations for another shape
        other = from_array(np.arange(64, dtype=np.uint8).reshape(4, 4, 4) % 2 + 1)
        train(data["scan"], other, data["tmp"] / "x", epochs=1)
    with pytest.raises(InputError):  # labels beyond the named classes
        train(data["scan"], data["ann"], data["tmp"] / "x", classes=("only",), epochs=1)


# --------------------------------------------------------------------------- CLI


def test_cli_help(capsys):
    from pipeline.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--slice AXIS:INDEX:FILE" in out and "--minutes" in out and "--epochs" in out


def test_cli_train_and_bad_input(data):
    tmp = data["tmp"]
    np.save(tmp / "ann.npy", sparse(data["labels"]))
    base = [str(STUDIOS), "train", str(data["scan"])]
    opts = ["--epochs", "1", "--steps-per-epoch", "3", "--patch", "16", "--batch-size", "2",
            "--params", '{"channels": 4, "dilations": [1], "head": 0}', "--classes", "dark", "bright"]
    ok = subprocess.run([*base, str(tmp / "ann.npy"), str(tmp / "cli_model"), *opts, "--prior-shift", "on"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("wrote ") and "mean IoU" in ok.stdout and len(ok.stdout.strip().splitlines()) == 1
    assert "scan class priors" in ok.stdout  # forced on for these full slices
    odd = subprocess.run([*base, str(tmp / "ann.npy"), str(tmp / "cli_odd"), *opts, "--prior-shift", "often"],
                         capture_output=True, text=True, timeout=120)
    assert odd.returncode == 2 and "--prior-shift" in odd.stderr and "often" in odd.stderr
    assert not (tmp / "cli_odd").exists()
    assert "held-out voxels (" in ok.stdout and "steps on all" in ok.stdout
    assert load_bundle(tmp / "cli_model").classes == ("dark", "bright")
    np.save(tmp / "wrong.npy", np.ones((3, 3, 3), np.uint8))
    bad = subprocess.run([*base, str(tmp / "wrong.npy"), str(tmp / "cli_bad"), *opts],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("studios: error:") and "wrong.npy" in lines[0]
    assert not (tmp / "cli_bad").exists()


# --------------------------------------------------------------------------- scribbles


def test_stroke_split_holds_out_whole_strokes_within_the_cap_per_class():
    from pipeline.train.sampling import Plane
    from pipeline.train.validation import MAX_FRACTION, split_strokes, strokes

    labels = np.full((60, 80), -1, np.int64)
    for j in range(6):  # class 0: six short strokes; class 1: five; class 2: two (too few)
        labels[5 + 9 * j, 3:9] = 0
    for j in range(5):
        labels[4 + 11 * j : 7 + 11 * j, 40:43] = 1
    labels[10, 66:76] = 2
    labels[40, 66:76] = 2
    planes = [Plane(axis=0, index=0, origin=(0, 0), slab=np.zeros((1, 60, 80)), train=labels.copy(),
                    val=np.full_like(labels, -1), val_windows=[])]
    summary = split_strokes(planes, 0.5, np.random.default_rng(0), 3, size=32)
    pl = planes[0]
    assert np.array_equal(np.where(pl.val >= 0, pl.val, pl.train), labels)  # nothing lost or changed
    for c in range(3):
        total = int((labels == c).sum())
        held = int((pl.val == c).sum())
        assert held == summary["held"][c] <= MAX_FRACTION * total  # the cap is 0.2 whatever is asked
        assert (pl.train == c).sum() > 0  # every class keeps training voxels
        ids, n = strokes(labels, c)
        for s in range(1, n + 1):  # each stroke wholly in training or wholly held out
            assert len(set(pl.val[ids == s].tolist())) == 1
    assert summary["held"][0] == 6 and summary["held"][1] == 9  # one stroke each (20 % of 36 / 45)
    assert summary["held"][2] == 0 and summary["strokes"][2] == 2  # fewer than 3 strokes: none held
    assert pl.val_windows and all((pl.val[u : u + a, v : v + b] >= 0).any() for u, v, a, b in pl.val_windows)
    again = [Plane(axis=0, index=0, origin=(0, 0), slab=np.zeros((1, 60, 80)), train=labels.copy(),
                   val=np.full_like(labels, -1), val_windows=[])]
    assert split_strokes(again, 0.0, np.random.default_rng(0), 3, size=32)["held"] == [0, 0, 0]
    assert not again[0].val_windows


def test_best_epoch_is_chosen_by_mean_iou_then_loss():
    from pipeline.train.fit import better, selection_score

    early, later = selection_score(0.921, 0.080), selection_score(0.939, 0.095)
    assert better(later, early) and not better(early, later)  # a higher IoU wins though its loss is higher
    perfect_a, perfect_b = selection_score(1.0, 0.020), selection_score(1.0, 0.010)
    assert better(perfect_b, perfect_a) and not better(perfect_a, perfect_b)  # all right: the lower loss wins
    assert not better(selection_score(1.0, 0.0100001), selection_score(1.0, 0.0100002))  # below 0.01 %: a tie
    assert selection_score(0.93214, 0.1) == selection_score(0.93206, 0.1)  # IoU compared to 4 decimals


def test_make_scribbles_draws_short_strokes_inside_the_classes():
    from pipeline.testing.phantom import make_phantom
    from pipeline.testing.scribbles import make_scribbles, slice_indices

    ph = make_phantom((64, 64, 64), seed=2)
    s = make_scribbles(ph.labels, 3, seed=5)
    assert s.dtype == np.uint8 and s.shape == ph.labels.shape
    assert np.array_equal(s, make_scribbles(ph.labels, 3, seed=5))  # seeded
    assert not np.array_equal(s, make_scribbles(ph.labels, 3, seed=6))
    z = slice_indices(64, 3)
    assert set(np.nonzero(s.any(axis=(1, 2)))[0]) == set(z.tolist())  # only the chosen slices
    lab = s > 0
    assert np.array_equal(s[lab], ph.labels[lab])  # every scribbled voxel has its true class
    for i in z:  # off the boundaries: where a class's eroded mask exists, strokes stay inside it
        for c in (1, 2, 3):
            inner = ndimage.binary_erosion(ph.labels[i] == c)
            if inner.any():
                assert inner[s[i] == c].all()
    per_class = np.bincount(s[lab], minlength=4)[1:]
    assert (per_class > 0).all() and 60 <= lab.sum() <= 3 * 3 * 10 * 5  # ~10 strokes of 5 px per class
    wide = make_scribbles(ph.labels, 1, width=3, strokes=4, seed=1)
    assert (wide > 0).sum() > (make_scribbles(ph.labels, 1, width=1, strokes=4, seed=1) > 0).sum()
    with pytest.raises(InputError):
        make_scribbles(ph.labels, 0)
    with pytest.raises(InputError):
        make_scribbles(ph.labels.astype(np.float32), 3)


@pytest.mark.parametrize("mode", ["pseudo", "entropy", "none"])
def test_unlabelled_modes_train_and_are_recorded(data, mode):
    from pipeline.testing.scribbles import make_scribbles

    scribbles = from_array(make_scribbles(data["labels"], 2, strokes=4, length=4, seed=1), source="scribbles")
    result = train(data["scan"], scribbles, data["tmp"] / f"unl_{mode}", epochs=2, unlabelled=mode,
                   **{**FAST, "steps_per_epoch": 4})
    assert result.provenance["recipe"]["unlabelled"] == mode
    assert np.isfinite(result.metrics["loss_last"]) and result.metrics["final_voxels"] == scribbles.total


def test_em_recovers_the_class_priors_of_unlabelled_voxels():
    from pipeline.train.priors import em_priors

    rng = np.random.default_rng(0)
    truth_prior, train_prior = np.array([0.75, 0.23, 0.02]), np.array([1 / 3, 1 / 3, 1 / 3])
    y = rng.choice(3, size=40_000, p=truth_prior)
    # posteriors of a decent classifier trained under a uniform prior: likelihoods of 1-D Gaussians
    x = rng.normal(loc=np.array([0.0, 2.0, -2.0])[y], scale=0.8)
    lik = np.exp(-0.5 * ((x[None, :] - np.array([0.0, 2.0, -2.0])[:, None]) / 0.8) ** 2)
    post = lik * train_prior[:, None]
    post /= post.sum(0, keepdims=True)
    est = em_priors(post, train_prior)
    assert np.allclose(est, truth_prior, atol=0.01) and not np.allclose(post.mean(1), truth_prior, atol=0.05)


@pytest.mark.parametrize("arch", sorted(a for a in ARCHITECTURES if not a.startswith("test_")))
def test_prior_shift_moves_exactly_the_output_bias(arch):
    from pipeline.models import build_model
    from pipeline.train.priors import output_bias

    model = build_model(arch, {**SMALL.get(arch, {}), "classes": 3, "in_channels": 1}).eval()
    bias = output_bias(model, 3)
    assert bias is not None, arch
    h = model.halo
    x = torch.randn(1, 1, 3 + 2 * h, 4 + 2 * h, 4 + 2 * h)
    with torch.no_grad():
        before = model(x)
        bias += torch.tensor([0.5, -1.0, 2.0])
        after = model(x)
    assert torch.allclose(after - before, torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1, 1).expand_as(before),
                          atol=1e-5)


def test_prior_shift_is_recorded_and_can_be_turned_off(data):
    on = train(data["scan"], data["ann"], data["tmp"] / "prior_on", epochs=1, prior_shift="on", **FAST)
    off = train(data["scan"], data["ann"], data["tmp"] / "prior_off", epochs=1, prior_shift=False, **FAST)
    m = on.metrics
    assert len(m["prior_scan"]) == 2 and abs(sum(m["prior_scan"]) - 1) < 1e-3 and m["prior_shift"] is not None
    assert on.provenance["recipe"]["prior_shift"] is True
    assert "prior_scan" not in off.metrics and off.provenance["recipe"]["prior_shift"] is False


def test_prior_shift_auto_is_on_for_scribbles_only(data):
    from pipeline.train.priors import use_prior_shift

    full = data["ann"]  # full slices: their class mix is the scan's, no shift
    labels = np.zeros(SHAPE, np.uint8)
    labels[5, 3:9, 4] = 1
    labels[5, 20:26, 30] = 2
    scribbles = from_array(labels, source="strokes")
    assert use_prior_shift("auto", full) is False and use_prior_shift("auto", scribbles) is True
    assert use_prior_shift("on", full) is True and use_prior_shift("off", scribbles) is False
    assert use_prior_shift(True, full) is True and use_prior_shift(False, scribbles) is False
    auto = train(data["scan"], data["ann"], data["tmp"] / "prior_auto", epochs=1, **FAST)
    assert "prior_scan" not in auto.metrics and auto.provenance["recipe"]["prior_shift"] is False
    with pytest.raises(ConfigError, match="prior shift 'sometimes' must be one of auto, on, off"):
        train(data["scan"], data["ann"], data["tmp"] / "prior_bad", epochs=1, prior_shift="sometimes", **FAST)
    assert not (data["tmp"] / "prior_bad").exists()
