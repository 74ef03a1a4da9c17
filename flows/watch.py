"""Scheduled beamline processing: ``watch_folder`` finds new complete scans and processes each once.

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
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow

from flows.runstate import RunStatus, atomic_write_json, now_iso, read_json
from pipeline.core import interrupt

logger = logging.getLogger(__name__)

STATE_SCHEMA = "studios-watch/1"
SCAN_SUFFIXES = (".tif", ".tiff", ".h5", ".hdf5", ".hdf", ".nxs", ".npy", ".zarr", ".raw", ".vol", ".bin", ".dat")
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
    from pipeline.core.runconfig import scan_name_for

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


# ------------------------------------------------------------------------------- state


class WatchState:
    """``state.json`` + ``claims/`` of one watched folder (see the module docstring)."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.path = state_dir / "state.json"
        self.claims = state_dir / "claims"
        self.claims.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def edit(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write the state under an exclusive lock; written atomically on exit."""
        with open(self.dir / "state.lock", "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                data = self.read()
                yield data
                atomic_write_json(self.path, data)
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def read(self) -> dict[str, Any]:
        data = read_json(self.path)
        if data is None and self.path.exists():
            # never silently forget what was processed: keep the unreadable file for a person
            broken = self.path.with_name(f"state.json.unreadable-{int(time.time())}")
            os.replace(self.path, broken)
            logger.error("%s was unreadable; moved to %s; claims still prevent reprocessing", self.path, broken)
        data = data or {}
        data.setdefault("schema", STATE_SCHEMA)
        data.setdefault("scans", {})
        data.setdefault("seen", {})
        return data

    # claims ---------------------------------------------------------------------------------
    def claim_path(self, name: str) -> Path:
        return self.claims / f"{name}.claim"

    def claim(self, name: str, info: dict[str, Any]) -> bool:
        """Create the claim with O_EXCL; take over a claim whose process died on this host."""
        path = self.claim_path(name)
        payload = json.dumps({**info, "host": socket.gethostname(), "pid": os.getpid(), "claimed": now_iso()})
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._stale(path):
                    return False
                try:  # exactly one of several competing firings wins this rename
                    os.rename(path, path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:8]}"))
                except FileNotFoundError:
                    return False
                logger.warning("%s: taking over the claim of a run that died", name)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(payload)
            return True
        return False

    def release(self, name: str) -> None:
        self.claim_path(name).unlink(missing_ok=True)

    def _stale(self, path: Path) -> bool:
        holder = read_json(path)
        if holder is None or holder.get("state") == "done":
            return False
        if holder.get("host") != socket.gethostname():
            return False
        pid = int(holder.get("pid") or 0)
        if pid <= 0 or pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def recover(self, data: dict[str, Any]) -> list[str]:
        """Scans left queued/running by a run that died (claim gone or stale) become ``interrupted``."""
        found = []
        for name, rec in data["scans"].items():
            if rec.get("state") in ("queued", "running"):
                claim = self.claim_path(name)
                if not claim.exists() or self._stale(claim):
                    rec.update(state="interrupted", error="the run processing it stopped; it is resumed")
                    found.append(name)
        return found

    def mark_claim_done(self, name: str) -> None:
        path = self.claim_path(name)
        info = read_json(path) or {}
        with contextlib.suppress(OSError):
            atomic_write_json(path, {**info, "state": "done", "finished": now_iso()})


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


# ------------------------------------------------------------------------------- the flow


def _watch_settings(
    config: str | None, incoming: str | None, output_root: str | None, overrides: dict[str, Any]
) -> tuple[Path, Path, dict[str, Any]]:
    """(incoming, output_root, watch options) from the profile's ``watch:``/``output`` and parameters."""
    from pipeline.core.config import load_yaml, parse_section
    from pipeline.core.errors import ConfigError
    from pipeline.core.runconfig import WatchOptions

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
    return inc, Path(str(root)).expanduser().absolute(), {
        "completion": opts.completion, "settle_seconds": opts.settle_seconds, "marker": opts.marker,
        "state_dir": opts.state_dir, "max_scans": opts.max_scans,
    }


@flow(name="watch-folder")
def watch_folder(
    incoming: str | None = None,
    output_root: str | None = None,
    config: str | None = None,
    completion: str | None = None,
    settle_seconds: float | None = None,
    marker: str | None = None,
    state_dir: str | None = None,
    max_scans: int | None = None,
    model: dict[str, Any] | None = None,
    ingest: dict[str, Any] | None = None,
    segment: dict[str, Any] | None = None,
    cluster: dict[str, Any] | None = None,
    qc: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One look at ``incoming``: process every new complete scan into ``output_root/<name>``.

    ``config`` is a run profile (e.g. ``configs/beamline.yaml``): its ``watch:`` section gives
    the folder and the completion rule, its other sections how each scan is processed; the
    parameters here override it. Scans run one after another through ``process_scan`` (as
    subflows); the blocks of each run in parallel on its cluster.
    """
    from flows.logs import library_logs
    from flows.process import process_scan
    from flows.reporting import md, publish_markdown
    from pipeline.core.runconfig import load_run_config, merge_sections, parse_run_config

    with library_logs():
        inc, root, opts = _watch_settings(config, incoming, output_root, {
            "completion": completion, "settle_seconds": settle_seconds, "marker": marker, "state_dir": state_dir,
            "max_scans": max_scans})
        sections = {"model": model, "ingest": ingest, "segment": segment, "cluster": cluster, "qc": qc}
        # the processing template is checked once per firing, before any scan is claimed
        if config:
            load_run_config(config, overrides=sections, require_source=False)
        else:
            parse_run_config(merge_sections({}, sections), "watch_folder parameters", require_source=False)
        root.mkdir(parents=True, exist_ok=True)
        state = WatchState(Path(opts["state_dir"]) if opts["state_dir"] else root / ".studios-watch")
        from prefect.runtime import flow_run

        firing = str(flow_run.get_id() or uuid.uuid4())
        candidates = discover(inc, opts["marker"])
        claimed: list[Candidate] = []
        with state.edit() as data:
            for name in state.recover(data):
                logger.warning("watch: %s was interrupted (its run died); processing it again", name)
            ready, waiting = ready_scans(candidates, data, completion=opts["completion"],
                                         settle_seconds=opts["settle_seconds"])
            for c in ready:
                if opts["max_scans"] and len(claimed) >= opts["max_scans"]:
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
                    inc, len(candidates), len(claimed), len(waiting))
        results: dict[str, dict[str, Any]] = {}
        with interrupt.handling():  # SIGTERM / SIGINT: the running scan stops cleanly, the rest wait
            for c in claimed:
                if interrupt.requested() is not None:
                    _unclaim(state, c, "the watcher was stopped before it started this scan")
                    continue
                results[c.name] = _process_one(state, c, root, config, sections, process_scan)
        rows = ["| scan | outcome | detail |", "| --- | --- | --- |"]
        rows += [f"| {md(n)} | {md(r['state'])} | {md(r.get('error') or r.get('output', ''))} |"
                 for n, r in results.items()]
        rows += [f"| {md(n)} | waiting | {md(why)} |" for n, why in waiting.items()]
        publish_markdown("watch-folder", "\n".join([
            f"# watch {md(inc)}", "", f"{len(results)} processed now, {len(waiting)} waiting, "
            f"{sum(r['state'] == 'failed' for r in results.values())} failed", "", *rows, ""]),
            f"look at {inc}")
        interrupt.check(f"watch {inc} stopped; {sum(r['state'] == 'done' for r in results.values())} scan(s) "
                        "done, the interrupted one resumes at the next firing")
        return {"incoming": str(inc), "output_root": str(root), "processed": results, "waiting": waiting}


def _unclaim(state: WatchState, c: Candidate, why: str) -> None:
    """Leave ``c`` for the next firing: state ``interrupted`` (processed again, resuming), claim released."""
    with state.edit() as data:
        data["scans"][c.name].update(state="interrupted", error=why, finished=now_iso())
    state.release(c.name)


def _process_one(
    state: WatchState, c: Candidate, root: Path, config: str | None, sections: dict[str, Any], process_scan: Any
) -> dict[str, Any]:
    out = root / c.name
    with state.edit() as data:
        rec = data["scans"][c.name]
        rec.update(state="running", started=now_iso(), attempts=int(rec.get("attempts", 0)) + 1)
    t0 = time.perf_counter()
    try:
        run_state = process_scan(source=str(c.path), output=str(out), name=c.name, config=config,
                                 return_state=True, **{k: v for k, v in sections.items() if v is not None})
        ok = run_state.is_completed()
        error = None if ok else _state_error(run_state)
    except Exception as exc:  # the subflow could not even start
        ok, error = False, f"{type(exc).__name__}: {exc}".splitlines()[0]
    if not ok and interrupt.requested() is not None:  # stopped by a signal, not failed: resume next firing
        _unclaim(state, c, error or "interrupted")
        RunStatus(out, name=c.name).update(state="failed", error=error, finished=now_iso())
        logger.warning("watch: %s interrupted (%s); the next firing resumes it", c.name, error)
        return {"state": "interrupted", "output": str(out), "error": error}
    outcome = {"state": "done" if ok else "failed", "output": str(out), "finished": now_iso(),
               "seconds": round(time.perf_counter() - t0, 2), "error": error}
    with state.edit() as data:
        data["scans"][c.name].update(outcome)
    if ok:
        state.mark_claim_done(c.name)
        logger.info("watch: %s done -> %s", c.name, out)
    else:
        state.release(c.name)
        RunStatus(out, name=c.name).update(state="failed", error=error, finished=now_iso())
        logger.error("watch: %s failed: %s", c.name, error)
    return outcome


def _state_error(run_state: Any) -> str:
    try:
        run_state.result()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return str(getattr(run_state, "message", None) or run_state.type)
