"""The run-status file each processed scan keeps: ``<output>/studios-run.json``.

Flows write it; the dashboard reads it (together with the segmentation's ledger and the QC
files), so the dashboard needs no Prefect server. Keys (schema ``studios-run/1``)::

    schema, name, state        queued | running | done | failed
    stage                      ingest | train | segment | qc | (none)
    source, output             absolute paths
    outputs                    {"scan", "model", "segmentation", "qc_json", "report"}: paths under output
    created, started, updated, finished   ISO 8601 UTC
    error                      one line, for failed runs
    flow_run_id, flow_run_url  the Prefect flow run (the URL when the Prefect UI is known)
    dask_dashboard             the Dask dashboard of the segment stage's cluster, while known
    progress                   {"stage", "done", "total", "voxels", "voxels_per_second", "eta_seconds", "updated"}
    qc                         {"warnings": [...], "class_fractions": {...}} once QC ran

Updates are atomic (write a temporary file, then ``os.replace``): a reader sees the old or the
new file, never half of one. Importing this module does not import Prefect.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

STATUS_FILE = "studios-run.json"
SCHEMA = "studios-run/1"
STATES = ("queued", "running", "done", "failed")


def now_iso() -> str:
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
                raise ValueError(f"state {values['state']!r} is not one of {STATES}")
            self.data.update({k: v for k, v in values.items()})
            self.data["updated"] = now_iso()
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, self.data)
            return dict(self.data)

    def __repr__(self) -> str:  # shown in Prefect's task-input records
        return f"RunStatus({str(self.path)!r})"
