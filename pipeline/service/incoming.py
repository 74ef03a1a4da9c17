"""The exactly-once incoming-folder watcher: which scans are complete, claimed, done or failed.

A *scan* in the incoming folder is a folder (a TIFF stack, or a ``.zarr``) or a file with a
known suffix (``.tif``, ``.h5``, ``.nxs``, ``.npy``, raw ...). Hidden names, marker files and
temporary names (``*.tmp``, ``*.part``, ``*~``) are never scans. A scan is *complete* when

- ``marker``: its marker exists — ``<entry><marker>`` or ``<stem><marker>`` beside it (e.g.
  ``scan_007.complete``), or ``DONE`` / ``<marker>`` inside a scan folder; or
- ``settled``: its file set (names, sizes, mtimes) was seen unchanged on two looks at least
  ``settle_seconds`` apart (looks are schedule firings; the first sighting never counts);
- ``either`` (the default): whichever comes first.

A TIFF stack still being written changes between looks, so it is not picked up until it
settles; with ``completion: marker`` only the writer's marker counts.

Exactly once: every scan that is started is first *claimed* by creating
``<state_dir>/claims/<name>.claim`` with ``O_CREAT | O_EXCL`` (one winner, even when two
firings overlap or run on two hosts sharing the filesystem), and its outcome is recorded in
``<state_dir>/state.json`` (read-modify-write under ``flock``, replaced atomically), which
survives restarts. Done scans are never processed again. A failed scan is recorded with its
error and its claim released; it is retried only once its files change. A claim whose process
died on this host (a crashed run) is taken over by the next firing (the segmentation resumes).
The state directory defaults to ``<output_root>/.studios-watch``.

One *look* (:func:`claim_ready`) discovers, decides and claims; each claimed scan is then run
through :func:`process_claimed` with a caller-given function (the Prefect flow
``flows.watch.watch_folder`` passes one that runs the ``process_scan`` subflow). No Prefect here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core import interrupt
from pipeline.core.errors import ConfigError, one_line
from pipeline.core.settings import WatchOptions, scan_name_for
from pipeline.io.sources import READABLE_SUFFIXES
from pipeline.service.runstate import RunStatus, now_iso
from pipeline.service.watchstate import STATE_SCHEMA, WatchState

__all__ = ["STATE_SCHEMA", "Candidate", "Look", "WatchSettings", "WatchState", "claim_ready", "discover",
           "fingerprint", "process_claimed", "ready_scans", "watch_settings"]

logger = logging.getLogger(__name__)

DEFAULT_STATE_DIR = ".studios-watch"
DEFAULT_INTERVAL = 120.0
SCAN_SUFFIXES = READABLE_SUFFIXES
TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", "~", ".lock", ".swp")
INNER_MARKERS = ("DONE",)


# ------------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class Candidate:
    """A scan found in the incoming folder."""

    name: str
    path: Path
    fingerprint: str
    files: int
    bytes: int
    marker: bool


def _is_scan_entry(entry: Path, marker: str) -> bool:
    name = entry.name
    if name.startswith(".") or name.endswith(marker) or name in INNER_MARKERS:
        return False
    if any(name.endswith(s) for s in TEMP_SUFFIXES):
        return False
    if entry.is_dir():
        return True
    return entry.is_file() and entry.suffix.lower() in SCAN_SUFFIXES


def fingerprint(path: Path, marker: str = ".complete") -> tuple[str, int, int]:
    """(digest, files, bytes) over the names, sizes and mtimes of a scan's files."""
    rows: list[str] = []
    total = 0
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for f in sorted(files):
                if f in INNER_MARKERS or f == marker:
                    continue
                p = Path(root) / f
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue  # removed while listing: the next look sees the change
                rows.append(f"{p.relative_to(path)}\t{st.st_size}\t{st.st_mtime_ns}")
                total += st.st_size
    else:
        st = path.stat()
        rows.append(f"{path.name}\t{st.st_size}\t{st.st_mtime_ns}")
        total = st.st_size
    digest = hashlib.sha256("\n".join(rows).encode()).hexdigest()[:20]
    return digest, len(rows), total


def has_marker(path: Path, marker: str) -> bool:
    beside = [path.with_name(path.name + marker)]
    if path.is_file() or path.suffix:
        beside.append(path.with_name(path.stem + marker))
    inside = [path / m for m in (*INNER_MARKERS, marker)] if path.is_dir() else []
    return any(p.exists() for p in (*beside, *inside))


def safe_name(text: str) -> str:
    name = re.sub(r"[^\w.+-]+", "_", text).strip("._") or "scan"
    return name[:128]


def discover(incoming: Path, marker: str = ".complete") -> list[Candidate]:
    """All scan entries in ``incoming``, oldest first, with unique names."""
    entries = []
    for entry in incoming.iterdir():
        try:
            if _is_scan_entry(entry, marker):
                entries.append((entry.stat().st_mtime, entry))
        except FileNotFoundError:
            continue
    found: list[Candidate] = []
    used: set[str] = set()
    for _mtime, entry in sorted(entries, key=lambda t: (t[0], t[1].name)):
        try:
            digest, n_files, n_bytes = fingerprint(entry, marker)
        except FileNotFoundError:
            continue
        name = safe_name(scan_name_for(entry))
        if name in used:
            name = safe_name(entry.name)
        used.add(name)
        found.append(Candidate(name, entry, digest, n_files, n_bytes, has_marker(entry, marker)))
    return found


def ready_scans(
    candidates: list[Candidate],
    state: dict[str, Any],
    *,
    completion: str,
    settle_seconds: float,
    now: float | None = None,
) -> tuple[list[Candidate], dict[str, str]]:
    """Which candidates may be processed now; updates ``state["seen"]`` (the looks).

    Returns (ready, waiting) where waiting maps a scan name to why it waits.
    """
    now = time.time() if now is None else now
    seen: dict[str, Any] = state["seen"]
    scans: dict[str, Any] = state["scans"]
    ready: list[Candidate] = []
    waiting: dict[str, str] = {}
    present = set()
    for c in candidates:
        present.add(c.name)
        record = scans.get(c.name)
        if record and record.get("state") in ("done", "running", "queued"):
            if record.get("state") == "done" and record.get("fingerprint") != c.fingerprint:
                waiting[c.name] = "already processed (files changed since; not reprocessed)"
            continue
        if record and record.get("state") == "failed" and record.get("fingerprint") == c.fingerprint:
            waiting[c.name] = "failed earlier; waits for its files to change"
            continue
        look = seen.get(c.name)
        if look is None or look.get("fingerprint") != c.fingerprint:
            seen[c.name] = look = {"fingerprint": c.fingerprint, "since": now, "files": c.files, "bytes": c.bytes}
        look["last"] = now
        if c.files == 0:
            waiting[c.name] = "empty"
            continue
        marked = c.marker and completion in ("marker", "either")
        settled = completion in ("settled", "either") and look["since"] < now and now - look["since"] >= settle_seconds
        if marked or settled:
            ready.append(c)
        elif completion == "marker":
            waiting[c.name] = "no completion marker yet"
        else:
            age = now - look["since"]
            waiting[c.name] = f"settling: unchanged for {age:.0f}s of {settle_seconds:.0f}s"
    for name in list(seen):
        if name not in present:
            del seen[name]
    return ready, waiting


# ------------------------------------------------------------------------------- one look


@dataclass(frozen=True)
class WatchSettings:
    """Where and how to look: the profile's ``watch:`` section merged with the flow's parameters."""

    incoming: Path
    output_root: Path
    completion: str = "either"
    settle_seconds: float = 120.0
    marker: str = ".complete"
    state_dir: Path | None = None
    max_scans: int = 0

    @property
    def state_path(self) -> Path:
        """The state directory (default ``<output_root>/.studios-watch``)."""
        return self.state_dir if self.state_dir is not None else self.output_root / DEFAULT_STATE_DIR


def watch_settings(
    config: str | None, incoming: str | None, output_root: str | None, overrides: Mapping[str, Any]
) -> WatchSettings:
    """The settings from the profile ``config`` (its ``watch:`` and ``output``) and parameters.

    Raises:
        ConfigError: a bad ``watch:`` key or value, no output root, or no incoming folder.
    """
    from pipeline.core.schema import load_yaml, parse_section

    data = load_yaml(config) if config else {}
    section = dict(data.get("watch") or {})
    if incoming:
        section["incoming"] = incoming
    section.update({k: v for k, v in overrides.items() if v is not None})
    where = f"{config}: watch" if config else "watch_folder parameters"
    opts = parse_section(section, WatchOptions, where)
    root = output_root or data.get("output")
    if not root:
        raise ConfigError(f"{where}: no output root; give output_root or 'output' in the profile")
    inc = Path(opts.incoming).expanduser().absolute()
    if not inc.is_dir():
        raise ConfigError(f"{where}: incoming folder {inc} does not exist; create it or fix the path")
    return WatchSettings(inc, Path(str(root)).expanduser().absolute(), completion=opts.completion,
                         settle_seconds=opts.settle_seconds, marker=opts.marker,
                         state_dir=Path(opts.state_dir) if opts.state_dir else None, max_scans=opts.max_scans)


def watch_schedule(
    options: WatchOptions, *, interval: float | None = None, cron: str | None = None
) -> tuple[str, float | str]:
    """When the watcher looks: ``("interval", seconds)`` or ``("cron", expression)``.

    ``interval`` / ``cron`` (e.g. ``studios serve --interval``) win over the profile's
    ``watch.interval`` / ``watch.cron`` (``options``); the default is every
    :data:`DEFAULT_INTERVAL` seconds.
    """
    if interval is not None:
        return "interval", float(interval)
    chosen = cron or options.cron
    if chosen:
        return "cron", chosen
    return "interval", float(options.interval or DEFAULT_INTERVAL)


@dataclass(frozen=True)
class Look:
    """One look at the incoming folder: how many scans were seen, those claimed, those waiting (why)."""

    seen: int
    claimed: tuple[Candidate, ...]
    waiting: dict[str, str]


def claim_ready(state: WatchState, settings: WatchSettings, *, firing: str | None = None) -> Look:
    """Discover, recover interrupted scans, decide which are ready and claim them (exactly once).

    Each claimed scan is recorded ``queued`` in ``state.json`` and in its run-status file.
    ``firing`` identifies this look (the flow run's id) in the claims and records.
    """
    firing = firing or str(uuid.uuid4())
    root = settings.output_root
    candidates = discover(settings.incoming, settings.marker)
    claimed: list[Candidate] = []
    with state.edit() as data:
        for name in state.recover(data):
            logger.warning("watch: %s was interrupted (its run died); processing it again", name)
        ready, waiting = ready_scans(candidates, data, completion=settings.completion,
                                     settle_seconds=settings.settle_seconds)
        for c in ready:
            if settings.max_scans and len(claimed) >= settings.max_scans:
                waiting[c.name] = "ready; left for the next firing (max_scans)"
                continue
            if not state.claim(c.name, {"scan": str(c.path), "fingerprint": c.fingerprint, "firing": firing}):
                waiting[c.name] = "claimed by another firing"
                continue
            claimed.append(c)
            data["scans"][c.name] = {
                "state": "queued", "source": str(c.path), "output": str(root / c.name),
                "fingerprint": c.fingerprint, "queued": now_iso(), "firing": firing,
                "attempts": int((data["scans"].get(c.name) or {}).get("attempts", 0)),
            }
            RunStatus(root / c.name, name=c.name).update(state="queued", source=str(c.path),
                                                          output=str(root / c.name), queued=now_iso())
    logger.info("watch %s: %d scans seen, %d to process now, %d waiting",
                settings.incoming, len(candidates), len(claimed), len(waiting))
    return Look(len(candidates), tuple(claimed), waiting)


#: Processes one claimed scan into its output folder; returns ``None`` on success, else the error.
ScanRunner = Callable[[Candidate, Path], "str | None"]


def process_claimed(state: WatchState, c: Candidate, output_root: Path, run: ScanRunner) -> dict[str, Any]:
    """Run one claimed scan through ``run`` and record the outcome (done: claim kept; failed: released).

    An exception from ``run`` is recorded as the scan's failure, never raised: one bad scan
    does not stop the others.
    """
    out = output_root / c.name
    with state.edit() as data:
        rec = data["scans"][c.name]
        rec.update(state="running", started=now_iso(), attempts=int(rec.get("attempts", 0)) + 1)
    t0 = time.perf_counter()
    try:
        error = run(c, out)
    except Exception as exc:
        error = f"{type(exc).__name__}: {one_line(exc)}"
    ok = error is None
    outcome = {"state": "done" if ok else "failed", "output": str(out), "finished": now_iso(),
               "seconds": round(time.perf_counter() - t0, 2), "error": error}
    with state.edit() as data:
        data["scans"][c.name].update(outcome)
    if ok:
        state.mark_claim_done(c.name)
        logger.info("watch: %s done -> %s", c.name, out)
    elif interrupt.requested() is not None:  # stopped by a signal, not failed: resume at the next firing
        unclaim(state, c, error or "interrupted")
        RunStatus(out, name=c.name).update(state="failed", error=error, finished=now_iso())
        logger.warning("watch: %s interrupted (%s); the next firing resumes it", c.name, error)
        return {**outcome, "state": "interrupted"}
    else:
        state.release(c.name)
        RunStatus(out, name=c.name).update(state="failed", error=error, finished=now_iso())
        logger.error("watch: %s failed: %s", c.name, error)
    return outcome


def process_all(state: WatchState, claimed: Sequence[Candidate], output_root: Path, run: ScanRunner
                ) -> dict[str, dict[str, Any]]:
    """:func:`process_claimed` for each claimed scan in turn; after a stop request the scans not yet
    started are released for the next firing (state ``interrupted``)."""
    results: dict[str, dict[str, Any]] = {}
    for c in claimed:
        if interrupt.requested() is not None:
            unclaim(state, c, "the watcher was stopped before it started this scan")
            results[c.name] = {"state": "interrupted", "output": str(output_root / c.name), "error": None}
            continue
        results[c.name] = process_claimed(state, c, output_root, run)
    return results


def unclaim(state: WatchState, c: Candidate, why: str) -> None:
    """Leave ``c`` for the next firing: state ``interrupted`` (processed again, resuming), claim released."""
    with state.edit() as data:
        data["scans"][c.name].update(state="interrupted", error=why, finished=now_iso())
    state.release(c.name)
