"""Cluster specs without a real SLURM or GPU: site-profile parsing, SLURMCluster arguments,
the GPU code path up to the device choice (clear errors without dask-cuda or a GPU, the GPU
resource, the default device), block size from free GPU memory, and mixed precision."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from conftest import CEMENT, ROOT, make_scan

from pipeline.compute import cluster as cl
from pipeline.compute import cuda, hosts, slurm
from pipeline.compute.cluster import ClusterSpec, cluster_spec_from_file
from pipeline.compute.executors import DaskExecutor, RunOutcome
from pipeline.core.errors import ClusterError, ConfigError, InputError
from pipeline.core.tiling import choose_block
from pipeline.io.bundle import init_bundle, save_bundle
from pipeline.models.footprint import activation_bytes_per_voxel, model_widths
from pipeline.segment.plan import auto_block
from pipeline.segment.predict import forward, numerics, to_labels
from pipeline.segment.run import segment

SMALL = {"channels": 4, "dilations": [1, 2], "head": 4}
STUDIOS = [sys.executable, "-m", "pipeline.cli"]
CHUNKS = (128, 128, 128)


@pytest.fixture
def scan_and_model(tmp_path, rng):
    scan = make_scan(tmp_path, rng.integers(0, 200, (20, 24, 28)).astype(np.uint8))
    model = save_bundle(init_bundle(classes=("a", "b"), params=SMALL, seed=1), tmp_path / "model")
    return scan, model


def _one_line(proc: subprocess.CompletedProcess[str], *fragments: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("studios: error:") and "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


# --- site profile parsing ----------------------------------------------------------------------


def test_slurm_site_profile_parses():
    spec = cluster_spec_from_file(ROOT / "configs" / "slurm-site.yaml")
    assert spec.kind == "slurm" and spec.workers == 8 and spec.adapt is None and spec.gpus_per_job == 0
    assert spec.slurm.partition == "compute" and spec.slurm.cores == 8
    assert spec.torch_threads() == 8
    assert spec.resources is None and spec.device == "cpu"
    # the command line overrides kind and workers
    assert cluster_spec_from_file(ROOT / "configs" / "slurm-site.yaml", workers=3).workers == 3


def _profile(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "site.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("cluster: {kind: slurm, slurm: {cores: 1, memroy: 1GB}}", ["unknown key 'memroy'", "did you mean 'memory'"]),
        ("cluster: {kind: slurm, slurm: {job_extra: ['--gres=gpu:1']}}", ["'job_extra'", "job_extra_directives"]),
        ("cluster: {kind: slurm, slurm: {host: 10.0.0.1}}", ["'host'", "scheduler_options"]),
        ("cluster: {kind: slurm, slurm: {cores: '8'}}", ["cluster.slurm.cores", "expected an integer"]),
        ("cluster: {kind: slurm, slurm: {cores: 0}}", ["cluster.slurm.cores", ">= 1"]),
        ("cluster: {kind: slurm, slurm: {memory: lots}}", ["cluster.slurm.memory", "not a size"]),
        ("cluster: {kind: slurm, slurm: {walltime: 2h}}", ["walltime", "02:00:00"]),
        ("cluster: {kind: slurm, slurm: {job_extra_directives: --gres=gpu:1}}", ["job_extra_directives", "list"]),
        ("cluster: {kind: slurm, slurm: {queue: a, partition: b}}", ["not both"]),
        ("cluster: {kind: slurm, slurm: [cores]}", ["cluster.slurm", "mapping"]),
        ("cluster: {kind: slurm, worker: 2}", ["unknown key(s) worker"]),
        ("cluster: {kind: slurm, adapt: [4, 2]}", ["cluster.adapt"]),
        ("cluster: {kind: slurm, adapt: [1, 2, 3]}", ["adapt", "2 values"]),
        ("cluster: {kind: slurm, gpus_per_job: 2}", ["gpus_per_job", "one GPU per job"]),
        ("cluster: {kind: slurm, gpus_per_job: 1, slurm: {processes: 2}}", ["processes: 1"]),
        ("cluster: {kind: slurm, wait_timeout: 0}", ["wait_timeout"]),
        ("cluster: {kind: pbs}", ["'pbs' is unknown"]),
    ],
)
def test_bad_profiles_are_config_errors_naming_the_file(tmp_path, text, fragments):
    path = _profile(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        cluster_spec_from_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}:") and "\n" not in message
    for f in fragments:
        assert f in message


def test_nulls_mean_dask_jobqueue_defaults(tmp_path):
    spec = cluster_spec_from_file(_profile(tmp_path, "cluster: {kind: slurm, slurm: {account: null, interface: null}}"))
    assert spec.slurm.kwargs() == {"account": None, "interface": None}


def test_cli_bad_profile_is_one_line(tmp_path, scan_and_model):
    scan, model = scan_and_model
    path = _profile(tmp_path, "cluster: {kind: slurm, slurm: {cores: 1, memroy: 1GB}}")
    proc = subprocess.run([*STUDIOS, "segment", scan, model, tmp_path / "o.zarr", "--cluster", "slurm",
                           "--cluster-config", path], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    _one_line(proc, "memroy", str(path))
    assert not (tmp_path / "o.zarr").exists()


# --- SLURMCluster arguments and sizes ---------------------------------------------------------------


def test_slurm_kwargs_book_cores_and_run_threads_per_worker_blocks():
    spec = ClusterSpec(kind="slurm", workers=4, threads_per_worker=2,
                       slurm={"partition": "gpu", "cores": 8, "memory": "16GB", "processes": 2})
    kw = slurm.slurm_kwargs(spec, job_name="studios-abc")
    assert kw["queue"] == "gpu" and "partition" not in kw
    assert kw["job_cpu"] == 8  # --cpus-per-task
    assert kw["cores"] == 4 and kw["processes"] == 2  # 2 workers x 2 threads = 4 blocks at once
    assert kw["job_name"] == "studios-abc"
    assert kw["scheduler_options"]["dashboard_address"] == ":0"
    assert spec.torch_threads() == 2  # 8 cores / 2 processes / 2 threads
    assert spec.slots_per_job() == 4
    assert [spec.jobs_for(n) for n in (None, 1, 4, 5, 9, 1000)] == [4, 1, 1, 2, 3, 4]


def test_slurm_job_script_has_the_site_options():
    from dask_jobqueue import SLURMCluster

    spec = ClusterSpec(kind="slurm", gpus_per_job=1, slurm={
        "partition": "gpu", "account": "proj", "cores": 4, "memory": "8GB", "walltime": "01:00:00",
        "job_extra_directives": ["--constraint=a100"], "scheduler_options": {"host": "127.0.0.1"}})
    kw = slurm.slurm_kwargs(spec, job_name="studios-t")
    with SLURMCluster(**kw) as cluster:
        script = cluster.job_script()
    slurm.restore_sigint()
    for line in ("#SBATCH -J studios-t", "#SBATCH -p gpu", "#SBATCH -A proj", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --mem=8G", "#SBATCH -t 01:00:00", "#SBATCH --constraint=a100", "#SBATCH --gres=gpu:1"):
        assert line in script, script
    assert "--nthreads 1" in script and "--resources GPU=1" in script
    assert spec.resources == {"GPU": 1} and spec.device == "cuda"


def test_dask_jobqueue_sigint_handler_is_undone():
    import dask_jobqueue  # noqa: F401  (its import installs SIGINT -> sys.exit(), status 0)

    slurm.restore_sigint()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_slurm_without_sbatch_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ClusterError, match="'sbatch' is not on PATH"):
        cl.preflight(ClusterSpec(kind="slurm"))


def test_adapt_is_capped_by_the_blocks():
    class Fake:
        def adapt(self, **kw: Any) -> None:
            self.kw = kw

    fake = Fake()
    assert slurm.scale_slurm(fake, ClusterSpec(kind="slurm", adapt=(0, 10)), tasks=3) == 3
    assert fake.kw == {"minimum_jobs": 1, "maximum_jobs": 3}


def test_cpu_count_and_memory_follow_a_slurm_allocation(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert hosts.allocation_memory() is None
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    monkeypatch.setenv("SLURM_MEM_PER_NODE", "2048")
    assert hosts.cpu_count() == 1
    assert hosts.allocation_memory() == 2 * 2**30
    assert ClusterSpec(kind="local").torch_threads() == 1


# --- CUDA path up to the device choice ----------------------------------------------------------


def test_cuda_resources_and_device():
    spec = ClusterSpec(kind="cuda")
    assert spec.resources == {"GPU": 1} and spec.device == "cuda" and spec.uses_gpu
    assert ClusterSpec().resources is None and ClusterSpec().device == "cpu"


def test_cli_cuda_without_dask_cuda_is_one_line(tmp_path, scan_and_model):
    pytest.importorskip("torch")
    try:
        import dask_cuda  # noqa: F401
    except ImportError:
        pass
    else:  # pragma: no cover - a [gpu] install
        pytest.skip("dask-cuda is installed here")
    scan, model = scan_and_model
    proc = subprocess.run([*STUDIOS, "segment", scan, model, tmp_path / "o.zarr", "--cluster", "cuda"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 5
    _one_line(proc, "--cluster cuda needs dask-cuda", "pip install 'studios[gpu]'")
    assert not (tmp_path / "o.zarr").exists(), "nothing is written before the cluster is known to work"


@pytest.fixture
def fake_dask_cuda(monkeypatch):
    """A dask_cuda module whose LocalCUDACluster records its arguments (or raises)."""
    mod = types.ModuleType("dask_cuda")
    calls: list[dict[str, Any]] = []

    class LocalCUDACluster:
        error: Exception | None = None

        def __init__(self, **kwargs: Any) -> None:
            calls.append(kwargs)
            if LocalCUDACluster.error is not None:
                raise LocalCUDACluster.error

    mod.LocalCUDACluster = LocalCUDACluster  # type: ignore[attr-defined]
    mod.calls = calls  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "dask_cuda", mod)
    return mod


def test_cuda_with_a_cpu_torch_is_a_clear_error(fake_dask_cuda, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ClusterError, match="CPU-only"):
        cuda.start_cuda_cluster(ClusterSpec(kind="cuda"))
    assert fake_dask_cuda.calls == []


def test_cuda_without_a_gpu_is_a_clear_error(fake_dask_cuda, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ClusterError, match=r"no CUDA device is visible \(CUDA_VISIBLE_DEVICES=''\)"):
        cl.preflight(ClusterSpec(kind="cuda"))


def test_cuda_nvml_failure_is_one_line(fake_dask_cuda, monkeypatch):
    class NVMLError_LibraryNotFound(Exception):  # noqa: N801 - the name pynvml uses
        pass

    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    fake_dask_cuda.LocalCUDACluster.error = NVMLError_LibraryNotFound("NVML Shared Library Not Found\nmore")
    with pytest.raises(ClusterError) as info:
        cuda.start_cuda_cluster(ClusterSpec(kind="cuda"))
    assert "NVMLError_LibraryNotFound: NVML Shared Library Not Found more" in str(info.value)
    assert "\n" not in str(info.value)


def test_cuda_cluster_has_one_gpu_resource_per_worker(fake_dask_cuda, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cuda.start_cuda_cluster(ClusterSpec(kind="cuda", threads_per_worker=2, cuda_visible_devices="0,1"))
    (kw,) = fake_dask_cuda.calls
    assert kw["resources"] == {"GPU": 1} and kw["threads_per_worker"] == 2
    assert kw["CUDA_VISIBLE_DEVICES"] == "0,1" and "n_workers" not in kw  # one worker per GPU


def test_segment_picks_cuda_and_gpu_block_for_a_cuda_cluster(monkeypatch, tmp_path, scan_and_model):
    """Everything up to the device: the job says cuda, the block comes from free GPU memory."""
    scan, model = scan_and_model
    seen: dict[str, Any] = {}

    def dispatch(job, blocks, *, executor, cluster, **kwargs):
        seen.update(job=job, blocks=blocks, cluster=cluster)
        return RunOutcome()

    monkeypatch.setattr("pipeline.segment.run.preflight", lambda spec: None)
    monkeypatch.setattr("pipeline.segment.run._dispatch", dispatch)
    monkeypatch.setattr("pipeline.compute.cuda.gpu_free_memory", lambda: [3 * 2**30, 2 * 2**30])
    segment(scan, model, tmp_path / "o.zarr", cluster=ClusterSpec(kind="cuda"), chunks=(8, 8, 8), precision="bf16")
    job = seen["job"]
    assert job.device == "cuda" and job.precision == "bf16"
    assert seen["cluster"].resources == {"GPU": 1}
    # 2 GiB free is plenty for this 20x24x28 scan: one block covering it, in chunk multiples
    assert len(seen["blocks"]) == 1 and tuple(seen["blocks"][0].write.shape) == (20, 24, 28)
    manifest = zarr.open_group(str(tmp_path / "o.zarr"), mode="r").attrs["studios"]["ledger"]
    assert manifest["block"] == [24, 24, 32] and manifest["precision"] == "bf16"


def _start_environ() -> bytes:
    with open("/proc/self/environ", "rb") as f:  # the environment the process was started with
        return f.read()


@pytest.mark.parametrize("heap", ["retain", "glibc"])
def test_local_workers_start_with_the_heap_settings(heap):
    """glibc reads MALLOC_* once at process start: the worker's *initial* environment must hold them."""
    spec = ClusterSpec(kind="local", workers=1, worker_heap=heap)
    with cl.open_client(spec) as client:
        env = next(iter(client.run(_start_environ).values())).split(b"\0")
    for key, value in hosts.RETAIN_HEAP_ENV.items():
        assert (f"{key}={value}".encode() in env) == (heap == "retain"), (key, heap)
    import dask

    assert "MALLOC_MMAP_MAX_" not in dask.config.get("distributed.nanny.pre-spawn-environ", {})  # not leaked


def test_slurm_workers_export_the_heap_settings():
    from dask_jobqueue import SLURMCluster

    spec = ClusterSpec(kind="slurm", slurm={"cores": 1, "job_script_prologue": ["module load cuda"]})
    with SLURMCluster(**slurm.slurm_kwargs(spec, job_name="studios-t")) as cluster:
        script = cluster.job_script()
    slurm.restore_sigint()
    assert "module load cuda" in script
    assert script.index("export MALLOC_MMAP_MAX_=0") < script.index("distributed.cli.dask_worker")
    spec = ClusterSpec(kind="slurm", worker_heap="glibc", slurm={"cores": 1})
    assert "MALLOC" not in "\n".join(slurm.slurm_kwargs(spec, job_name="studios-t")["job_script_prologue"])


def test_unknown_worker_heap_is_a_config_error():
    with pytest.raises(ConfigError, match="worker_heap.*retain, glibc"):
        ClusterSpec(worker_heap="jemalloc")


def test_gpu_resource_keeps_blocks_off_cpu_workers():
    """A real scheduler with one GPU-resource worker and one plain worker."""
    from distributed import Client, Scheduler, SpecCluster, Worker, get_worker

    from pipeline.core.tiling import plan_blocks

    def where(job: Any, block: Any) -> dict[str, Any]:
        return {"id": block.id, "worker": get_worker().name}

    workers = {
        "gpu": {"cls": Worker, "options": {"nthreads": 1, "resources": {"GPU": 1}}},
        "cpu": {"cls": Worker, "options": {"nthreads": 1}},
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": None, "host": "127.0.0.1"}}
    with SpecCluster(workers=workers, scheduler=scheduler) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=30)
        blocks = plan_blocks((16, 16, 16), (4, 4, 4), 0)
        outcome = DaskExecutor(client, resources={"GPU": 1}).run(where, None, blocks)
        assert len(outcome.results) == 64 and not outcome.failed
        assert {r["worker"] for r in outcome.results} == {"gpu"}
        # without the resource both workers get blocks
        outcome = DaskExecutor(client, max_in_flight=64).run(where, None, blocks)
        assert len(outcome.results) == 64


def test_device_cuda_without_gpu_is_refused_before_output(tmp_path, scan_and_model):
    scan, model = scan_and_model
    if torch.cuda.is_available():  # pragma: no cover
        pytest.skip("a GPU is present")
    from pipeline.compute.executors import SerialExecutor

    with pytest.raises(ConfigError, match="no CUDA device"):
        segment(scan, model, tmp_path / "o.zarr", executor=SerialExecutor(), device="cuda")
    assert not (tmp_path / "o.zarr").exists()


# --- block size from free GPU memory -----------------------------------------------------------------


def test_model_widths_and_bytes_per_voxel():
    model = init_bundle(classes=("a", "b", "c"), params={"channels": 16, "dilations": [1, 2, 4, 1], "head": 16}).build()
    assert model_widths(model) == [1, 16, 16, 16, 16, 16, 16, 3]
    # widest pair 32 + widest map 16 = 48 float32 maps, + input 1 + 3 x 3 class maps in float32
    assert activation_bytes_per_voxel(model_widths(model), classes=3, overhead=1.0) == 48 * 4 + (1 + 9) * 4
    bf16 = activation_bytes_per_voxel(model_widths(model), classes=3, element_bytes=2, overhead=1.0)
    assert bf16 == 48 * 2 + (1 + 9) * 4
    fb = init_bundle(classes=("a", "b"), arch="filterbank_mlp").build()
    assert model_widths(fb)[:2] == [1, fb.n_features]


def test_choose_block_fits_and_is_a_chunk_multiple():
    bpv, halo, volume = 348.0, 9, (2048, 2048, 2048)
    previous = 0
    for gib in (2, 4, 8, 16, 24, 40, 80):
        free = gib * 2**30
        block = choose_block(free, bpv, halo=halo, chunks=CHUNKS, volume=volume, max_width=16)
        assert all(b % c == 0 for b, c in zip(block, CHUNKS, strict=True))
        read = np.prod([b + 2 * halo for b in block])
        assert read * bpv <= 0.8 * free and read * 16 < 2**31
        assert np.prod(block) >= previous  # more memory, no smaller block
        for axis in range(3):  # maximal: one more chunk on any axis would not fit
            bigger = list(block)
            bigger[axis] += CHUNKS[axis]
            read = np.prod([b + 2 * halo for b in bigger])
            assert read * bpv > 0.8 * free or read * 16 >= 2**31
        previous = np.prod(block)
    assert choose_block(8 * 2**30, bpv, halo=halo, chunks=CHUNKS, volume=volume) == (128, 256, 384)
    # 80 GiB: the 2^31-element limit on a 16-channel feature map binds before memory does
    assert choose_block(80 * 2**30, bpv, halo=halo, chunks=CHUNKS, volume=volume, max_width=16) == (384, 512, 512)


def test_choose_block_stops_at_the_volume_and_refuses_tiny_memory():
    assert choose_block(80 * 2**30, 100.0, halo=4, chunks=(64, 64, 64), volume=(100, 130, 60)) == (128, 192, 64)
    with pytest.raises(ConfigError, match="GiB of GPU memory.*smaller --chunks"):
        choose_block(2**30, 348.0, halo=9, chunks=CHUNKS, volume=(512, 512, 512))


def test_auto_block_uses_precision_and_given_memory():
    model = init_bundle(classes=("a", "b", "c"), params={"channels": 16}).build()
    fp32 = auto_block(model, chunks=CHUNKS, volume=(1024,) * 3, free_bytes=6 * 2**30)
    bf16 = auto_block(model, chunks=CHUNKS, volume=(1024,) * 3, free_bytes=6 * 2**30, precision="bf16")
    assert np.prod(bf16) > np.prod(fp32)


def test_no_gpu_means_no_memory_figure():
    if torch.cuda.is_available():  # pragma: no cover
        pytest.skip("a GPU is present")
    assert cuda.gpu_free_memory() == []
    model = init_bundle(classes=("a", "b"), params=SMALL).build()
    assert auto_block(model, chunks=CHUNKS, volume=(256,) * 3) is None


# --- mixed precision ---------------------------------------------------------------------------------


def test_bf16_autocast_stays_close_to_fp32_on_a_real_volume():
    import tifffile

    volume = tifffile.imread(CEMENT)[:40, :40, :40]
    model = init_bundle(classes=("pore", "paste", "grain"), params={"channels": 8}, seed=0).build()
    padded = np.pad(volume, model.halo, mode="edge")
    with numerics(exact=False):
        fp32 = forward(model, padded, offset=100.0, scale=0.02)
        default = forward(model, padded, offset=100.0, scale=0.02, precision="fp32")
        bf16 = forward(model, padded, offset=100.0, scale=0.02, precision="bf16")
    np.testing.assert_array_equal(fp32, default)  # fp32 is the unchanged path
    assert bf16.dtype == np.float32
    diff = np.abs(bf16 - fp32)
    assert 0 < diff.max() < 1e-2
    assert (to_labels(bf16) != to_labels(fp32)).mean() < 1e-2


def test_precision_is_checked(tmp_path, scan_and_model):
    scan, model = scan_and_model
    from pipeline.compute.executors import SerialExecutor

    with pytest.raises(InputError, match="exact=True needs precision fp32"):
        segment(scan, model, tmp_path / "a.zarr", executor=SerialExecutor(), exact=True, precision="bf16")
    with pytest.raises(ConfigError, match="precision 'fp8' is unknown"):
        segment(scan, model, tmp_path / "b.zarr", executor=SerialExecutor(), precision="fp8")
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()


def test_bf16_segment_runs_serially(tmp_path, scan_and_model):
    scan, model = scan_and_model
    from pipeline.compute.executors import SerialExecutor

    r = segment(scan, model, tmp_path / "s.zarr", block=16, executor=SerialExecutor(), precision="bf16", qc=False)
    assert r.blocks_done == r.blocks_total


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_cluster_segments_like_cpu(tmp_path, scan_and_model):  # pragma: no cover - GPU machines
    pytest.importorskip("dask_cuda")
    scan, model = scan_and_model
    from pipeline.compute.executors import SerialExecutor

    segment(scan, model, tmp_path / "cpu.zarr", block=16, executor=SerialExecutor())
    r = segment(scan, model, tmp_path / "gpu.zarr", cluster=ClusterSpec(kind="cuda"), exact=True)
    assert r.blocks_done == r.blocks_total
    cpu = np.asarray(zarr.open_group(str(tmp_path / "cpu.zarr"))["0"][...])
    gpu = np.asarray(zarr.open_group(str(tmp_path / "gpu.zarr"))["0"][...])
    assert (cpu != gpu).mean() < 1e-3
    assert os.environ.get("CUDA_VISIBLE_DEVICES", "") != "" or torch.cuda.device_count() >= 1
