"""Annotation forms from other tools: napari Labels (zarr, TIFF), OME-Zarr label groups, ilastik .ilp."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import zarr
from conftest import make_scan

from pipeline.cli.main import main
from pipeline.core.errors import InputError
from pipeline.io.bundle import load_bundle
from pipeline.train.annotations import load_annotations

SHAPE = (12, 40, 48)


def _labels() -> np.ndarray:
    """Scribble-like labels: two classes on z=3, one stroke of class 2 on y=30."""
    lab = np.zeros(SHAPE, np.uint8)
    lab[3, 5:15, 4:30] = 1
    lab[3, 20:25, 10:40] = 2
    lab[:, 30, 40:44] = 2
    return lab


def _dense(ann) -> np.ndarray:  # type: ignore[no-untyped-def]
    out = np.zeros(ann.shape, np.uint8)
    for p in ann.planes:
        idx: list[object] = [slice(None)] * 3
        idx[p.axis] = p.index
        view = out[tuple(idx)]
        view[p.labels > 0] = p.labels[p.labels > 0]
    return out


def write_ilp(path: Path, blocks: list[tuple[str, np.ndarray]], names: list[str] | None = None,
              axistags: str | None = None) -> Path:
    """An ilastik pixel-classification project in the layout ilastik writes (blocks + blockSlice)."""
    with h5py.File(path, "w") as f:
        f["Input Data/StorageVersion"] = "0.2"
        if axistags is not None:
            f["Input Data/infos/lane0000/Raw Data/axistags"] = axistags
        sets = f.create_group("PixelClassification/LabelSets/labels000")
        for i, (span, data) in enumerate(blocks):
            ds = sets.create_dataset(f"block{i:04d}", data=data)
            ds.attrs["blockSlice"] = span.encode()
        if names is not None:
            f["PixelClassification/LabelNames"] = np.array([n.encode() for n in names], dtype=object)
    return path


def _ilp_blocks(lab: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The labels as two ilastik blocks (zyxc), covering exactly the labelled regions."""
    a = lab[3:4, 5:25, 4:40][..., None]
    b = lab[0:12, 30:31, 40:44][..., None]
    return [("[3:4,5:25,4:40,0:1]", a), ("[0:12,30:31,40:44,0:1]", b)]


def test_ilastik_project_reads_strokes_and_names(tmp_path):
    lab = _labels()
    ilp = write_ilp(tmp_path / "proj.ilp", _ilp_blocks(lab), names=["matrix", "fibre"])
    ann = load_annotations(ilp, SHAPE)
    assert np.array_equal(_dense(ann), lab)
    assert ann.names == ("matrix", "fibre") and ann.n_classes == 2
    assert ann.counts == (int((lab == 1).sum()), int((lab == 2).sum()))


def test_ilastik_axistags_with_time_axis(tmp_path):
    lab = _labels()
    tags = json.dumps({"axes": [{"key": k} for k in "tzyxc"]})
    blocks = [(f"[0:1,{s[1:]}", d[None]) for s, d in _ilp_blocks(lab)]
    ann = load_annotations(write_ilp(tmp_path / "t.ilp", blocks, axistags=tags), SHAPE)
    assert np.array_equal(_dense(ann), lab) and ann.names == ()


def test_ilastik_xyz_axistags_are_transposed(tmp_path):
    lab = _labels()
    tags = json.dumps({"axes": [{"key": k} for k in "xyzc"]})
    block = np.transpose(lab[..., None], (2, 1, 0, 3))
    ann = load_annotations(write_ilp(tmp_path / "x.ilp", [("[0:48,0:40,0:12,0:1]", block)], axistags=tags), SHAPE)
    assert np.array_equal(_dense(ann), lab)


def _one_line(exc: pytest.ExceptionInfo[BaseException], name: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and name in msg and ";" in msg
    return msg


def test_ilastik_without_labels_is_refused(tmp_path):
    ilp = write_ilp(tmp_path / "empty.ilp", [], names=["a", "b"])
    with pytest.raises(InputError) as exc:
        load_annotations(ilp, SHAPE)
    assert "no labels" in _one_line(exc, "empty.ilp")


def test_ilastik_of_another_image_is_refused(tmp_path):
    block = np.ones((1, 10, 10, 1), np.uint8)
    ilp = write_ilp(tmp_path / "other.ilp", [("[3:4,35:45,0:10,0:1]", block)])
    with pytest.raises(InputError) as exc:
        load_annotations(ilp, SHAPE)
    assert "outside the scan" in _one_line(exc, "other.ilp")


def test_ilastik_2d_project_and_non_hdf5_are_refused(tmp_path):
    ilp = write_ilp(tmp_path / "flat.ilp", [("[0:10,0:10,0:1]", np.ones((10, 10, 1), np.uint8))])
    with pytest.raises(InputError) as exc:
        load_annotations(ilp, SHAPE)
    assert "3D" in _one_line(exc, "flat.ilp")
    (tmp_path / "junk.ilp").write_text("not hdf5")
    with pytest.raises(InputError) as exc:
        load_annotations(tmp_path / "junk.ilp", SHAPE)
    _one_line(exc, "junk.ilp")


@pytest.mark.parametrize("fmt", [2, 3])
def test_napari_labels_as_zarr_array(tmp_path, fmt):
    lab = _labels().astype(np.int32)  # napari Labels layers are int32 by default
    path = tmp_path / f"labels_v{fmt}.zarr"
    arr = zarr.create_array(str(path), shape=lab.shape, dtype=lab.dtype, chunks=(4, 20, 24), zarr_format=fmt)
    arr[...] = lab
    ann = load_annotations(path, SHAPE)
    assert np.array_equal(_dense(ann), lab)


def test_ome_zarr_label_group_and_image_with_labels(tmp_path):
    lab = _labels()
    image = zarr.create_group(str(tmp_path / "image.zarr"), zarr_format=2)
    image.attrs["multiscales"] = [{"datasets": [{"path": "s0"}]}]
    image.create_array("s0", shape=SHAPE, dtype="f4", chunks=SHAPE)
    labels = image.create_group("labels")
    labels.attrs["labels"] = ["cells"]
    cells = labels.create_group("cells")
    cells.attrs["multiscales"] = [{"datasets": [{"path": "0"}, {"path": "1"}]}]
    cells.attrs["image-label"] = {"version": "0.4"}
    cells.create_array("0", shape=(1, *SHAPE), dtype="u2", chunks=(1, *SHAPE))[...] = lab[None]  # (c, z, y, x)
    cells.create_array("1", shape=(1, 6, 20, 24), dtype="u2", chunks=(1, 6, 20, 24))
    for path in ("image.zarr", "image.zarr/labels", "image.zarr/labels/cells"):
        ann = load_annotations(tmp_path / path, SHAPE)
        assert np.array_equal(_dense(ann), lab), path


def test_napari_labels_tiff_with_leading_axis(tmp_path):
    lab = _labels()
    tifffile.imwrite(tmp_path / "labels.tif", lab[None].astype(np.int32))
    ann = load_annotations(tmp_path / "labels.tif", SHAPE)
    assert np.array_equal(_dense(ann), lab)


def test_labels_of_another_shape_wrong_dtype_one_class(tmp_path):
    tifffile.imwrite(tmp_path / "small.tif", _labels()[:, :30])
    with pytest.raises(InputError) as exc:
        load_annotations(tmp_path / "small.tif", SHAPE)
    assert "(12, 30, 48)" in _one_line(exc, "small.tif")
    np.save(tmp_path / "complex.npy", _labels().astype(np.complex64))
    with pytest.raises(InputError) as exc:
        load_annotations(tmp_path / "complex.npy", SHAPE)
    assert "complex64" in _one_line(exc, "complex.npy")
    one = np.where(_labels() > 0, 1, 0).astype(np.uint8)
    np.save(tmp_path / "one.npy", one)
    with pytest.raises(InputError) as exc:
        load_annotations(tmp_path / "one.npy", SHAPE)
    assert "two classes" in _one_line(exc, "one.npy")


def _volume() -> np.ndarray:
    rng = np.random.default_rng(0)
    lab = np.ones(SHAPE, np.uint8)
    lab[:, 18:28] = 2
    return (np.where(lab == 2, 180.0, 60.0) + rng.normal(0, 8, SHAPE)).astype(np.float32)


def test_studios_train_accepts_ilp_and_napari_zarr(tmp_path, capsys):
    scan = make_scan(tmp_path, _volume())
    lab = np.zeros(SHAPE, np.uint8)
    lab[4, 2:16, :] = 1
    lab[4, 19:27, :] = 2
    ilp = write_ilp(tmp_path / "p.ilp", [("[4:5,0:40,0:48,0:1]", lab[4:5, :, :, None])], names=["dark", "bright"])
    common = ["--arch", "filterbank_mlp", "--params", '{"sigmas": [1.0], "hidden": 4, "layers": 1}', "--epochs", "1",
              "--steps-per-epoch", "2", "--batch-size", "1", "--patch", "16", "--threads", "1"]
    assert main(["train", str(scan), str(ilp), str(tmp_path / "m1"), *common]) == 0
    assert load_bundle(tmp_path / "m1").classes == ("dark", "bright")
    z = zarr.create_array(str(tmp_path / "napari.zarr"), shape=SHAPE, dtype="i4", chunks=SHAPE, zarr_format=2)
    z[...] = lab
    assert main(["train", str(scan), str(tmp_path / "napari.zarr"), str(tmp_path / "m2"), *common]) == 0
    assert load_bundle(tmp_path / "m2").provenance["annotations"]["counts"] == [int((lab == 1).sum()),
                                                                                 int((lab == 2).sum())]
    capsys.readouterr()
    empty = write_ilp(tmp_path / "none.ilp", [])
    assert main(["train", str(scan), str(empty), str(tmp_path / "m3"), *common]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("studios: error: ") and "none.ilp" in err and "\n" not in err
    assert not (tmp_path / "m3").exists()
