"""``studios analyse``: the whole stage from the command line, and its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import zarr
from analyse_helpers import blobs, make_seg

from pipeline.cli import main


def test_cli_writes_every_output(tmp_path, capsys):
    shape = (24, 26, 28)
    lab = np.ones(shape, np.uint8)
    lab[blobs(shape, 3, fraction=0.2)] = 2
    lab[blobs(shape, 4, fraction=0.1) & (lab == 1)] = 3
    seg = make_seg(tmp_path / "s.zarr", lab, ("matrix", "fibre", "pore"), voxel_size=(0.5, 0.5, 0.5))
    assert main(["analyse", str(seg), "--block", "16", "--rho", "1.5", "--max-radius", "3",
                 "--orientation-field"]) == 0
    out = tmp_path / "s.analysis"
    text = capsys.readouterr().out
    assert "objects" in text and str(out / "analysis.json") in text
    data = json.loads((out / "analysis.json").read_text())
    assert set(data) >= {"phases", "objects", "orientation", "pores", "surfaces", "seconds"}
    assert data["orientation"]["class"] == "fibre" and data["orientation"]["field"] == "orientation.zarr"
    field = zarr.open_group(str(out / "orientation.zarr"), mode="r")["0"][...]
    norms = np.linalg.norm(field, axis=0)
    np.testing.assert_allclose(norms[lab == 2], 1.0, atol=1e-5)
    assert (norms[lab != 2] == 0).all()
    for name in ("fibre", "pore"):
        facts = data["surfaces"]["classes"][name]
        assert facts["closed"] and (out / facts["stl"]).stat().st_size == 84 + 50 * facts["faces"]
    assert (out / "meshes" / "precomputed" / "info").exists()
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    nodes = list(Reader(parse_url(str(out / "objects.zarr")))())
    assert any(isinstance(s, Label) for n in nodes for s in n.specs)


def test_cli_errors_are_one_line(tmp_path):
    cmd = [sys.executable, "-m", "pipeline.cli", "analyse", str(tmp_path / "missing.zarr")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0
    assert "missing.zarr: does not exist" in r.stderr
    make_seg(tmp_path / "s.zarr", np.ones((8, 8, 8), np.uint8), ("matrix",))
    r = subprocess.run([*cmd[:-1], str(tmp_path / "s.zarr"), "--fibre", "glass"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "no class 'glass'" in r.stderr and r.stderr.strip().count("\n") == 0
    assert not (tmp_path / "s.analysis").exists()
