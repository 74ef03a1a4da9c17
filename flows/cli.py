"""Subcommands that run the Prefect flows: ``run``, ``serve``, ``deploy``, ``dashboard``.

Registered through the ``studios.commands`` entry point ``flows``. Nothing here imports Prefect
until a handler runs, so ``studios --help`` stays fast. Every handler turns Prefect's
outgoing analytics off (``DO_NOT_TRACK=1``, ``PREFECT_SERVER_ANALYTICS_ENABLED=false``) unless
the environment says otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from pipeline.cli.main import command
from pipeline.core.errors import ConfigError

AIR_GAPPED = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
#: Prefect's temporary local API gives up after 20 s by default; a busy workstation needs longer.
EPHEMERAL_TIMEOUT = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}


def air_gapped() -> None:
    """No outgoing analytics from Prefect (set before Prefect is imported); patient temporary API."""
    for key, value in {**AIR_GAPPED, **EPHEMERAL_TIMEOUT}.items():
        os.environ.setdefault(key, value)


def _drop_traceback(record: logging.LogRecord) -> bool:
    record.exc_info, record.exc_text = None, None
    return True


@contextlib.contextmanager
def _console_without_tracebacks(debug: bool) -> Iterator[None]:
    """Console handlers print the message of a failing flow run, not its traceback (``--debug``: both)."""
    handlers = [] if debug else list(logging.getLogger().handlers)
    for h in handlers:
        h.addFilter(_drop_traceback)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(_drop_traceback)


def _api_description() -> str:
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return f"Prefect server {url}"
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return f"Prefect server {PREFECT_API_URL.value()} (profile)"
    return "Prefect's temporary local API (set PREFECT_API_URL to use a server)"


# ------------------------------------------------------------------------------------ run


@command("run")
def _run_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "run", help="run ingest -> (train) -> segment -> qc from a YAML run profile, as a Prefect flow",
        description="Run the process_scan flow from a run profile (see configs/). Uses the Prefect server in "
        "PREFECT_API_URL, or Prefect's temporary local API when it is unset.",
    )
    p.add_argument("config", type=Path, help="run profile, e.g. configs/demo.yaml")
    p.add_argument("--output", type=Path, help="output folder (overrides the profile's 'output')")
    p.add_argument("--source", help="scan to process (overrides the profile's 'source')")
    p.add_argument("--name", help="scan name (default: from the source's file name)")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="recompute finished outputs instead of reusing them")
    p.add_argument("--check", action="store_true", help="validate the profile and print it; run nothing")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    import json

    from pipeline.core.settings import load_run_config

    overrides = {"output": str(args.output) if args.output else None, "source": args.source, "name": args.name,
                 "overwrite": args.overwrite}
    cfg = load_run_config(args.config, overrides=overrides)
    params = cfg.to_parameters()
    if args.check:
        print(json.dumps(params, indent=2))
        return 0
    air_gapped()
    print(f"studios run {args.config}: {cfg.scan_name} -> {cfg.output} on {_api_description()}", file=sys.stderr)
    from flows.process import process_scan

    with _console_without_tracebacks(args.debug):
        result = process_scan(**params)
    from pipeline.service.summary import run_lines

    print("\n".join(run_lines(result)))
    return 0


# ---------------------------------------------------------------------------------- serve


@command("serve")
def _serve_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "serve", help="serve the process-scan and watch-beamline deployments from this process",
        description="Register the deployments process-scan/process-scan and watch-folder/watch-beamline (on the "
        "profile's watch schedule) with the Prefect server in PREFECT_API_URL and run their flow runs from this "
        "process until interrupted. For a beamline workstation; see 'studios deploy' for a work pool.",
    )
    p.add_argument("config", type=Path, nargs="?",
                   help="run profile with a 'watch:' section, e.g. configs/beamline.yaml")
    p.add_argument("--interval", type=float,
                   help="seconds between looks at the incoming folder (overrides watch.interval)")
    p.add_argument("--cron", help="cron schedule instead of an interval, e.g. '*/5 * * * *'")
    p.add_argument("--paused", action="store_true", help="register the watch schedule paused (runs only on demand)")
    p.add_argument("--limit", type=int, help="most flow runs at once (default: no limit)")
    p.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    if args.interval is not None and args.cron:
        raise ConfigError("give --interval or --cron, not both")
    if args.interval is not None and args.interval <= 0:
        raise ConfigError("--interval must be > 0 seconds")
    air_gapped()
    if not os.environ.get("PREFECT_API_URL"):
        logging.getLogger("pipeline.cli.main").warning(
            "PREFECT_API_URL is not set: serving against a temporary local API that nothing else can reach; "
            "start 'prefect server start' and export PREFECT_API_URL for the UI and schedules across restarts")
    from flows.serving import serve

    serve(args.config, interval=args.interval, cron=args.cron, paused=args.paused, limit=args.limit)
    return 0


# --------------------------------------------------------------------------------- deploy


@command("deploy")
def _deploy_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "deploy", help="register the deployments of deploy/prefect.yaml with a Prefect server (prefect deploy)",
        description="Create the work pool if missing, then run 'prefect deploy --all' on deploy/prefect.yaml "
        "from the project root against the server in PREFECT_API_URL. Start workers with "
        "'prefect worker start --pool POOL'. Arguments after '--' go to 'prefect deploy'.",
    )
    p.add_argument("--prefect-file", type=Path, help="deployment file (default: deploy/prefect.yaml)")
    p.add_argument("--pool", help="work pool (default: the one in the file, 'studios')")
    p.add_argument("--name", action="append", help="deploy only this deployment (repeatable)")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="-- then extra 'prefect deploy' arguments")
    p.set_defaults(handler=_deploy)


def _deploy(args: argparse.Namespace) -> int:
    air_gapped()
    from flows.serving import PROJECT_ROOT, deploy

    os.environ.setdefault("STUDIOS_HOME", str(PROJECT_ROOT))
    extra = [a for a in (args.extra or []) if a != "--"]
    code = deploy(args.prefect_file, pool=args.pool, names=args.name, extra=extra)
    if code != 0:
        raise ConfigError(f"prefect deploy failed (exit status {code}); see its output above")
    print(f"deployed; start a worker with: prefect worker start --pool {args.pool or 'studios'}")
    return 0


# ------------------------------------------------------------------------------ dashboard


@command("dashboard")
def _dashboard_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "dashboard", help="web page of the scans under a folder: state, progress, QC, links",
        description="Serve the monitoring dashboard for the scan outputs under --root (read-only; no "
        "authentication, so it binds 127.0.0.1 unless --host says otherwise).",
    )
    p.add_argument("--root", type=Path, default=Path("."), help="folder holding the scan outputs (default: .)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--refresh", type=int, default=5, help="seconds between page reloads (default 5)")
    p.add_argument("--prefect-ui", help="Prefect UI base URL for flow-run links (default: from PREFECT_API_URL)")
    p.set_defaults(handler=_dashboard)


def _dashboard(args: argparse.Namespace) -> int:
    air_gapped()
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port} is not a TCP port (1-65535)")
    if args.refresh < 1:
        raise ConfigError("--refresh must be at least 1 second")
    from flows.dashboard.app import run

    run(args.root, host=args.host, port=args.port, refresh=args.refresh, prefect_ui=args.prefect_ui)
    return 0
