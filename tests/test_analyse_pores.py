"""Pores: local thickness blockwise equals the whole volume; phase profiles; pore size distribution."""

from __future__ import annotations

import numpy as np
import pytest
from analyse_helpers import blobs

from pipeline.analyse.pores import PhaseCounts, local_thickness, size_distribution, thickness_block
from pipeline.core.geometry import Box
from pipeline.core.tiling import plan_blocks


def test_local_thickness_blockwise_equals_whole_volume():
    seg = np.where(blobs((30, 33, 35), 5, fraction=0.3, sigma=2.5), 3, 1).astype(np.uint8)
    radius = 4
    whole = thickness_block(seg, Box.from_shape(seg.shape), seg.shape, 3, radius)
    parts = np.zeros_like(whole)
    for b in plan_blocks(seg.shape, (8, 11, 16), 0):
        parts[b.write.to_slices()] = thickness_block(seg, b.write, seg.shape, 3, radius)
    np.testing.assert_array_equal(parts, whole)
    assert (whole[seg == 3] > 0).all() and (whole[seg != 3] == 0).all()


def test_thickness_of_a_slab_and_a_ball():
    slab = np.zeros((20, 20, 20), bool)
    slab[:, :, 5:12] = True  # 7 voxels thick
    t = local_thickness(np.pad(slab, 8), 4)[8:-8, 8:-8, 8:-8]
    assert set(np.unique(t[slab])) <= {4.0, 6.0, 8.0} and np.median(t[slab]) == 8.0
    z, y, x = np.ogrid[:31, :31, :31]
    ball = (z - 15) ** 2 + (y - 15) ** 2 + (x - 15) ** 2 <= 10**2
    t = local_thickness(np.pad(ball, 20), 10)[20:-20, 20:-20, 20:-20]
    assert (t[15, 15, 15], t[15, 15, 6]) == (20.0, 20.0)  # one ball of radius 10 fills the whole pore


def test_phase_profiles_and_size_distribution():
    seg = np.ones((6, 7, 8), np.uint8)
    seg[2:4] = 2
    counts = PhaseCounts(seg.shape, 2)
    for b in plan_blocks(seg.shape, (4, 4, 4), 0):
        counts.add(b.write.offset, seg[b.write.to_slices()])
    data = counts.to_json(("matrix", "pore"), (2.0, 1.0, 1.0))
    assert data["classes"]["pore"]["fraction"] == pytest.approx(2 / 6)
    assert data["classes"]["pore"]["profile"]["z"] == [0, 0, 1, 1, 0, 0]
    assert data["classes"]["pore"]["volume"] == 2 * 7 * 8 * 2.0
    d = size_distribution(np.array([1.0, 3.0, 3.5, 9.0]), np.array([1.0, 10.0, 12.0, 300.0]))
    assert d["count"] == 4 and sum(d["number"]) == 4 and sum(d["volume"]) == pytest.approx(323.0)
