"""The run-status file each processed scan keeps: ``<output>/studios-run.json``.

Flows write it (:class:`StatusReporter` mirrors each stage's progress into it); the dashboard
reads it (together with the segmentation's ledger and the QC files), so the dashboard needs no
Prefect server. Keys (schema ``studios-run/1``)::

    schema, name, state        queued | running | done | failed
    stage                      ingest | train | segment | qc | analyse | (none)
    source, output             absolute paths
    outputs                    {"scan", "model", "segmentation", "qc_json", "report",
                               "analysis_json"}: paths under output
    analysis                   headline of analysis.json (fibre, pore fractions, objects, thumbnail) or null
    created, started, updated, finished   ISO 8601 UTC
    error                      one line, for failed runs
    flow_run_id, flow_run_url  the Prefect flow run (the URL when the Prefect UI is known)
    dask_dashboard             the Dask dashboard of the segment stage's cluster, while known
    progress                   {"stage", "done", "total", "voxels", "voxels_per_second", "eta_seconds", "updated"}
    qc                         {"warnings": [...], "class_fractions": {...}} once QC ran

Updates are atomic (write a temporary file, then ``os.replace``): a reader sees the old or the
new file, never half of one. No Prefect here.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.core.errors import ConfigError

logger = logging.getLogger(__name__)

STATUS_FILE = "studios-run.json"
SCHEMA = "studios-run/1"
STATES = ("queued", "running", "done", "failed")


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def atomic_write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON to ``path`` atomically (same-folder temporary file + ``os.replace``)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, default=str)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or ``None`` when missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_status(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The run-status file of ``folder``, or ``None``."""
    return read_json(Path(folder) / STATUS_FILE)


class RunStatus:
    """The status file of one scan's output folder; :meth:`update` merges and writes atomically."""

    def __init__(self, folder: str | os.PathLike[str], *, name: str | None = None) -> None:
        self.folder = Path(folder)
        self.path = self.folder / STATUS_FILE
        self._lock = threading.Lock()
        current = read_json(self.path) or {}
        self.data: dict[str, Any] = {"schema": SCHEMA, "created": now_iso(), **current}
        if name:
            self.data["name"] = name

    def update(self, **values: Any) -> dict[str, Any]:
        with self._lock:
            if "state" in values and values["state"] not in STATES:
                raise ConfigError(f"{self.path}: state {values['state']!r} is not one of {', '.join(STATES)}")
            self.data.update({k: v for k, v in values.items()})
            self.data["updated"] = now_iso()
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, self.data)
            return dict(self.data)

    def __repr__(self) -> str:  # shown in Prefect's task-input records
        return f"RunStatus({str(self.path)!r})"


def dask_dashboard_link() -> str | None:
    """The dashboard of the Dask client the current stage opened, if any (no client: ``None``)."""
    try:
        from distributed import default_client

        return str(default_client().dashboard_link) or None
    except Exception:  # no client (serial executor), or distributed not usable
        return None


def format_seconds(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    whole = int(round(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


class StatusReporter:
    """A :class:`pipeline.core.progress.Reporter` that writes ``progress`` into a run-status file.

    Updates are throttled to one every ``min_interval`` seconds (a 10^5-block run writes a few
    hundred times, not 10^5); :meth:`finish` always writes. Subclasses publish the same numbers
    elsewhere by overriding :meth:`published` (called on start and on every throttled update).
    A failing write is logged and never stops the run.
    """

    def __init__(self, status: RunStatus | None = None, *, min_interval: float = 2.0) -> None:
        self.status = status
        self.min_interval = min_interval
        self.stage = ""
        self.total = 0
        self.done = 0
        self.voxels = 0
        self._t0 = 0.0
        self._last = 0.0

    def start(self, stage: str, total: int) -> None:
        self.stage, self.total, self.done, self.voxels = stage, int(total), 0, 0
        self._t0 = self._last = time.monotonic()
        link = dask_dashboard_link() if stage == "segment" else None
        self.published(first=True)
        self._write_status(**({"dask_dashboard": link} if link else {}))

    def advance(self, n: int = 1, *, voxels: int = 0) -> None:
        self.done += n
        self.voxels += voxels
        now = time.monotonic()
        if now - self._last >= self.min_interval:
            self._last = now
            self._push()

    def finish(self) -> None:
        self._push()

    def published(self, *, first: bool) -> None:
        """Hook for subclasses: publish the current numbers (``first``: the stage just started)."""

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 100.0

    @property
    def voxels_per_second(self) -> float:
        elapsed = time.monotonic() - self._t0
        return self.voxels / elapsed if elapsed > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        """Seconds left at the rate so far; ``None`` before the first block, 0 when done."""
        if self.done >= self.total:
            return 0.0
        if not self.done:
            return None
        return (time.monotonic() - self._t0) / self.done * (self.total - self.done)

    def describe(self) -> str:
        """``segment: 4/8 blocks (50%), 1.50 Mvox/s, ETA 42s``."""
        text = f"{self.stage}: {self.done}/{self.total} blocks ({self.percent:.0f}%)"
        if self.voxels:
            text += f", {self.voxels_per_second / 1e6:.2f} Mvox/s"
        eta = self.eta_seconds
        if eta:
            text += f", ETA {format_seconds(eta)}"
        return text

    def _push(self) -> None:
        self.published(first=False)
        self._write_status()

    def _write_status(self, **extra: Any) -> None:
        if self.status is None:
            return
        eta = self.eta_seconds
        progress = {
            "stage": self.stage, "done": self.done, "total": self.total, "voxels": self.voxels,
            "voxels_per_second": round(self.voxels_per_second, 1),
            "eta_seconds": round(eta, 1) if eta is not None else None, "updated": now_iso(),
        }
        try:
            self.status.update(progress=progress, **extra)
        except OSError as exc:
            logger.warning("cannot write %s: %s", self.status.path, exc)
