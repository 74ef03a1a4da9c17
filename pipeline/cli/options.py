"""Option groups shared by several subcommands: where the blocks run (``--cluster`` ...)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_cluster_options(p: argparse.ArgumentParser) -> None:
    """``--cluster``, ``--workers``, ``--threads-per-worker``, ``--scheduler``, ``--cluster-config``."""
    g = p.add_argument_group("cluster")
    g.add_argument("--cluster", choices=("local", "slurm", "cuda", "serial"), default="local",
                   help="where blocks run: local Dask cluster (default), SLURM via dask-jobqueue, GPU workers, "
                   "or in-process")
    g.add_argument("--workers", type=int, default=1, help="worker processes (local) or SLURM jobs (default 1)")
    g.add_argument("--threads-per-worker", type=int, default=1, help="blocks run at once per worker (default 1)")
    g.add_argument("--scheduler", metavar="ADDRESS", help="use an existing Dask scheduler, e.g. tcp://10.0.0.5:8786")
    g.add_argument("--cluster-config", metavar="YAML", type=Path,
                   help="site profile with a 'cluster:' section (SLURM partition, cores, memory, ...)")


def cluster_from_args(args: argparse.Namespace) -> tuple[Any, Any]:
    """(ClusterSpec | None, Executor | None) from the cluster options."""
    from pipeline.compute.cluster import ClusterSpec, cluster_spec_from_file
    from pipeline.compute.executors import SerialExecutor

    if args.cluster == "serial":
        return None, SerialExecutor(retries=getattr(args, "retries", 2))
    if args.scheduler:
        return ClusterSpec(kind="address", address=args.scheduler), None
    if args.cluster_config is not None:
        spec = cluster_spec_from_file(args.cluster_config, kind=args.cluster, workers=args.workers)
        return spec, None
    return ClusterSpec(kind=args.cluster, workers=args.workers, threads_per_worker=args.threads_per_worker), None
