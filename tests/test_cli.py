"""The studios command: help for every subcommand, one-line errors, and a real end-to-end run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import CEMENT, ROOT

STUDIOS = [sys.executable, "-m", "pipeline.cli"]
ENV = {**os.environ, "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def studios(*args: str | Path, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*STUDIOS, *map(str, args)], capture_output=True, text=True, cwd=cwd or ROOT, env=ENV,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"studios {args} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def _subcommands() -> list[list[str]]:
    from pipeline.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    out = [[name] for name in sub.choices]  # type: ignore[union-attr]
    return out + [["model", "init"], ["model", "info"], ["model", "list"]]


@pytest.mark.parametrize("cmd", _subcommands(), ids=lambda c: " ".join(c))
def test_every_subcommand_has_help(cmd, capsys):
    from pipeline.cli.main import main

    with pytest.raises(SystemExit) as info:
        main([*cmd, "--help"])
    assert info.value.code == 0
    assert "usage: studios" in capsys.readouterr().out


def test_entry_point_lists_all_subcommands():
    proc = studios("--help")
    for name in ("ingest", "model", "segment", "demo", "train", "qc", "run", "serve", "deploy", "dashboard"):
        assert name in proc.stdout


def test_core_subcommands_exist():
    names = {c[0] for c in _subcommands()}
    assert {"ingest", "model", "segment", "demo"} <= names


def _assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("studios: error:")
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_errors_are_one_line_and_debug_shows_traceback(tmp_path):
    proc = studios("ingest", tmp_path / "missing", tmp_path / "o.zarr", check=False)
    _assert_one_line_error(proc, "missing", "does not exist")
    assert proc.returncode == 2
    proc = studios("--debug", "ingest", tmp_path / "missing", tmp_path / "o.zarr", check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    proc = studios("model", "init", tmp_path / "m", "--params", "{oops", check=False)
    _assert_one_line_error(proc, "--params is not valid JSON")
    proc = studios("segment", tmp_path / "no.zarr", tmp_path / "m", tmp_path / "s.zarr", check=False)
    _assert_one_line_error(proc, "no.zarr")


def test_end_to_end_real_tomogram_block_sizes_identical(tmp_path):
    """Ingest a real tomogram, segment at two block sizes and as one block: identical labels."""
    studios("ingest", CEMENT, tmp_path / "scan.zarr", "--voxel-size", "2", "2", "2")
    proc = studios("model", "init", tmp_path / "model", "--classes", "void", "cement", "--params",
                   '{"channels": 4, "dilations": [1, 2]}', "--seed", "3")
    assert "halo" in proc.stdout
    info = studios("model", "info", tmp_path / "model").stdout
    assert '"arch": "dilated_resnet"' in info and "flops_per_voxel" in info
    outs = []
    for block in ("32", "64", "128"):
        out = tmp_path / f"seg{block}.zarr"
        extra = ["--cluster", "serial"] if block != "64" else ["--workers", "1", "--threads-per-worker", "2"]
        extra += ["--no-qc"] if block != "128" else []
        proc = studios("segment", tmp_path / "scan.zarr", tmp_path / "model", out, "--block", block, "--exact", *extra)
        assert "wrote" in proc.stdout and "blocks" in proc.stdout
        group = zarr.open_group(str(out), mode="r")
        outs.append(np.asarray(group["0"][...]))
        ms = group.attrs["ome"]["multiscales"][0]
        assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [2.0, 2.0, 2.0]
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])
    proc = studios("segment", tmp_path / "scan.zarr", tmp_path / "model", tmp_path / "seg32.zarr", check=False)
    _assert_one_line_error(proc, "already holds a finished segmentation", "--overwrite")
    proc = studios("segment", tmp_path / "scan.zarr", tmp_path / "model", tmp_path / "x.zarr", "--block", "48",
                   "--chunks", "32", "32", "32", check=False)
    _assert_one_line_error(proc, "does not align", "multiple of")


def test_demo_runs_from_any_directory(tmp_path):
    proc = studios("demo", "--output", tmp_path / "demo", "--epochs", "1", cwd=tmp_path)
    assert "studios demo finished" in proc.stdout
    assert (tmp_path / "demo" / "summary.json").exists()
    assert zarr.open_group(str(tmp_path / "demo" / "seg.zarr"), mode="r").attrs["studios"]["complete"] is True


def _plugin(tmp_path: Path, module: str, code: str) -> dict[str, str]:
    """A package installed on PYTHONPATH (module + dist-info) that registers ``module`` in studios.commands."""
    (tmp_path / f"{module}.py").write_text(code)
    info = tmp_path / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[studios.commands]\n{module} = {module}\n")
    return {**ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}


def test_subcommands_from_the_entry_point_group(tmp_path):
    env = _plugin(tmp_path, "studios_hello_plugin", (
        "from pipeline.cli.main import command\n\n"
        "@command('hello')\n"
        "def _parser(sub):\n"
        "    p = sub.add_parser('hello', help='say hello')\n"
        "    p.set_defaults(handler=lambda args: print('hello from a plugin') or 0)\n"))
    proc = subprocess.run([*STUDIOS, "hello"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "hello from a plugin", proc.stderr
    proc = subprocess.run([*STUDIOS, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert "hello" in proc.stdout and "run" in proc.stdout  # flows.cli comes in the same way


@pytest.mark.parametrize("code", [
    "raise ImportError('needs a package that is not installed')\n",
    "from pipeline.cli.main import command\n\n@command('bad')\ndef _p(sub):\n    raise RuntimeError('broken parser')\n",
], ids=["import-fails", "parser-fails"])
def test_a_broken_plugin_does_not_break_the_built_in_commands(tmp_path, code):
    env = _plugin(tmp_path, "studios_broken_plugin", code)
    proc = subprocess.run([*STUDIOS, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("ingest", "model", "segment", "train", "qc", "demo"):
        assert name in proc.stdout
    warnings = proc.stderr.strip().splitlines()
    assert len(warnings) == 1 and "studios_broken_plugin" in warnings[0], proc.stderr
    assert "bad" not in proc.stdout.split("positional arguments")[1].split()
    proc = subprocess.run([*STUDIOS, "model", "list"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "dilated" in proc.stdout


def test_python_dash_m_and_the_console_script_agree():
    script = Path(sys.executable).parent / "studios"
    if not script.exists():  # pragma: no cover - not an installed environment
        pytest.skip("no studios console script next to this Python")
    env = {**ENV, "PYTHONPATH": str(ROOT)}
    via_m = subprocess.run([*STUDIOS, "--help"], capture_output=True, text=True, env=env, timeout=120)
    via_script = subprocess.run([str(script), "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert via_m.returncode == via_script.returncode == 0
    assert via_m.stdout == via_script.stdout and "segment" in via_m.stdout
