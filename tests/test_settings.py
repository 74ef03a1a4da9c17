"""Run profiles and site profiles: one pydantic model, one-line errors naming file and key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import ROOT

from pipeline.compute.cluster import ClusterSpec
from pipeline.core.errors import ConfigError
from pipeline.core.settings import (
    ClusterOptions,
    RunConfig,
    SegmentOptions,
    load_run_config,
    parse_run_config,
    scan_name_for,
)
from pipeline.io.sources import HDF5_SUFFIXES, open_source, split_source


def _profile(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "x.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("suffix", HDF5_SUFFIXES)
def test_a_profile_accepts_every_hdf5_source_that_ingest_reads(tmp_path, suffix):
    data = tmp_path / f"scan{suffix}"
    with h5py.File(data, "w") as f:
        f["data"] = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert open_source(f"{data}:/data").shape == (2, 3, 4)  # what `studios ingest x.cxi:/data` opens
    text = f"source: {data}:/data\noutput: {tmp_path / 'out'}\nmodel: {{init: {{}}}}\n"
    cfg = load_run_config(_profile(tmp_path, text))
    assert cfg.source == f"{data}:/data" and cfg.scan_name == "scan"
    assert split_source(cfg.source) == (str(data), "/data")


def test_a_missing_hdf5_file_is_named(tmp_path):
    path = _profile(tmp_path, f"source: {tmp_path}/no.cxi:/data\noutput: {tmp_path / 'o'}\nmodel: {{init: {{}}}}\n")
    with pytest.raises(ConfigError, match=r"x\.yaml: source: .*no\.cxi does not exist"):
        load_run_config(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("segment: {block: a}", "x.yaml: segment.block: expected an integer, got 'a'"),
        ("segment: {block: [1, 2]}", "x.yaml: segment.block: expected 3 values, got 2"),
        ("segment: {blok: 8}", "x.yaml: segment: unknown key(s) blok; allowed: block, chunks, probabilities"),
        ("segment: {exact: 'yes'}", "x.yaml: segment.exact: expected true/false, got 'yes'"),
        ("segment: {retries: -1}", "x.yaml: segment.retries: must be >= 0, got -1"),
        ("ingest: {chunks: [64, 64, '64']}", "x.yaml: ingest.chunks[2]: expected an integer, got '64'"),
        ("ingest: {nonfinite: nan}", "x.yaml: ingest.nonfinite: 'nan' is unknown; use one of error, zero"),
        ("ingest: 5", "x.yaml: ingest: expected a mapping of keys, got 5"),
        ("cluster: {kind: moon}", "x.yaml: cluster.kind: 'moon' is unknown; use one of local, address, slurm"),
        ("cluster: {kind: serial, workerz: 2}", "x.yaml: cluster: unknown key(s) workerz; allowed: kind, workers"),
        ("cluster: {kind: slurm, slurm: {cores: 'x'}}", "x.yaml: cluster.slurm.cores: expected an integer, got 'x'"),
        ("cluster: {kind: slurm, adapt: [1, 2, 3]}", "x.yaml: cluster.adapt: expected 2 values, got 3"),
        ("model: {train: {epochs: 2}}", "x.yaml: model.train: missing required key 'annotations'"),
        ("watch: {incoming: /tmp, interval: 0}", "x.yaml: watch.interval: must be > 0, got 0"),
        ("watch: {incoming: /tmp, interval: 5, cron: '* * * * *'}", "x.yaml: watch: give interval or cron, not both"),
        ("sauce: a.tif", "x.yaml: unknown key(s) sauce; allowed: source, output, name"),
        ("overwrite: 1", "x.yaml: overwrite: expected true/false, got 1"),
    ],
)
def test_errors_are_one_line_naming_file_and_key(tmp_path, text, message):
    path = _profile(tmp_path, "model: {init: {}}\n" + text + "\n" if not text.startswith("model") else text + "\n")
    with pytest.raises(ConfigError) as info:
        load_run_config(path, require_source=False, check_files=False)
    text_ = str(info.value)
    assert "\n" not in text_
    assert text_.startswith(str(tmp_path / message.split(":", 1)[0]) + ":"), text_
    assert message.split(": ", 1)[1] in text_, text_


def test_cluster_section_is_parsed_once_into_a_kept_spec():
    opts = ClusterOptions.parse({"kind": "slurm", "workers": 3, "slurm": {"cores": 4}}, "x.yaml: cluster")
    spec = opts.spec()
    assert isinstance(spec, ClusterSpec) and spec is opts.cluster_spec and spec is opts.spec()
    assert spec.workers == 3 and spec.slurm.cores == 4 and spec.torch_threads() == 4
    assert opts.to_json() == {"workers": 3, "slurm": {"cores": 4}, "kind": "slurm"}
    serial = ClusterOptions.parse({"kind": "serial", "workers": 2}, "p")
    assert serial.spec() is None and serial.cluster_spec.kind == "local" and serial.to_json()["kind"] == "serial"


def test_objects_are_frozen_and_parameters_round_trip(tmp_path):
    demo = load_run_config(ROOT / "configs" / "demo.yaml", overrides={"output": str(tmp_path / "o")})
    with pytest.raises(Exception, match="frozen"):
        demo.segment.block = 3  # type: ignore[misc]
    params = demo.to_parameters()
    again = parse_run_config(params, "process_scan parameters")
    assert again == demo and isinstance(again, RunConfig)


def test_built_in_code_bad_values_are_config_errors():
    with pytest.raises(ConfigError, match=r"^segment\.block: expected an integer, got 'x'$"):
        SegmentOptions(block="x")
    with pytest.raises(ConfigError, match=r"^cluster\.workers: must be >= 1, got 0$"):
        ClusterSpec(workers=0)


def test_scan_names():
    assert scan_name_for("/d/scan_01.ome.tiff") == "scan_01"
    assert scan_name_for("/d/run.cxi:/entry/data") == "run"
    assert scan_name_for("bundled:cement_128x128x128.tif") == "cement_128x128x128"
    assert scan_name_for("/d/slices/") == "slices"


def test_settings_import_without_torch_zarr_dask_or_prefect():
    code = ("import sys, pipeline.core.settings, pipeline.compute.cluster; "
            "print(sorted(m for m in ('torch', 'zarr', 'dask', 'distributed', 'prefect') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_jobqueue_yaml_is_read_as_typed_site_defaults():
    import dask
    import yaml

    from pipeline.compute.slurm import jobqueue_defaults

    site = yaml.safe_load((ROOT / "deploy" / "slurm" / "jobqueue.yaml").read_text())
    with dask.config.set(site):
        defaults = jobqueue_defaults()
        assert defaults.cores == 8 and defaults.processes == 1 and defaults.memory == "32GB"
        spec = ClusterSpec(kind="slurm", workers=2)  # nothing in the profile: the site decides
        assert spec.slurm_cores() == 8 and spec.torch_threads() == 8
    with dask.config.set({"jobqueue.slurm.cores": "eight"}), pytest.raises(
            ConfigError, match=r"^dask config jobqueue\.slurm\.cores: expected an integer, got 'eight'$"):
        jobqueue_defaults()
