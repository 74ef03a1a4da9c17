"""Shared helpers of the benchmarks in ``bench/`` (not a benchmark itself).

Every benchmark prints :func:`machine_facts` first and :func:`load_line` at start and end, so a
table can be read with the machine and its load in view: ratios measured in one run are the
figures to trust, absolute speeds move with whatever else the machine is doing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as ``python bench/x.py`` from anywhere
    sys.path.insert(0, str(ROOT))


def matmul_gflops(n: int = 4096, reps: int = 3, dtype: Any = None) -> float:
    """GFLOP/s of ``torch.mm`` on n x n matrices (float32, or ``dtype``), best of ``reps``."""
    import torch

    a, b = torch.rand(n, n, dtype=dtype), torch.rand(n, n, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def load_line() -> str:
    """``load average 1/5/15 min`` and the number of cores, one line."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:  # pragma: no cover - not on Linux
        return "load average: unknown"
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def machine_facts(extra: Mapping[str, Any] | None = None) -> str:
    """Cores, torch threads, versions, date and load, as a few printable lines."""
    import dask
    import distributed
    import torch
    import zarr

    from pipeline.compute.hosts import cpu_count

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import monai

        monai_v = monai.__version__
    except ImportError:
        monai_v = "not installed"
    lines = [
        f"date {dt.datetime.now().astimezone().isoformat(timespec='seconds')}  host {platform.node()}",
        f"cpu {cpu}; usable cores {cpu_count()} (os.cpu_count {os.cpu_count()}); "
        f"torch threads {torch.get_num_threads()}, interop {torch.get_num_interop_threads()}; "
        f"oneDNN {'on' if torch.backends.mkldnn.enabled else 'off'}",
        f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
        f"dask {dask.__version__}, distributed {distributed.__version__}, zarr {zarr.__version__}, monai {monai_v}",
        load_line(),
    ]
    if extra:
        lines.extend(f"{k}: {v}" if k else str(v) for k, v in extra.items())
    return "\n".join(lines)


def cement_volume(size: int | tuple[int, int, int]) -> np.ndarray[Any, Any]:
    """The bundled real 128^3 cement CT (uint8), tiled to ``size`` (int or (z, y, x))."""
    import tifffile

    from pipeline.demo import bundled_scan

    shape = (size,) * 3 if isinstance(size, int) else tuple(size)
    base = tifffile.imread(bundled_scan())
    reps = tuple(-(-s // b) for s, b in zip(shape, base.shape, strict=True))
    return np.ascontiguousarray(np.tile(base, reps)[: shape[0], : shape[1], : shape[2]])


def bundle(arch: str | None = None, params: str | Mapping[str, Any] | None = None, classes: int = 2, seed: int = 0):
    """A seeded random-weight bundle built from the registry defaults (speed is weight-independent).

    ``params`` overrides registry defaults (a JSON string or a mapping).
    """
    from pipeline.io.bundle import init_bundle
    from pipeline.models import DEFAULT_ARCH

    if isinstance(params, str):
        params = json.loads(params)
    names = ("background", "foreground") if classes == 2 else tuple(f"c{i}" for i in range(classes))
    return init_bundle(classes=names, arch=arch or DEFAULT_ARCH, params=params, seed=seed)


def describe(b: Any) -> str:
    m = b.build()
    return (f"model {b.arch} {json.dumps(dict(b.params))}: halo {b.halo}, {m.n_parameters()} parameters, "
            f"{m.flops_per_voxel() / 1e3:.1f} kFLOP/voxel")


class PeakRSS:
    """Poll the resident memory of processes (each with its children) in a thread; keep the peak.

    ``pids`` may change while polling (``set_pids``). ``peak`` is the largest sum seen in one
    poll, in bytes; ``peaks`` the largest per root pid.
    """

    def __init__(self, pids: list[int] | None = None, interval: float = 0.05) -> None:
        self.pids = list(pids or [])
        self.interval = interval
        self.peak = 0
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def set_pids(self, pids: list[int]) -> None:
        self.pids = list(pids)

    @staticmethod
    def rss_tree(pid: int) -> int:
        import psutil

        try:
            proc = psutil.Process(pid)
            total = proc.memory_info().rss
            for child in proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):  # gone meanwhile
                    total += child.memory_info().rss
            return int(total)
        except psutil.Error:
            return 0

    def sample(self) -> int:
        total = 0
        for pid in list(self.pids):
            rss = self.rss_tree(pid)
            self.peaks[pid] = max(self.peaks.get(pid, 0), rss)
            total += rss
        self.peak = max(self.peak, total)
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


class TreePeak(PeakRSS):
    """Poll this process and its children (e.g. a LocalCluster's nanny and worker processes).

    ``peak_self``: this process alone; ``peak_child``: the largest single child; ``peak``: the
    largest sum over the whole tree seen in one poll.
    """

    def __init__(self, interval: float = 0.1) -> None:
        super().__init__([os.getpid()], interval)
        self.peak_self = 0
        self.peak_child = 0

    def sample(self) -> int:
        import psutil

        me = psutil.Process(os.getpid())
        own = me.memory_info().rss
        total = own
        for child in me.children(recursive=True):
            try:
                rss = child.memory_info().rss
            except psutil.Error:  # gone meanwhile
                continue
            total += rss
            self.peak_child = max(self.peak_child, rss)
        self.peak_self = max(self.peak_self, own)
        self.peak = max(self.peak, total)
        return total


def retain_heap() -> bool:
    """glibc: keep freed memory in this process instead of one ``mmap`` per large buffer.

    ``mallopt(M_MMAP_MAX, 0)`` and ``mallopt(M_TRIM_THRESHOLD, 2^31 - 1)``. Effective for
    allocations made by threads on the main arena (this process's main thread; every thread
    when ``MALLOC_ARENA_MAX=1`` was set at process start). Returns whether it applied.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return libc.mallopt(-4, 0) == 1 and libc.mallopt(-1, 2**31 - 1) == 1


def set_malloc(mode: str) -> tuple[str, str]:
    """Allocator for a benchmark: ``retain`` (studios' default ``worker_heap``) or ``glibc``.

    Returns ``(worker_heap, description)``: pass ``worker_heap`` to every ``ClusterSpec`` the
    benchmark starts. With ``retain`` this process (the monolithic reference) also keeps freed
    memory (:func:`retain_heap`), so both sides run with the same allocator behaviour.
    """
    from pipeline.compute.hosts import RETAIN_HEAP_ENV

    if mode == "glibc":
        return "glibc", "malloc: glibc defaults (workers: dask's MALLOC_TRIM_THRESHOLD_=65536)"
    ok = retain_heap()
    return "retain", (f"malloc: retain freed memory (driver mallopt {'applied' if ok else 'FAILED'}; "
                      f"workers worker_heap=retain: {RETAIN_HEAP_ENV})")


def dir_bytes(path: Path) -> int:
    """Bytes of all files below ``path`` (what a folder or zarr store takes on disk, unpadded)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A plain fixed-width table (first column left-aligned, the others right-aligned)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = []
    for j, r in enumerate(cells):
        out.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
