"""Deployments of the studios flows: served from one process, or registered for a work pool.

Two ways to run studios unattended:

- ``studios serve CONFIG`` (a beamline workstation): one long-running process registers the
  deployments ``process-scan/process-scan`` and ``watch-folder/watch-beamline`` (on the
  profile's ``watch.interval`` or ``watch.cron`` schedule) with the Prefect API and runs their
  flow runs itself, each in a subprocess. Needs a Prefect server (``PREFECT_API_URL``) for the
  schedule to be kept across restarts; nothing else.
- ``studios deploy`` (a facility): ``prefect deploy`` of ``deploy/prefect.yaml`` against the
  server in ``PREFECT_API_URL``; runs go to a work pool served by ``prefect worker start``
  processes (on the cluster's login node, or anywhere that sees the data).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from pipeline.core.errors import ConfigError, StudiosError

logger = logging.getLogger(__name__)

PROCESS_DEPLOYMENT = "process-scan"
WATCH_DEPLOYMENT = "watch-beamline"
DEFAULT_POOL = "studios"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PREFECT_FILE = PROJECT_ROOT / "deploy" / "prefect.yaml"


def build_deployments(
    config: str | os.PathLike[str] | None,
    *,
    interval: float | None = None,
    cron: str | None = None,
    paused: bool = False,
    watch: bool = True,
) -> list[Any]:
    """The RunnerDeployments ``process-scan`` and (with a ``watch:`` section) ``watch-beamline``."""
    from flows.process import process_scan
    from flows.watch import watch_folder
    from pipeline.core.settings import load_run_config
    from pipeline.service.incoming import watch_schedule

    params: dict[str, Any] = {}
    cfg = None
    if config is not None:
        cfg = load_run_config(config, require_source=False)  # one-line error now, not at 3 a.m.
        params["config"] = str(Path(config).absolute())
    deployments = [
        process_scan.to_deployment(
            name=PROCESS_DEPLOYMENT, parameters=params, tags=["studios"],
            description="One scan end to end: ingest -> (train) -> segment -> qc.",
        )
    ]
    if watch and cfg is not None and cfg.watch is not None:
        kind, value = watch_schedule(cfg.watch, interval=interval, cron=cron)
        schedule = {"cron": value} if kind == "cron" else {"interval": timedelta(seconds=float(value))}
        deployments.append(
            watch_folder.to_deployment(
                name=WATCH_DEPLOYMENT, parameters=params, tags=["studios", "beamline"], paused=paused,
                description=f"Process new complete scans in {cfg.watch.incoming}.", **schedule,
            )
        )
    elif watch and config is not None:
        logger.warning("%s has no 'watch:' section: serving process-scan only", config)
    return deployments


def serve(config: str | os.PathLike[str] | None, *, interval: float | None = None, cron: str | None = None,
          paused: bool = False, limit: int | None = None) -> None:
    """Serve the deployments from this process until interrupted (Ctrl-C / SIGTERM)."""
    from prefect import serve as prefect_serve

    deployments = build_deployments(config, interval=interval, cron=cron, paused=paused)
    prefect_serve(*deployments, limit=limit, print_starting_message=True)


def ensure_work_pool(name: str, pool_type: str = "process") -> bool:
    """Create the work pool if the server lacks it; returns True when it was created."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type=pool_type))
            return True


def deploy(prefect_file: str | os.PathLike[str] | None = None, *, pool: str | None = None,
           names: list[str] | None = None, extra: list[str] | None = None) -> int:
    """``prefect deploy`` the deployments of ``deploy/prefect.yaml``; returns its exit status."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise ConfigError("studios deploy needs a Prefect server: set PREFECT_API_URL "
                          "(e.g. http://127.0.0.1:4200/api after 'prefect server start')")
    path = Path(prefect_file) if prefect_file else DEFAULT_PREFECT_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: prefect deployment file does not exist; give --prefect-file")
    created = ensure_work_pool(pool or DEFAULT_POOL)
    if created:
        logger.warning("created work pool %r (type process)", pool or DEFAULT_POOL)
    exe = shutil.which("prefect", path=str(Path(sys.executable).parent)) or shutil.which("prefect")
    if exe is None:
        raise StudiosError("the 'prefect' command is not on PATH; install studios into this environment")
    cmd = [exe, "deploy", "--no-prompt", "--prefect-file", str(path.absolute())]
    cmd += [a for n in (names or []) for a in ("--name", n)] if names else ["--all"]
    if pool:
        cmd += ["--pool", pool]
    cmd += list(extra or [])
    # entrypoints in prefect.yaml (flows/process.py:process_scan) are relative to the project root
    return subprocess.call(cmd, cwd=str(PROJECT_ROOT))
