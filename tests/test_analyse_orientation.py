"""Fibre orientation: structure tensor blockwise equals whole-volume, and finds known fibre directions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.analyse import orientation as ori
from pipeline.core.tiling import plan_blocks
from pipeline.io.store import read_padded


def _fibres(shape, direction, radius=1.6, spacing=7, seed=0):
    """Straight parallel cylinders along ``direction`` (z, y, x), on a jittered lattice."""
    d = np.asarray(direction, float) / np.linalg.norm(direction)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij"), -1)
    u = np.cross(d, [1.0, 0, 0] if abs(d[0]) < 0.9 else [0, 1.0, 0])
    u /= np.linalg.norm(u)
    v = np.cross(d, u)
    a, b = grid @ u, grid @ v
    rng = np.random.default_rng(seed)
    out = np.zeros(shape, bool)
    span = int(max(shape) * 1.8)
    for i in range(-span, span, spacing):
        for j in range(-span, span, spacing):
            ci, cj = i + rng.uniform(-1, 1), j + rng.uniform(-1, 1)
            out |= (a - ci) ** 2 + (b - cj) ** 2 <= radius**2
    return out.astype(np.uint8)


def _blockwise(vol, block, sigma, rho):
    h = ori.halo_for(sigma, rho)
    out = np.zeros((*vol.shape, 3, 3))
    for b in plan_blocks(vol.shape, block, h):
        padded = read_padded(vol, b, vol.shape)
        out[b.write.to_slices()] = ori.structure_tensor(padded == 1, sigma, rho).numpy()
    return out


def test_blockwise_equals_whole_volume():
    vol = _fibres((26, 29, 31), (1, 0.5, 0.2))
    whole = _blockwise(vol, vol.shape, 1.0, 1.5)
    parts = _blockwise(vol, (11, 13, 16), 1.0, 1.5)
    np.testing.assert_array_equal(parts, whole)  # bit-identical: a fixed summation order per voxel


def test_torch_path_equals_scipy_path():
    vol = _fibres((20, 21, 22), (0.2, 1, 0.4))
    padded = np.pad(vol, ori.halo_for(1.0, 2.0), mode="edge") == 1
    a = ori.structure_tensor(padded, 1.0, 2.0)
    b = ori.structure_tensor(padded, 1.0, 2.0, device="torch-cpu")
    np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=0, atol=1e-14)


@pytest.mark.parametrize("direction", [(1, 0, 0), (0.3, 0.2, 1.0), (0.6, -0.8, 0.3)])
def test_straight_fibres_of_known_direction_within_two_degrees(direction):
    vol = _fibres((34, 34, 34), direction)
    sigma, rho = 1.0, 2.0
    h = ori.halo_for(sigma, rho)
    padded = np.pad(vol, h, mode="edge")
    p = ori.directions(ori.structure_tensor(padded == 1, sigma, rho))
    stats = ori.OrientationStats()
    stats.add(p[torch.as_tensor(vol == 1)].numpy())
    report = stats.to_json()
    d = np.asarray(direction, float) / np.linalg.norm(direction)
    angle = math.degrees(math.acos(min(1.0, abs(float(np.dot(report["main_direction"], d))))))
    assert angle < 2.0, angle
    assert report["eigenvalues"][0] > 0.9  # well aligned: A close to d d^T
    assert sum(report["polar"]["counts"]) == report["voxels"] == int(vol.sum())
    polar = math.degrees(math.acos(abs(d[0])))
    peak = np.argmax(report["polar"]["counts"]) * 5
    assert peak <= polar + 5 and polar - 5 <= peak + 5


def test_phantom_fibre_families_are_recovered():
    from pipeline.testing.phantom import FIBRE, _family_axes, make_phantom

    shape, seed = (40, 56, 56), 3
    ph = make_phantom(shape, seed=seed, families=2, spread_deg=0.0, fibre_fraction=0.2, pore_fraction=0.0)
    axes = _family_axes(np.random.default_rng(np.random.SeedSequence(seed).spawn(3)[0]), 2)  # as the phantom drew them
    sigma, rho = 1.0, 2.0
    h = ori.halo_for(sigma, rho)
    padded = np.pad(ph.labels, h, mode="edge")
    inner = ph.labels == FIBRE
    p = ori.directions(ori.structure_tensor(padded == FIBRE, sigma, rho))[torch.as_tensor(inner)].numpy()
    family = np.argmax(np.abs(p @ axes.T), axis=1)
    for f in range(2):
        stats = ori.OrientationStats()
        stats.add(p[family == f])
        main = np.asarray(stats.to_json()["main_direction"])
        angle = math.degrees(math.acos(min(1.0, abs(float(main @ axes[f])))))
        assert angle < 2.0, (f, angle)
        assert (family == f).mean() > 0.2
