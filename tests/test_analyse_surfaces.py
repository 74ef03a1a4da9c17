"""Surfaces: marching cubes per block, stitched into one closed mesh without cracks or duplicate faces."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipeline.analyse.surfaces import MeshBuilder, block_mesh, read_ply, write_ply, write_precomputed, write_stl
from pipeline.core.tiling import plan_blocks


def _sphere(shape, centre, radius):
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return (((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) <= radius**2).astype(np.uint8)


def _mesh(vol, block, sigma, voxel=(1.0, 1.0, 1.0)):
    builder = MeshBuilder()
    for b in plan_blocks(vol.shape, block, 0):
        builder.add(*block_mesh(vol, b, vol.shape, 1, sigma))
    return builder.finish(voxel)


@pytest.mark.parametrize("sigma", [1.0, 0.0])
def test_sphere_across_block_corners_is_closed_with_the_analytic_area(sigma):
    r = 13.0
    vol = _sphere((45, 47, 49), (24, 24, 24), r)  # blocks of 16 and 12: corners at (16|24, ...) inside the sphere
    one = _mesh(vol, vol.shape, sigma)
    for block in [(16, 16, 16), (12, 16, 20)]:
        mesh = _mesh(vol, block, sigma)
        facts = mesh.check()
        assert facts == {"closed": True, "boundary_edges": 0, "nonmanifold_edges": 0, "duplicate_faces": 0,
                         "euler": 2}, facts
        assert len(mesh.faces) == len(one.faces) and mesh.area == pytest.approx(one.area, rel=1e-12)
    if sigma > 0:  # the smoothed surface; the raw staircase overestimates by several percent
        assert abs(one.area / (4 * math.pi * r**2) - 1) < 0.02


def test_surface_closes_at_the_volume_border_and_exports(tmp_path):
    vol = np.zeros((20, 22, 24), np.uint8)
    vol[:10, 3:15, 4:30] = 1  # touches three volume faces
    mesh = _mesh(vol, (8, 8, 8), 1.0, voxel=(2.0, 1.0, 1.0))
    assert mesh.check()["closed"] and mesh.check()["euler"] == 2
    back = read_ply(write_ply(mesh, tmp_path / "m.ply"))
    np.testing.assert_allclose(back.vertices, mesh.vertices, rtol=1e-6)
    np.testing.assert_array_equal(back.faces, mesh.faces)
    stl = write_stl(mesh, tmp_path / "m.stl").read_bytes()
    assert len(stl) == 84 + 50 * len(mesh.faces)
    d = write_precomputed({1: mesh}, {1: "fibre"}, tmp_path / "precomputed")
    assert json.loads((d / "info").read_text())["@type"] == "neuroglancer_legacy_mesh"
    assert json.loads((d / "1:0").read_text()) == {"fragments": ["1:0:all"]}
    frag = (d / "1:0:all").read_bytes()
    nv = int(np.frombuffer(frag[:4], "<u4")[0])
    assert nv == len(mesh.vertices) and len(frag) == 4 + 12 * nv + 12 * len(mesh.faces)
    assert json.loads((d / "segment_properties" / "info").read_text())["inline"]["ids"] == ["1"]
