"""What the dashboard shows: the scans under a root folder, read from what the runs leave behind.

Reads only files (``studios-run.json``, ``seg.zarr`` attributes and ledger, ``qc/qc.json``,
``seg.analysis/analysis.json`` and its thumbnail, the watcher's ``.studios-watch/state.json``)
and, when a Prefect API URL is given and reachable, flow-run states over plain HTTP
(:class:`PrefectLinks`). Never writes, never imports Prefect or a web framework: the FastAPI app
is :mod:`flows.dashboard.app`.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

from pipeline.core.hosts import holder_alive
from pipeline.service.incoming import DEFAULT_STATE_DIR
from pipeline.service.runstate import STATUS_FILE, read_json

logger = logging.getLogger(__name__)

SEG_NAMES = ("seg.zarr",)
QC_PLACES = ("qc/qc.json", "seg.zarr/qc/qc.json")
ANALYSIS_PLACES = ("seg.analysis/analysis.json",)
MAX_DEPTH = 3
STATE_ORDER = {"running": 0, "queued": 1, "waiting": 2, "failed": 3, "done": 4}


def _parse_time(text: Any) -> float | None:
    if not text:
        return None
    try:
        t = dt.datetime.fromisoformat(str(text))
    except ValueError:
        try:
            t = dt.datetime.strptime(str(text), "%Y-%m-%dT%H:%M:%S%z")
        except ValueError:
            return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.timestamp()


def find_scan_folders(root: Path) -> list[Path]:
    """Folders under ``root`` (itself included) holding a run-status file or a ``seg.zarr``."""
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        try:
            names = {e.name: e for e in os.scandir(folder)}
        except OSError:
            return
        if STATUS_FILE in names or any(n in names and names[n].is_dir() for n in SEG_NAMES):
            found.append(folder)
            return
        if depth >= MAX_DEPTH:
            return
        for name, entry in sorted(names.items()):
            if name.startswith(".") or name.endswith(".zarr") or not entry.is_dir(follow_symlinks=False):
                continue
            walk(Path(entry.path), depth + 1)

    walk(root, 0)
    return found


def ledger_progress(seg: Path) -> dict[str, Any] | None:
    """Blocks done / total, voxels and completeness of a segmentation, from its ledger."""
    import zarr

    from pipeline.segment.ledger import Ledger

    try:
        group = zarr.open_group(str(seg), mode="r")
        attrs: dict[str, Any] = dict(group.attrs.get("studios", {}))  # type: ignore[arg-type]
        shape = tuple(int(s) for s in group["0"].shape)  # type: ignore[union-attr]
        mask = Ledger(group).done_mask()
    except Exception as exc:  # being created, or not a studios segmentation
        logger.debug("%s: ledger not readable: %s", seg, exc)
        return None
    done = int((mask > 0).sum())
    total = int(mask.size)
    voxels_total = math.prod(shape)
    lock = read_json(seg.with_name(seg.name + ".lock"))
    return {
        "complete": bool(attrs.get("complete", False)),
        "done": done,
        "total": total,
        "shape": list(shape),
        "voxels_total": voxels_total,
        "voxels_done": int(voxels_total * done / total) if total else 0,
        "classes": list(attrs.get("classes", [])),
        "run": attrs.get("run") or {},
        "lock": lock,
    }


def _qc(folder: Path, status: Mapping[str, Any]) -> tuple[dict[str, Any] | None, Path | None]:
    places = [Path(p) for p in ((status.get("outputs") or {}).get("qc_json"),) if p]
    places += [folder / p for p in QC_PLACES]
    for p in places:
        data = read_json(p)
        if data is not None:
            return data, p
    return None, None


def _report(folder: Path, status: Mapping[str, Any], qc_path: Path | None) -> Path | None:
    places = [Path(p) for p in ((status.get("outputs") or {}).get("report"),) if p]
    if qc_path is not None:
        places.append(qc_path.with_name("report.html"))
    places += [folder / "qc" / "report.html"]
    return next((p for p in places if p.is_file()), None)


def analysis_info(folder: Path, status: Mapping[str, Any], root: Path) -> dict[str, Any] | None:
    """Fibre fraction, porosity, object count and thumbnail URL of the scan's ``analysis.json``."""
    from pipeline.analyse.run import headline

    places = [Path(p) for p in ((status.get("outputs") or {}).get("analysis_json"),) if p]
    places += [folder / p for p in ANALYSIS_PLACES]
    for p in places:
        data = read_json(p)
        if data is not None and isinstance(data.get("phases"), dict):
            h = headline(data)
            thumb = p.with_name(str(h["thumbnail"])) if h.get("thumbnail") else None
            h["thumbnail"] = _file_url(thumb, root) if thumb is not None and thumb.is_file() else None
            h["json"] = _file_url(p, root)
            return h
    return None


def scan_info(folder: Path, root: Path, *, now: float | None = None) -> dict[str, Any]:
    """Everything the page shows about one scan folder."""
    now = time.time() if now is None else now
    status = read_json(folder / STATUS_FILE) or {}
    seg = Path((status.get("outputs") or {}).get("segmentation") or folder / "seg.zarr")
    ledger = ledger_progress(seg) if seg.exists() else None
    state = str(status.get("state") or "")
    error = status.get("error")
    if not state:
        state = "queued" if ledger is None else "done" if ledger["complete"] else "running"
    if state == "running" and ledger is not None and ledger["lock"]:
        lock = ledger["lock"]
        if holder_alive(lock) is False:
            state, error = "failed", f"the run writing {seg.name} died (stale lock); rerun to resume"
    progress: dict[str, Any] = {}
    live = status.get("progress") or {}
    if ledger is not None:
        progress = {"done": ledger["done"], "total": ledger["total"],
                    "percent": round(100.0 * ledger["done"] / ledger["total"], 1) if ledger["total"] else 100.0}
        if state == "running" and ledger["done"] < ledger["total"]:
            rate = live.get("voxels_per_second") if live.get("stage") == "segment" else None
            if not rate:
                started = _parse_time((ledger["lock"] or {}).get("started")) or _parse_time(status.get("started"))
                elapsed = now - started if started else 0
                rate = ledger["voxels_done"] / elapsed if elapsed > 0 and ledger["voxels_done"] else None
            if rate:
                progress["voxels_per_second"] = float(rate)
                progress["eta_seconds"] = (ledger["voxels_total"] - ledger["voxels_done"]) / float(rate)
    elif live and state == "running":
        progress = {"done": live.get("done", 0), "total": live.get("total", 0), "stage": live.get("stage"),
                    "percent": round(100.0 * live["done"] / live["total"], 1) if live.get("total") else 0.0}
        if live.get("voxels_per_second"):
            progress["voxels_per_second"] = float(live["voxels_per_second"])
        if live.get("eta_seconds"):
            progress["eta_seconds"] = float(live["eta_seconds"])
    qc, qc_path = _qc(folder, status)
    fractions: dict[str, float] = {}
    if qc and isinstance(qc.get("classes"), list):
        fractions = {str(c.get("name")): float(c.get("fraction") or 0.0) for c in qc["classes"] if isinstance(c, dict)}
    elif ledger and ledger["run"].get("class_fractions"):
        fractions = {str(k): float(v) for k, v in ledger["run"]["class_fractions"].items()}
    elif (status.get("qc") or {}).get("class_fractions"):
        fractions = {str(k): float(v) for k, v in status["qc"]["class_fractions"].items()}
    warnings = [str(w) for w in ((qc or {}).get("warnings") or (status.get("qc") or {}).get("warnings") or [])]
    report = _report(folder, status, qc_path)
    rel = folder.relative_to(root).as_posix() if folder != root else "."
    return {
        "name": str(status.get("name") or folder.name),
        "folder": rel,
        "state": state,
        "stage": status.get("stage"),
        "source": status.get("source"),
        "error": error,
        "progress": progress,
        "class_fractions": fractions,
        "qc_status": (qc or {}).get("status"),
        "seam_check": ((qc or {}).get("seam_check") or {}).get("status"),
        "warnings": warnings,
        "analysis": analysis_info(folder, status, root),
        "report": _file_url(report, root),
        "flow_run_id": status.get("flow_run_id"),
        "flow_run_url": status.get("flow_run_url"),
        "dask_dashboard": status.get("dask_dashboard") if state == "running" else None,
        "started": status.get("started") or ((ledger or {}).get("lock") or {}).get("started"),
        "finished": status.get("finished") or (ledger["run"].get("finished") if ledger else None),
        "updated": status.get("updated"),
    }


def _file_url(path: Path | None, root: Path) -> str | None:
    if path is None:
        return None
    try:
        rel = path.resolve().relative_to(root.resolve())
    except ValueError:
        return None
    return "/files/" + quote(rel.as_posix())


def waiting_scans(root: Path, known: set[str]) -> list[dict[str, Any]]:
    """Incoming scans the watcher has seen but not started (not complete yet)."""
    state = read_json(root / DEFAULT_STATE_DIR / "state.json") or {}
    out: list[dict[str, Any]] = []
    for name, look in (state.get("seen") or {}).items():
        rec = (state.get("scans") or {}).get(name) or {}
        if name in known or rec.get("state") in ("done", "queued", "running"):
            continue
        out.append({"name": str(name), "folder": None, "state": "waiting", "stage": None, "source": None,
                    "error": rec.get("error"), "progress": {}, "class_fractions": {}, "warnings": [], "analysis": None,
                    "report": None, "flow_run_id": None, "flow_run_url": None, "dask_dashboard": None,
                    "started": None, "finished": None, "updated": None, "qc_status": None, "seam_check": None,
                    "detail": f"{look.get('files', 0)} files, {look.get('bytes', 0)} bytes; waiting to be complete"})
    return out


class PrefectLinks:
    """Flow-run URLs and states from the Prefect API, when one is configured and reachable."""

    def __init__(self, api_url: str | None, ui_url: str | None, *, ttl: float = 5.0) -> None:
        self.api_url = api_url.rstrip("/") if api_url else None
        if ui_url is None and self.api_url and self.api_url.endswith("/api"):
            ui_url = self.api_url[: -len("/api")]
        self.ui_url = ui_url.rstrip("/") if ui_url else None
        self.ttl = ttl
        self._cache: dict[str, tuple[float, str | None]] = {}
        self._down_until = 0.0

    def url(self, run_id: str | None, known: str | None) -> str | None:
        if known:
            return known
        if run_id and self.ui_url:
            return f"{self.ui_url}/runs/flow-run/{quote(str(run_id))}"
        return None

    def state(self, run_id: str | None) -> str | None:
        if not run_id or not self.api_url or time.time() < self._down_until:
            return None
        hit = self._cache.get(run_id)
        if hit and time.time() - hit[0] < self.ttl:
            return hit[1]
        import httpx

        try:
            r = httpx.get(f"{self.api_url}/flow_runs/{quote(str(run_id))}", timeout=1.0)
            name = r.json().get("state", {}).get("name") if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            self._down_until = time.time() + 30  # unreachable: do not slow every page down
            return None
        self._cache[run_id] = (time.time(), name)
        return name


def collect(root: Path, links: PrefectLinks) -> list[dict[str, Any]]:
    """Every scan under ``root`` (and the watcher's waiting ones), running first, then by name."""
    scans = [scan_info(f, root) for f in find_scan_folders(root)]
    for s in scans:
        url = links.url(s["flow_run_id"], s["flow_run_url"])
        s["flow_run_url"] = url if url and safe_url(url) != "#" else None
        if s["dask_dashboard"] and safe_url(s["dask_dashboard"]) == "#":
            s["dask_dashboard"] = None
        s["prefect_state"] = links.state(s["flow_run_id"])
    scans += waiting_scans(root, {s["name"] for s in scans} | {Path(s["folder"]).name for s in scans if s["folder"]})
    scans.sort(key=lambda s: (STATE_ORDER.get(s["state"], 9), s["name"]))
    return scans


def series(scans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trends across the scans of a series: the analysed scans of one parent folder, in time order.

    A series is what a watched folder (or any folder of scan folders) holds: ``output_root/<scan>``.
    Each has ``name`` (the parent folder, ``.`` for the root), ``points`` (``scan``, ``time``,
    ``fibre``, ``porosity``: fractions or ``None``) and ``fibre_class`` / ``pore_class``; only
    series of two or more analysed scans are returned.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for s in scans:
        a = s.get("analysis")
        if not a or not s.get("folder") or s["folder"] == ".":
            continue
        parent = PurePosixPath(s["folder"]).parent.as_posix()
        groups.setdefault(parent, []).append(s)
    out: list[dict[str, Any]] = []
    for parent, members in sorted(groups.items()):
        if len(members) < 2:
            continue
        members.sort(key=lambda s: (_parse_time(s.get("started")) or _parse_time(s["analysis"].get("finished"))
                                    or 0.0, s["name"]))
        points = [{"scan": s["name"], "time": s.get("started") or s["analysis"].get("finished"),
                   "fibre": (s["analysis"]["fibre"] or {}).get("fraction"),
                   "porosity": (s["analysis"]["pore"] or {}).get("fraction")} for s in members]
        first = members[0]["analysis"]
        out.append({"name": parent, "points": points, "fibre_class": (first["fibre"] or {}).get("class"),
                    "pore_class": (first["pore"] or {}).get("class"), "chart": trend_chart(points)})
    return out


def trend_chart(points: list[dict[str, Any]], width: int = 360, height: int = 120) -> dict[str, Any]:
    """Polylines (SVG point lists, percent scale shared by both series) of fibre fraction and porosity."""
    values = [100 * float(p[k]) for p in points for k in ("fibre", "porosity") if p[k] is not None]
    top = max(values, default=1.0) * 1.1 or 1.0
    pad = 24
    step = (width - 2 * pad) / max(len(points) - 1, 1)

    def line(key: str) -> str:
        return " ".join(f"{pad + i * step:.1f},{height - pad - (height - 2 * pad) * 100 * float(p[key]) / top:.1f}"
                        for i, p in enumerate(points) if p[key] is not None)

    return {"width": width, "height": height, "pad": pad, "top": round(top, 3), "fibre": line("fibre"),
            "porosity": line("porosity")}


def safe_url(url: Any) -> str:
    """Only http(s) links and this dashboard's own /files/ links; anything else becomes ``#``."""
    text = str(url or "")
    if text.startswith(("http://", "https://", "/files/")) and not any(c in text for c in "\"'<> \n"):
        return text
    return "#"


def safe_path(root: Path, path: str) -> Path | None:
    """``root/path`` if it is a regular file inside ``root`` (symlinks resolved), else None."""
    if not path or "\x00" in path or "\\" in path:
        return None
    rel = PurePosixPath(path)
    if rel.is_absolute() or any(part in ("..", "") for part in path.split("/")) or path.startswith("~"):
        return None
    target = (root / rel).resolve()
    try:
        target.relative_to(root)
    except ValueError:
        return None
    return target if target.is_file() else None


