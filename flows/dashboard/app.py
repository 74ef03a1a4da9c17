"""The studios monitoring dashboard: one page listing the scans under a root folder.

``studios dashboard --root DIR`` serves (FastAPI + Jinja2 on uvicorn, bound to 127.0.0.1 by
default; it has no authentication, put the facility's proxy in front to share it):

- ``/``             the page: every scan with its state (queued / running / done / failed, and
                    incoming scans still waiting to be complete), live progress of running ones
                    (blocks done / total from the ledger, voxels/s, ETA), QC summary and
                    warnings, links to its report, its Prefect flow run and the Dask dashboard;
                    for analysed scans the fibre fraction, porosity, objects and a mid-slice
                    thumbnail of the labels, and per series (the scans of one folder) the trend of
                    fibre fraction and porosity. It reloads itself every ``refresh`` seconds.
- ``/api/scans``    the same as JSON (``scans``, ``series``).
- ``/files/PATH``   files under the root only (reports); ``..``, absolute paths and symlinks
                    leading out of the root are refused with 404.
- ``/healthz``      ``ok``.

What it shows is collected by :mod:`pipeline.service.scans` (read-only). It never imports Prefect.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import jinja2
from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse

from pipeline.core.errors import ConfigError
from pipeline.service.runstate import format_seconds
from pipeline.service.scans import STATE_ORDER, PrefectLinks, collect, safe_path, safe_url, series

logger = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parent / "templates"


def templates() -> jinja2.Environment:
    """The page templates: autoescaped, strict about missing names, with the page's filters."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["seconds"] = lambda v: "" if v is None else format_seconds(float(v))
    env.filters["pct"] = lambda v: f"{100 * float(v):.1f} %"
    env.filters["mvox"] = lambda v: f"{float(v) / 1e6:.2f} Mvox/s"
    env.filters["safe_url"] = safe_url
    return env


def create_app(root: str | os.PathLike[str], *, refresh: int = 5, prefect_api: str | None = None,
               prefect_ui: str | None = None) -> FastAPI:
    """The FastAPI application for ``root`` (Prefect URLs default to ``PREFECT_API_URL`` / ``PREFECT_UI_URL``)."""
    root_path = Path(root).expanduser().resolve()
    if not root_path.is_dir():
        raise ConfigError(f"{root_path}: dashboard root folder does not exist; give --root DIR")
    template = templates().get_template("dashboard.html")
    links = PrefectLinks(prefect_api if prefect_api is not None else os.environ.get("PREFECT_API_URL"),
                         prefect_ui if prefect_ui is not None else os.environ.get("PREFECT_UI_URL"))
    lock = threading.Lock()
    cache: dict[str, Any] = {"t": 0.0, "scans": []}

    def scans() -> list[dict[str, Any]]:
        with lock:  # one scan of the root per second, whatever the number of open pages
            if time.time() - cache["t"] > 1.0:
                cache["scans"] = collect(root_path, links)
                cache["t"] = time.time()
            return list(cache["scans"])

    app = FastAPI(title="studios dashboard", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        items = scans()
        counts = {s: sum(1 for x in items if x["state"] == s) for s in STATE_ORDER}
        html = template.render(scans=items, counts=counts, series=series(items), root=str(root_path), refresh=refresh,
                               generated=dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S"), prefect_ui=links.ui_url)
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    @app.get("/api/scans")
    def api_scans() -> JSONResponse:
        items = scans()
        return JSONResponse({"root": str(root_path), "scans": json.loads(json.dumps(items, default=str)),
                             "series": json.loads(json.dumps(series(items), default=str))})

    @app.get("/healthz", response_class=PlainTextResponse)
    def healthz() -> str:
        return "ok"

    @app.get("/files/{path:path}")
    def files(path: str) -> FileResponse:
        target = safe_path(root_path, path)
        if target is None:
            raise HTTPException(status_code=404, detail="not found")
        return FileResponse(target)

    return app


def run(root: str | os.PathLike[str], *, host: str = "127.0.0.1", port: int = 8765, refresh: int = 5,
        prefect_ui: str | None = None) -> None:
    """Serve the dashboard until interrupted."""
    import uvicorn

    app = create_app(root, refresh=refresh, prefect_ui=prefect_ui)
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("the dashboard has no authentication and is now reachable on %s:%d", host, port)
    print(f"studios dashboard for {Path(root).resolve()} on http://{host}:{port}/", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
