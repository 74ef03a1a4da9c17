"""Segmentations are OME-Zarr 0.5 label images: ome-zarr-py finds them, with class names and colours."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from conftest import make_scan

from pipeline.compute.executors import SerialExecutor
from pipeline.io.bundle import init_bundle, save_bundle
from pipeline.io.labels import class_color, image_label, segment_properties
from pipeline.segment.run import segment

SMALL = {"channels": 4, "dilations": [1, 2], "head": 4}


@pytest.fixture
def seg(tmp_path, rng):
    scan = make_scan(tmp_path, rng.integers(0, 200, (20, 24, 26)).astype(np.uint8))
    model = save_bundle(init_bundle(classes=("matrix", "fibre", "pore"), params=SMALL, seed=2), tmp_path / "model")
    out = tmp_path / "seg.zarr"
    segment(scan, model, out, block=16, chunks=(16, 16, 16), qc=False, executor=SerialExecutor())
    return scan, out


def test_image_label_dict_follows_the_spec():
    d = image_label(["a", "b"], source="../../")
    assert d["colors"] == [{"label-value": 1, "rgba": list(class_color(1))},
                           {"label-value": 2, "rgba": list(class_color(2))}]
    assert d["properties"] == [{"label-value": 1, "class": "a"}, {"label-value": 2, "class": "b"}]
    assert d["source"] == {"image": "../../"}
    assert all(0 <= c <= 255 for entry in d["colors"] for c in entry["rgba"])


def test_segmentation_is_a_label_image_found_by_ome_zarr_py(seg):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    scan, out = seg
    attrs = zarr.open_group(str(out), mode="r").attrs["ome"]
    assert attrs["version"] == "0.5" and attrs["image-label"]["source"] == {"image": "../scan.zarr"}

    # read from the segmentation itself
    nodes = list(Reader(parse_url(str(out)))())
    label_nodes = [n for n in nodes if any(isinstance(s, Label) for s in n.specs)]
    assert len(label_nodes) == 1
    node = label_nodes[0]
    assert any(isinstance(s, Multiscales) for s in node.specs)
    assert {k: v["class"] for k, v in node.metadata["properties"].items()} == {1: "matrix", 2: "fibre", 3: "pore"}
    assert set(node.metadata["color"]) == {1, 2, 3}
    np.testing.assert_array_equal(np.asarray(node.data[0]), zarr.open_group(str(out), mode="r")["0"][...])

    # and from the scan, through its labels/ listing
    listing = zarr.open_group(str(scan / "labels"), mode="r").attrs["ome"]
    assert listing["labels"] == ["../../seg.zarr"]
    nodes = list(Reader(parse_url(str(scan)))())
    found = [n for n in nodes if any(isinstance(s, Label) for s in n.specs)]
    assert [n.metadata["name"] for n in found] == ["seg"]  # the multiscales name
    assert found[0].metadata["properties"][2]["class"] == "fibre"


def test_rerun_lists_the_label_once(seg, tmp_path):
    scan, out = seg
    model = tmp_path / "model"
    segment(scan, model, out, block=16, chunks=(16, 16, 16), qc=False, overwrite=True, executor=SerialExecutor())
    segment(scan, model, tmp_path / "seg2.zarr", block=16, chunks=(16, 16, 16), qc=False, executor=SerialExecutor())
    listing = zarr.open_group(str(scan / "labels"), mode="r").attrs["ome"]
    assert listing["labels"] == ["../../seg.zarr", "../../seg2.zarr"]


def test_neuroglancer_segment_properties(tmp_path):
    info = segment_properties(tmp_path / "segment_properties", {2: "fibre", 1: "matrix"})
    data = json.loads(info.read_text())
    assert data["@type"] == "neuroglancer_segment_properties"
    assert data["inline"]["ids"] == ["1", "2"]
    assert data["inline"]["properties"][0] == {"id": "label", "type": "label", "values": ["matrix", "fibre"]}
