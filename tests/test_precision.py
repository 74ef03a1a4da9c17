"""Precision resolution (``auto``), the CPU bf16 fast path and the one-pass block post-processing."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from pipeline.core.errors import ConfigError, InputError
from pipeline.models.registry import ARCHITECTURES
from pipeline.segment import precision
from pipeline.segment.ledger import CONF_BINS
from pipeline.segment.post import _post_torch, post_block
from pipeline.segment.precision import resolve_precision
from pipeline.segment.predict import (
    _CHANNELS_LAST,
    forward,
    forward_logits,
    numerics,
    quantize,
    softmax_channels,
    softmax_classes_last,
    to_labels,
)
from pipeline.segment.worker import block_stats


def _model(classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return ARCHITECTURES["dilated_resnet"](classes=classes, channels=8, dilations=(1, 2, 1)).eval()


def test_auto_resolves_from_the_bf16_unit_and_exact_forces_fp32(monkeypatch):
    monkeypatch.setattr(precision, "bf16_unit", lambda: "amx_bf16")
    assert resolve_precision("auto", "cpu") == "bf16"
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"
    assert resolve_precision("auto", "cuda:0") == "fp32"  # GPUs: low precision stays opt-in
    assert resolve_precision("auto", "cpu", exact=True) == "fp32"
    assert resolve_precision("fp32", "cpu") == "fp32"
    monkeypatch.setattr(precision, "bf16_unit", lambda: None)
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"  # explicit wins
    with pytest.raises(InputError, match="exact=True needs precision fp32"):
        resolve_precision("bf16", "cpu", exact=True)
    with pytest.raises(ConfigError, match="unknown"):
        resolve_precision("fp8", "cpu")


def test_bf16_unit_reads_cpu_flags(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512_bf16 amx_tile\n")
    assert "avx512_bf16" in precision._cpuinfo_flags(str(info))
    assert precision._cpuinfo_flags(str(tmp_path / "missing")) == frozenset()
    facts = precision.cpu_facts()
    assert set(facts) == {"torch_cpu_capability", "bf16_unit"}


def test_segment_records_the_resolved_precision(tmp_path, monkeypatch, caplog):
    import zarr
    from conftest import make_scan

    from pipeline.compute.executors import SerialExecutor
    from pipeline.io.bundle import init_bundle
    from pipeline.segment.run import segment

    volume = np.random.default_rng(0).integers(0, 255, (20, 20, 20), dtype=np.uint8)
    scan = make_scan(tmp_path, volume)
    bundle = init_bundle(classes=("a", "b"), params={"channels": 4, "dilations": [1]}, seed=0)

    with caplog.at_level(logging.WARNING, logger="pipeline.segment.run"):
        segment(scan, bundle, tmp_path / "auto.zarr", executor=SerialExecutor(), qc=False, exact=True, precision="auto")
    assert "precision auto with exact: running fp32" in caplog.text
    ledger = dict(zarr.open_group(str(tmp_path / "auto.zarr"), mode="r").attrs["studios"]["ledger"])
    assert ledger["precision"] == "fp32" and ledger["exact"] is True
    monkeypatch.setattr(precision, "bf16_unit", lambda: "amx_bf16")
    segment(scan, bundle, tmp_path / "fp32.zarr", executor=SerialExecutor(), qc=False, block=20)  # the default
    ledger = dict(zarr.open_group(str(tmp_path / "fp32.zarr"), mode="r").attrs["studios"]["ledger"])
    assert ledger["precision"] == "fp32"
    segment(scan, bundle, tmp_path / "bf16.zarr", executor=SerialExecutor(), qc=False, block=20, precision="auto")
    ledger = dict(zarr.open_group(str(tmp_path / "bf16.zarr"), mode="r").attrs["studios"]["ledger"])
    assert ledger["precision"] == "bf16"


def test_bf16_cpu_path_is_channels_last_bf16_converted_once():
    model = _model()
    raw = np.random.default_rng(1).normal(0, 1, (30, 30, 30)).astype(np.float32)
    with numerics(exact=False):
        a = forward_logits(model, raw, offset=0.0, scale=1.0, precision="bf16")
        fast = _CHANNELS_LAST[model][torch.bfloat16][1]
        b = forward_logits(model, raw, offset=0.0, scale=1.0, precision="bf16")
        assert _CHANNELS_LAST[model][torch.bfloat16][1] is fast  # weights converted once
        ref = forward_logits(model, raw, offset=0.0, scale=1.0)
    assert all(p.dtype == torch.bfloat16 for p in fast.parameters())
    assert fast.blocks[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert a.dtype == torch.float32 and torch.equal(a, b)
    diff = (a - ref).abs().max().item()
    assert 0 < diff < 0.1  # bf16, not fp32, and close to it


def test_post_block_equals_the_numpy_reference():
    model = _model()
    raw = np.random.default_rng(2).normal(0, 1, (34, 31, 29)).astype(np.float32)
    with numerics(exact=False):
        logits = forward_logits(model, raw, offset=0.0, scale=1.0)
        probs = forward(model, raw, offset=0.0, scale=1.0)
    np.testing.assert_array_equal(softmax_channels(logits)[0].numpy(), probs)
    post = post_block(logits, probabilities=True)
    labels = to_labels(probs)
    assert post.confidence.tolist() == block_stats(raw[5:-5, 5:-5, 5:-5], probs, labels, 3).confidence.tolist()
    np.testing.assert_array_equal(post.labels, labels)  # bit for bit, ties included
    np.testing.assert_array_equal(post.probabilities, quantize(probs))
    ref = block_stats(raw[5:-5, 5:-5, 5:-5], probs, labels, 3)
    assert post.confidence.shape == (CONF_BINS,) and post.confidence.sum() == labels.size
    assert np.abs(post.confidence - ref.confidence).sum() <= 2  # bin edges: float32 vs float64
    assert post.entropy_sum == pytest.approx(ref.entropy_sum, rel=1e-5)
    assert post_block(logits).probabilities is None
    on_device = _post_torch(softmax_classes_last(logits)[0], True)  # the GPU branch, run on the CPU
    np.testing.assert_array_equal(on_device.labels, labels)
    np.testing.assert_array_equal(on_device.probabilities, quantize(probs))
    assert np.abs(on_device.confidence - post.confidence).sum() <= 2
    assert on_device.entropy_sum == pytest.approx(ref.entropy_sum, rel=1e-5)
    with pytest.raises(ValueError, match="post_block takes"):
        post_block(logits[0])


@pytest.mark.parametrize("branch", ["cpu", "torch"])
def test_post_block_ties_take_the_first_class_like_argmax(branch):
    logits = torch.zeros(1, 3, 2, 2, 2)
    logits[0, 2, 0, 0, 0] = 1.0
    if branch == "cpu":
        post = post_block(logits, probabilities=True)
    else:
        post = _post_torch(softmax_classes_last(logits)[0], True)
    assert post.labels[0, 0, 0] == 3 and (post.labels.reshape(-1)[1:] == 1).all()
    assert post.confidence[3] == 7 and post.confidence[5] == 1  # 1/3 and e/(e+2) = 0.576
    assert post.entropy_sum == pytest.approx(7 * np.log(3) + float(torch.special.entr(torch.softmax(
        torch.tensor([0.0, 0.0, 1.0]), 0)).sum()), rel=1e-6)
