"""The model family: every registered architecture keeps the stride-free contract exactly.

Contract checks run for every architecture in the registry (shape, params round trip, tight
halo, crop exactness, safetensors); then the architecture-specific promises: cube-symmetry
equivariance of ``rotinv_dilated`` (and a control showing the test can fail), and the
invariance and correctness of the ``filterbank_mlp`` features.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy import ndimage

from pipeline.core.errors import ModelError
from pipeline.models import ARCHITECTURES, DEFAULT_ARCH, StridefreeModel, build_model
from pipeline.models.dilated import DilatedResNet
from pipeline.models.filterbank import FilterBankMLP, gaussian_radius, gaussian_taps, symmetric3_eigvals
from pipeline.models.rotinv import InvariantConv3d, RotInvDilatedNet, cube_orbit_index

#: Every registered architecture except the test-only ones other test modules register.
ARCHS = sorted(a for a in ARCHITECTURES if not a.startswith("test_"))

#: Small configurations that keep the float64 tests fast; other archs use their defaults.
SMALL: dict[str, dict[str, Any]] = {
    "dilated_resnet": {"channels": 4, "dilations": [1, 2, 1], "head": 4},
    "rotinv_dilated": {"channels": 4, "dilations": [1, 2, 1], "head": 4},
    "filterbank_mlp": {"sigmas": [0.7, 1.6], "hidden": 8, "layers": 2},
}

Transform = Callable[[torch.Tensor], torch.Tensor]


def small_model(arch: str, seed: int = 0, **overrides: Any) -> StridefreeModel:
    """A float64 model with random weights and positive biases (ReLUs alive at zero input)."""
    torch.manual_seed(seed)
    model = build_model(arch, {**SMALL.get(arch, {}), **overrides}).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.uniform_(0.05, 0.5)
    return model


def cube_symmetries() -> list[tuple[tuple[int, ...], tuple[bool, ...]]]:
    """The 48 symmetries of the cube as (axis permutation, axis flips)."""
    perms = list(itertools.permutations(range(3)))
    flips = list(itertools.product((False, True), repeat=3))
    return [(p, f) for p in perms for f in flips]


def spatial(perm: tuple[int, ...], flips: tuple[bool, ...]) -> Transform:
    """Apply a cube symmetry to the last three axes of ``(N, C, Z, Y, X)``."""

    def apply(t: torch.Tensor) -> torch.Tensor:
        t = t.permute(0, 1, *(2 + a for a in perm))
        dims = [2 + i for i, f in enumerate(flips) if f]
        return t.flip(dims) if dims else t

    return apply


SYMMETRIES = cube_symmetries()


# ---------------------------------------------------------------- the contract, every arch


def test_registry_lists_the_family() -> None:
    assert {"dilated_resnet", "rotinv_dilated", "filterbank_mlp"} <= set(ARCHITECTURES)
    assert DEFAULT_ARCH == "dilated_resnet"
    for arch, cls in ARCHITECTURES.items():
        assert cls.arch == arch


@pytest.mark.parametrize("arch", ARCHS)
def test_output_shape_is_input_minus_twice_the_halo(arch: str) -> None:
    model = build_model(arch, {"in_channels": 2, "classes": 3}).eval()
    h = model.halo
    assert isinstance(h, int) and h >= 1
    x = torch.randn(2, 2, 2 * h + 3, 2 * h + 4, 2 * h + 5)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 3, 3, 4, 5)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_params_round_trip_rebuilds_the_same_model(arch: str, tmp_path: Path) -> None:
    model = small_model(arch, in_channels=2, classes=3).float()
    params = json.loads(json.dumps(model.params()))
    rebuilt = type(model)(**params)
    assert rebuilt.params() == model.params()
    assert rebuilt.halo == model.halo
    want = {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
    assert {k: (v.shape, v.dtype) for k, v in rebuilt.state_dict().items()} == want
    # weights travel as safetensors and load back strictly
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    rebuilt.load_state_dict(load_file(str(path)), strict=True)
    x = torch.randn(1, 2, *(2 * model.halo + 4,) * 3)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


@pytest.mark.parametrize("arch", ARCHS)
def test_impulse_response_stays_within_a_tight_halo(arch: str) -> None:
    model = small_model(arch)
    h = model.halo
    size = 4 * h + 3
    zero = torch.zeros(1, model.in_channels, size, size, size, dtype=torch.float64)
    impulse = zero.clone()
    c = size // 2
    impulse[0, 0, c, c, c] = 1.0
    with torch.no_grad():
        changed = (model(impulse) != model(zero)).any(dim=(0, 1))
    idx = torch.nonzero(changed)
    assert len(idx) > 0
    # output voxel o sits over input voxel o + h; Chebyshev distance to the impulse
    dist = (idx + h - c).abs().amax(dim=1)
    assert int(dist.max()) == h, f"response reaches {int(dist.max())} voxels, halo says {h}"
    # the whole cube of radius h reacts, corners included
    assert len(idx) == (2 * h + 1) ** 3


@pytest.mark.parametrize("arch", ARCHS)
def test_sub_crop_forward_is_exact_on_the_overlap(arch: str) -> None:
    model = small_model(arch)
    h = model.halo
    torch.manual_seed(1)
    x = torch.randn(1, model.in_channels, 2 * h + 14, 2 * h + 12, 2 * h + 13, dtype=torch.float64)
    offset, size = (3, 5, 2), (2 * h + 6, 2 * h + 5, 2 * h + 7)
    (oz, oy, ox), (sz, sy, sx) = offset, size
    crop = x[..., oz : oz + sz, oy : oy + sy, ox : ox + sx]
    with torch.no_grad():
        full, part = model(x), model(crop)
    assert part.shape[2:] == tuple(s - 2 * h for s in size)
    ref = full[..., oz : oz + sz - 2 * h, oy : oy + sy - 2 * h, ox : ox + sx - 2 * h]
    assert float((part - ref).abs().max()) <= 1e-10


@pytest.mark.parametrize("arch", ARCHS)
def test_only_parameters_are_trainable_and_state_is_small(arch: str) -> None:
    model = build_model(arch, {})
    params = dict(model.named_parameters())
    assert all(p.requires_grad for p in params.values())
    assert all(not b.requires_grad for b in model.buffers())
    assert set(model.state_dict()) == set(params), "persistent buffers would bloat the weights file"
    assert 100 < model.n_parameters() < 100_000
    assert 1_000 < model.flops_per_voxel() < 1_000_000


def test_default_parameter_counts_and_flops() -> None:
    dil, rot, fb = DilatedResNet(), RotInvDilatedNet(), FilterBankMLP()
    c, head, blocks = 16, 16, 4
    head_params = (c * head + head) + (head * 2 + 2)
    assert dil.n_parameters() == (27 * c + c) + blocks * (27 * c * c + c) + head_params
    assert rot.n_parameters() == (4 * c + c) + blocks * (4 * c * c + c) + head_params
    # same arithmetic per voxel: the tied kernel is gathered into a dense one
    assert rot.flops_per_voxel() == dil.flops_per_voxel()
    assert fb.n_features == 19
    assert fb.n_parameters() == (19 * 32 + 32) + (32 * 32 + 32) + (32 * 2 + 2)
    mlp_flops = 2 * (19 * 32 + 32 * 32 + 32 * 2)
    assert fb.radii == (3, 5, 11) and fb.halo == 11
    assert fb.flops_per_voxel() == mlp_flops + 19 * 2 * (7 + 11 + 23)


@pytest.mark.parametrize("arch", ["rotinv_dilated", "filterbank_mlp"])
def test_learnable_parameters_get_gradients(arch: str) -> None:
    model = build_model(arch, SMALL[arch])
    x = torch.randn(2, 1, *(2 * model.halo + 4,) * 3)
    model(x).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    ("arch", "params"),
    [
        ("rotinv_dilated", {"dilations": [1, 0]}),
        ("rotinv_dilated", {"channels": 0}),
        ("filterbank_mlp", {"sigmas": []}),
        ("filterbank_mlp", {"sigmas": [1.0, -0.5]}),
        ("filterbank_mlp", {"truncate": 0}),
        ("filterbank_mlp", {"layers": -1}),
        ("filterbank_mlp", {"halo": 4}),
    ],
)
def test_bad_parameters_are_refused(arch: str, params: dict[str, Any]) -> None:
    with pytest.raises(ModelError):
        build_model(arch, params)


# ---------------------------------------------------------------- rotinv_dilated


def test_cube_orbits_and_invariant_kernels() -> None:
    index = cube_orbit_index()
    assert torch.bincount(index.flatten()).tolist() == [1, 6, 12, 8]
    conv = InvariantConv3d(2, 3, dilation=2)
    assert conv.weight.shape == (3, 2, 4)
    kernel = conv.kernel().detach()
    assert kernel.shape == (3, 2, 3, 3, 3)
    for perm, flips in SYMMETRIES:
        assert torch.equal(spatial(perm, flips)(kernel), kernel)


def test_the_48_symmetries_are_distinct() -> None:
    x = torch.arange(2 * 3 * 4, dtype=torch.float64).reshape(1, 1, 2, 3, 4)
    seen = {tuple(spatial(p, f)(x).shape) + tuple(spatial(p, f)(x).flatten().tolist()) for p, f in SYMMETRIES}
    assert len(SYMMETRIES) == len(seen) == 48


def _equivariance_errors(model: StridefreeModel, x: torch.Tensor) -> list[float]:
    with torch.no_grad():
        y = model(x)
        errors = []
        for perm, flips in SYMMETRIES:
            g = spatial(perm, flips)
            errors.append(float((model(g(x)) - g(y)).abs().max()))
    return errors


def test_rotinv_is_equivariant_to_all_48_cube_symmetries() -> None:
    model = small_model("rotinv_dilated", in_channels=2, classes=3)
    torch.manual_seed(2)
    x = torch.randn(1, 2, 15, 17, 19, dtype=torch.float64)  # not a cube: catches axis mix-ups
    errors = _equivariance_errors(model, x)
    assert max(errors) <= 1e-10, errors


def test_equivariance_check_fails_for_an_untied_network() -> None:
    model = small_model("dilated_resnet", in_channels=2, classes=3)
    torch.manual_seed(2)
    x = torch.randn(1, 2, 15, 17, 19, dtype=torch.float64)
    errors = _equivariance_errors(model, x)
    assert errors[0] <= 1e-10  # identity
    assert min(errors[1:]) > 1e-6, "a random untied CNN should break every non-trivial symmetry"


# ---------------------------------------------------------------- filterbank_mlp


def test_gaussian_radius_and_taps() -> None:
    assert [gaussian_radius(s, 3.0) for s in (0.7, 1.6, 3.5, 1.0)] == [3, 5, 11, 3]
    assert gaussian_radius(0.1, 30.0) == 3  # 0.1 * 30 = 3.0000000000000004
    taps = gaussian_taps(1.6, 5)
    t = torch.arange(-5, 6, dtype=torch.float64)
    assert torch.allclose(taps[0].sum(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(taps[0], taps[0].flip(0)) and torch.allclose(taps[2], taps[2].flip(0))
    assert torch.allclose(taps[1], -taps[1].flip(0))
    assert torch.allclose((t * taps[1]).sum(), torch.tensor(1.0, dtype=torch.float64))
    assert abs(float(taps[2].sum())) < 1e-15
    assert torch.allclose((0.5 * t * t * taps[2]).sum(), torch.tensor(1.0, dtype=torch.float64))


def test_filterbank_smoothing_matches_scipy() -> None:
    model = FilterBankMLP(sigmas=(0.7, 1.6)).double()
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(20, 21, 22))
    feats = model.features(torch.from_numpy(vol)[None, None])
    h = model.halo
    inner = (slice(h, -h),) * 3
    assert torch.equal(feats[0, 0], torch.from_numpy(vol[inner]))  # raw input, centre-cropped
    for i, (sigma, radius) in enumerate(zip(model.sigmas, model.radii, strict=True)):
        ref = ndimage.gaussian_filter(vol, sigma, mode="constant", radius=radius)[inner]
        assert np.abs(feats[0, 1 + 6 * i].numpy() - ref).max() < 1e-12


def test_filterbank_derivatives_are_exact_on_quadratics() -> None:
    model = FilterBankMLP(sigmas=(0.7, 1.6)).double()
    hess = torch.tensor([[2.0, 0.5, -1.0], [0.5, -3.0, 0.25], [-1.0, 0.25, 1.5]], dtype=torch.float64)
    lin = torch.tensor([0.3, -0.2, 0.7], dtype=torch.float64)
    pos = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in (16, 17, 18)), indexing="ij"))
    pos = pos - 8.0
    vol = 0.5 * torch.einsum("izyx,ij,jzyx->zyx", pos, hess, pos) + torch.einsum("i,izyx->zyx", lin, pos)
    feats = model.features(vol[None, None])[0]
    h = model.halo
    p = pos[:, h:-h, h:-h, h:-h]
    grad = torch.einsum("ij,jzyx->izyx", hess, p) + lin[:, None, None, None]
    eig = torch.linalg.eigvalsh(hess)
    for i, sigma in enumerate(model.sigmas):
        base = 1 + 6 * i
        torch.testing.assert_close(feats[base + 1], sigma * grad.norm(dim=0), rtol=0, atol=1e-9)
        torch.testing.assert_close(feats[base + 2], sigma**2 * torch.full_like(feats[0], float(hess.trace())))
        for j in range(3):
            torch.testing.assert_close(feats[base + 3 + j], sigma**2 * torch.full_like(feats[0], float(eig[j])))


def test_closed_form_eigenvalues_match_eigvalsh() -> None:
    torch.manual_seed(3)
    a = torch.randn(5000, 3, 3, dtype=torch.float64)
    a = a + a.mT
    a[:10] = torch.diag_embed(torch.tensor([1.0, 1.0, -2.0], dtype=torch.float64)).expand(10, 3, 3)
    a[10:20] = 0.0
    a[20:30] = 3.0 * torch.eye(3, dtype=torch.float64)
    entries = [a[:, i, j].reshape(-1, 1, 1, 1, 1) for i, j in ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))]
    for dtype, tol in ((torch.float64, 1e-7), (torch.float32, 1e-5)):
        got = symmetric3_eigvals(*(e.to(dtype) for e in entries))
        assert got.dtype == dtype and got.shape == (5000, 3, 1, 1, 1)
        got = got.reshape(5000, 3).double()
        assert (got[:, 1:] >= got[:, :-1]).all()
        torch.testing.assert_close(got, torch.linalg.eigvalsh(a), rtol=0, atol=tol)


def test_filterbank_features_are_invariant_under_cube_symmetries() -> None:
    model = FilterBankMLP(sigmas=(0.7, 1.6)).double()
    torch.manual_seed(4)
    x = torch.randn(1, 1, 17, 19, 21, dtype=torch.float64)
    feats = model.features(x)
    assert feats.shape[1] == model.n_features == 13
    for perm, flips in SYMMETRIES:
        g = spatial(perm, flips)
        err = float((model.features(g(x)) - g(feats)).abs().max())
        assert err <= 1e-9, (perm, flips, err)
    # a 90 degree rotation written directly, and the whole model
    rot = torch.rot90(x, 1, dims=(3, 4))
    torch.testing.assert_close(model.features(rot), torch.rot90(feats, 1, dims=(3, 4)), rtol=0, atol=1e-9)
    net = small_model("filterbank_mlp")
    errors = _equivariance_errors(net, x)
    assert max(errors) <= 1e-9


def test_filterbank_halo_follows_sigmas_and_truncate() -> None:
    assert FilterBankMLP(sigmas=(1.0,), truncate=4.0).halo == 4
    assert FilterBankMLP(sigmas=(0.5, 2.2), truncate=2.0).halo == 5
    assert "halo" not in FilterBankMLP().params()
    assert math.isclose(FilterBankMLP().params()["truncate"], 3.0)
