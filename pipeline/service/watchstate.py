"""The watcher's record: ``<state_dir>/state.json`` (what was seen, processed, failed) and its claims.

``state.json`` is edited read-modify-write under ``flock`` and replaced atomically, so it
survives restarts and overlapping firings. A scan is started only by whoever creates
``claims/<name>.claim`` with ``O_CREAT | O_EXCL``; a claim whose process died on this host is
taken over (renamed away by exactly one of the competing firings). No Prefect here.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.core.hosts import holder_alive, holder_info
from pipeline.service.runstate import atomic_write_json, now_iso, read_json

logger = logging.getLogger(__name__)

STATE_SCHEMA = "studios-watch/1"


class WatchState:
    """``state.json`` + ``claims/`` of one watched folder (see :mod:`pipeline.service.incoming`)."""

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
        payload = json.dumps({**info, **holder_info(), "claimed": now_iso()})
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
        return holder_alive(holder) is False

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
