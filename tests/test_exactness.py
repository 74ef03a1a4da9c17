"""The central invariant: blockwise output equals the whole-volume output.

Odd volume shapes, block shapes that do not divide them, identity / position-encoding /
real dilated networks, the serial executor and a real Dask LocalCluster. With ``exact=True``
(oneDNN off) the equality is bit-for-bit; with the default kernels, probabilities agree within
float rounding and labels agree except where the reference's top-two margin is below it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from conftest import CEMENT, make_scan, position_volume

from pipeline.compute.cluster import ClusterSpec
from pipeline.compute.executors import SerialExecutor
from pipeline.io.bundle import from_model, init_bundle, save_bundle
from pipeline.io.store import open_image
from pipeline.models import ARCHITECTURES, StridefreeModel, register
from pipeline.segment.predict import predict_volume, to_labels, top2_margin
from pipeline.segment.run import segment

SHAPE = (37, 41, 43)
TOL = 1e-5


class IdentityNet(StridefreeModel):
    """Halo 0: logits = (x, -x)."""

    arch = "test_identity"

    def __init__(self, *, in_channels: int = 1, classes: int = 2) -> None:
        super().__init__(in_channels=in_channels, classes=classes)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    @property
    def halo(self) -> int:
        return 0

    def params(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "classes": self.classes}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, -x], dim=1) + self.dummy


register(IdentityNet)


def _probabilities(path: Path) -> np.ndarray:
    return np.asarray(zarr.open_group(str(path), mode="r")["probabilities/0"][...]).astype(np.float32) / 255


def _labels(path: Path) -> np.ndarray:
    return np.asarray(open_image(path, kind="segmentation").array[...])


def _reference(bundle, scan: Path, *, exact: bool) -> np.ndarray:
    image = open_image(scan)
    offset, scale = bundle.normalization.affine(image.stats)
    return predict_volume(bundle.build(), np.asarray(image.array[...]), offset=offset, scale=scale, exact=exact)


def _check(reference: np.ndarray, labels: np.ndarray, *, exact: bool) -> None:
    ref_labels = to_labels(reference)
    if exact:
        assert np.array_equal(ref_labels, labels)
    else:
        differ = ref_labels != labels
        assert not (differ & (top2_margin(reference) > TOL)).any()
        assert differ.mean() < 1e-4


def _run(scan, bundle, out, block, *, exact, executor=None, cluster=None, probabilities=False):
    return segment(
        scan, bundle, out, block=block, chunks=block, exact=exact,
        executor=executor if cluster is None else None, cluster=cluster, probabilities=probabilities,
    )


@pytest.mark.parametrize("block", [(10, 12, 14), (16, 16, 16), (37, 41, 43), (64, 64, 64)])
def test_identity_model_blockwise_equals_whole(tmp_path, rng, block):
    volume = rng.normal(100, 20, SHAPE).astype(np.float32)
    scan = make_scan(tmp_path, volume)
    bundle = init_bundle(arch="test_identity", classes=("a", "b"))
    _run(scan, bundle, tmp_path / "seg.zarr", block, exact=True, executor=SerialExecutor())
    _check(_reference(bundle, scan, exact=True), _labels(tmp_path / "seg.zarr"), exact=True)


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("block", [(10, 12, 14), (13, 7, 20)])
def test_position_encoding_input_with_dilated_net(tmp_path, block, exact):
    """Each voxel's value is its position: any shifted or misplaced read changes the output."""
    volume = position_volume(SHAPE)
    scan = make_scan(tmp_path, volume)
    bundle = init_bundle(classes=("a", "b", "c"), params={"channels": 6, "dilations": [1, 2, 3], "head": 8}, seed=3)
    out = tmp_path / "seg.zarr"
    _run(scan, bundle, out, block, exact=exact, executor=SerialExecutor(), probabilities=True)
    ref = _reference(bundle, scan, exact=exact)
    _check(ref, _labels(out), exact=exact)
    # uint8-quantised probabilities: one quantisation step at most
    assert np.abs(_probabilities(out) - ref).max() <= 1 / 255 + 1e-6


def test_dilated_net_float_probabilities_exact_and_rounding(rng):
    """In memory: blockwise float probabilities vs whole-volume (bit-identical when exact)."""
    from pipeline.core.tiling import plan_blocks
    from pipeline.io.store import read_padded
    from pipeline.segment.predict import forward, numerics

    torch.manual_seed(0)
    model = ARCHITECTURES["dilated_resnet"](classes=3, channels=8, dilations=(1, 2, 4, 1)).eval()
    volume = rng.normal(0, 1, SHAPE).astype(np.float32)
    for exact, tol in ((True, 0.0), (False, 1e-5)):
        ref = predict_volume(model, volume, offset=0.0, scale=1.0, exact=exact)
        out = np.zeros_like(ref)
        with numerics(exact=exact):
            for b in plan_blocks(SHAPE, (11, 9, 17), model.halo):
                out[(slice(None), *b.write.to_slices())] = forward(model, read_padded(volume, b, SHAPE), offset=0.0, scale=1.0)
        assert np.abs(out - ref).max() <= tol


def test_real_tomogram_three_block_sizes_identical_on_dask(tmp_path, dask_address):
    """The issue's check: a real scan, two block sizes and one block, on a LocalCluster."""
    from pipeline.ingest.run import ingest

    scan = tmp_path / "scan.zarr"
    ingest(CEMENT, scan)
    bundle = init_bundle(classes=("void", "cement"), seed=7, params={"channels": 4, "dilations": [1, 2, 1]})
    model_dir = save_bundle(bundle, tmp_path / "model")
    spec = ClusterSpec(kind="address", address=dask_address)
    outs = []
    for block in (32, 64, 128):
        out = tmp_path / f"seg{block}.zarr"
        segment(scan, model_dir, out, block=block, cluster=spec, exact=True, qc=block == 128)
        outs.append(_labels(out))
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])
    _check(_reference(bundle, scan, exact=True), outs[0], exact=True)


def test_impulse_response_stays_inside_declared_halo(tmp_path):
    """One bright voxel in a zero volume changes outputs only within the halo, and up to it."""
    torch.manual_seed(1)
    model = ARCHITECTURES["dilated_resnet"](classes=2, channels=4, dilations=(1, 2, 3)).double().eval()
    h = model.halo
    n = 2 * h + 9
    base = torch.zeros((1, 1, n + 2 * h, n + 2 * h, n + 2 * h), dtype=torch.float64)
    hit = base.clone()
    c = n // 2 + h
    hit[0, 0, c, c, c] = 1000.0
    with torch.inference_mode():
        diff = (model(hit) - model(base)).abs().amax(dim=1)[0]
    changed = np.argwhere(diff.numpy() > 0)
    centre = np.array([n // 2] * 3)
    dist = np.abs(changed - centre).max(axis=1)
    assert dist.max() == h  # tight: the receptive field reaches exactly the halo
    assert (dist <= h).all()


def test_bundle_in_memory_and_saved_give_same_result(tmp_path, rng):
    volume = rng.integers(0, 255, (20, 21, 22)).astype(np.uint8)
    scan = make_scan(tmp_path, volume)
    torch.manual_seed(5)
    model = ARCHITECTURES["dilated_resnet"](classes=2, channels=4, dilations=(1, 2)).eval()
    bundle = from_model(model, classes=("a", "b"))
    segment(scan, bundle, tmp_path / "a.zarr", block=16, chunks=(16, 16, 16), executor=SerialExecutor(), exact=True)
    segment(scan, save_bundle(bundle, tmp_path / "m"), tmp_path / "b.zarr", block=8, chunks=(8, 8, 8),
            executor=SerialExecutor(), exact=True)
    assert np.array_equal(_labels(tmp_path / "a.zarr"), _labels(tmp_path / "b.zarr"))


def test_mkl_code_path_is_pinned_unless_the_user_chose_one(tmp_path):
    """``import pipeline`` pins MKL's code path (exact mode's GEMMs); a user's MKL_CBWR wins."""
    import os
    import subprocess
    import sys

    from pipeline.core.blas import cpu_flags, mkl_code_path, pin_mkl_code_path

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx fma avx2\n")
    assert cpu_flags(info) >= {"avx2", "fma"} and mkl_code_path(cpu_flags(info)) == "AVX2"
    assert mkl_code_path(frozenset({"avx2", "avx512f"})) == "AVX512" and mkl_code_path(frozenset({"sse2"})) is None
    env: dict[str, str] = {}
    assert pin_mkl_code_path(env, info) == "AVX2" and env == {"MKL_CBWR": "AVX2"}
    env = {"MKL_CBWR": "COMPATIBLE"}
    assert pin_mkl_code_path(env, info) == "COMPATIBLE" and env == {"MKL_CBWR": "COMPATIBLE"}
    assert cpu_flags(tmp_path / "missing") == frozenset()
    code = "import os, pipeline; print(os.environ.get('MKL_CBWR'))"
    clean = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    seen = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, check=True)
    assert seen.stdout.strip() == str(mkl_code_path(cpu_flags()))
    mine = subprocess.run([sys.executable, "-c", code], env={**clean, "MKL_CBWR": "AVX"}, capture_output=True,
                          text=True, check=True)
    assert mine.stdout.strip() == "AVX"
