"""bench/gpu_check.py's CPU smoke path: exactness rows and a throughput row, one table."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_cpu_smoke(capsys):
    gpu_check = _gpu_check()
    try:
        rc = gpu_check.main(["--device", "cpu", "--size", "32", "--params", '{"channels": 4, "dilations": [1, 2]}'])
    finally:
        torch.use_deterministic_algorithms(False)
    out = capsys.readouterr().out
    assert rc == 0, out
    line = next(x for x in out.splitlines() if x.startswith("GPU_CHECK_JSON "))
    rows = json.loads(line.removeprefix("GPU_CHECK_JSON "))["rows"]
    exact = [r for r in rows if r[0].startswith("exact fp32")]
    assert [r[2] for r in exact] == [10, 16]
    assert all(r[-1].startswith("PASS: 0 labels differ") for r in exact), exact
    (seg,) = [r for r in rows if r[0] == "segment fp32"]
    assert seg[1] == "32^3" and float(seg[5]) > 0 and seg[-1].startswith("1 blocks")
    assert "check" in out and "GPU peak" in out and "total " in out


def test_gpu_check_says_when_there_is_no_gpu(capsys):
    if torch.cuda.is_available():  # pragma: no cover
        return
    assert _gpu_check().main(["--device", "cuda", "--size", "32"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
