"""Objects: the blockwise instance image equals scipy.ndimage.label, the table equals regionprops."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from analyse_helpers import blobs, make_seg
from scipy import ndimage
from skimage.measure import regionprops

from pipeline.analyse import analyse
from pipeline.core.errors import InputError, OutputExistsError

VOXEL = (2.0, 1.0, 1.5)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("objects")
    shape = (37, 41, 45)  # blocks of 16 do not divide it; blobs cross block faces and corners
    lab = np.ones(shape, np.uint8)
    lab[blobs(shape, 1, fraction=0.25)] = 2
    lab[blobs(shape, 2, fraction=0.15) & (lab == 1)] = 3
    seg = make_seg(tmp / "held_out.zarr", lab, ("matrix", "fibre", "pore"), voxel_size=VOXEL)
    return lab, analyse(seg, block=16, meshes=False, max_radius=4)


def test_instance_image_equals_scipy_label_up_to_renumbering(result):
    lab, res = result
    ids = zarr.open_group(str(res.out / "objects.zarr"), mode="r")["0"][...]
    assert ids.dtype == np.uint32
    assert res.data["objects"]["count"] == int(ids.max())
    crossing = 0
    for k in (2, 3):
        ref, n = ndimage.label(lab == k)
        ours = ids[lab == k]
        assert (ours > 0).all() and (ids[(lab != k) & np.isin(ids, np.unique(ours))] == 0).all()
        pairs = np.unique(np.stack([ref[lab == k], ours]), axis=1)
        assert pairs.shape[1] == n == len(np.unique(ours)) == len(np.unique(pairs[0]))  # a bijection
        crossing += sum(1 for sl in ndimage.find_objects(ref) if any(s.start // 16 != (s.stop - 1) // 16 for s in sl))
    assert crossing > 20
    assert (ids[lab == 1] == 0).all()


def test_table_equals_regionprops(result):
    lab, res = result
    table = pq.read_table(res.out / "objects.parquet").to_pydict()
    ids = zarr.open_group(str(res.out / "objects.zarr"), mode="r")["0"][...]
    rows = {i: r for r, i in enumerate(table["id"])}
    for k, name in ((2, "fibre"), (3, "pore")):
        ref, _ = ndimage.label(lab == k)
        for rp in regionprops(ref, spacing=VOXEL):
            z, y, x = rp.coords[0]
            r = rows[int(ids[z, y, x])]
            assert table["class"][r] == name and table["label"][r] == k
            assert table["voxels"][r] == rp.num_pixels
            assert table["volume"][r] == pytest.approx(rp.area)
            np.testing.assert_allclose([table[f"centroid_{a}"][r] for a in "zyx"], rp.centroid, rtol=1e-9)
            bbox = tuple(table[f"bbox_{a}{e}"][r] for e in "01" for a in "zyx")
            assert bbox == rp.bbox
            assert table["equivalent_diameter"][r] == pytest.approx(rp.equivalent_diameter_area)
            assert table["axis_major"][r] == pytest.approx(rp.axis_major_length, rel=1e-6, abs=1e-9)
            assert table["axis_minor"][r] == pytest.approx(rp.axis_minor_length, rel=1e-6, abs=1e-6)
            touches = any(s.start == 0 or s.stop == n for s, n in zip(rp.slice, lab.shape, strict=True))
            assert table["touches_border"][r] == touches
            if rp.num_pixels > 20:  # principal axis = scikit-image's inertia eigenvector of the smallest moment
                _, vec = np.linalg.eigh(rp.inertia_tensor)
                d = np.array([table[f"direction_{a}"][r] for a in "zyx"])
                assert abs(abs(d @ vec[:, 0]) - 1) < 1e-6


def test_analysis_json_and_errors(result, tmp_path):
    lab, res = result
    data = json.loads(res.json_path.read_text())
    assert set(data["objects"]["classes"]) == {"fibre", "pore"}
    frac = data["phases"]["classes"]["pore"]["fraction"]
    assert frac == pytest.approx(np.mean(lab == 3))
    assert data["phases"]["classes"]["pore"]["profile"]["z"][0] == pytest.approx(np.mean(lab[0] == 3))
    assert data["pores"]["size_distribution"]["count"] == ndimage.label(lab == 3)[1]
    with pytest.raises(OutputExistsError):
        analyse(res.json_path.parent.with_name("held_out.zarr"), block=16)
    with pytest.raises(InputError, match="no class 'glass'"):
        analyse(res.json_path.parent.with_name("held_out.zarr"), tmp_path / "x", fibre="glass")
    assert not (tmp_path / "x").exists()
    seg = res.json_path.parent.with_name("held_out.zarr")
    with pytest.raises(InputError, match="overlap"):
        analyse(seg, seg.parent, overwrite=True)
    assert (seg / "zarr.json").exists()


def test_blocks_without_a_class_and_classes_without_voxels(tmp_path):
    lab = np.ones((20, 20, 20), np.uint8)
    lab[2:5, 3:18, 4:6] = 2  # fibre only in the first blocks along z; no pore at all
    seg = make_seg(tmp_path / "s.zarr", lab, ("matrix", "fibre", "pore"), chunks=8)
    res = analyse(seg, classes=["fibre", "pore"], block=8, max_radius=2)
    assert res.data["objects"]["classes"]["fibre"]["count"] == 1
    assert res.data["objects"]["classes"]["pore"]["count"] == 0
    assert res.data["surfaces"]["classes"]["pore"]["faces"] == 0
    ids = zarr.open_group(str(res.out / "objects.zarr"), mode="r")["0"][...]
    np.testing.assert_array_equal(ids, (lab == 2).astype(np.uint32))
