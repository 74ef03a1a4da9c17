"""Who holds a lock, and whether that holder can still be alive.

A lock file names its holder with a :class:`Holder` (host, pid, the process's start time, when
the lock was taken). Its *lease* is the lock file's modification time, which the holder renews
every :data:`LEASE_PERIOD` seconds from a :class:`Heartbeat` thread (in the style of igneous'
FileQueue leases). Whether the holder is gone is decided by :func:`holder_state`:

- same host: the pid no longer exists, or exists with another start time (the pid was reused),
  means the holder is dead; a live process with the recorded start time is alive;
- another host: a lease not renewed for :data:`LEASE_STALE` seconds (several periods) is stale.

Clocks of the hosts that share a filesystem must agree to well within :data:`LEASE_STALE` (NTP).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import Enum

import psutil

logger = logging.getLogger(__name__)

#: Seconds between lease renewals by the holder.
LEASE_PERIOD = 5.0
#: A lease older than this (six periods) is stale: its holder stopped renewing it.
LEASE_STALE = 30.0


@dataclass(frozen=True, slots=True)
class Holder:
    """The process holding a lock.

    Attributes:
        host: ``socket.gethostname()`` of the holder.
        pid: its process id.
        pid_started: its start time (seconds since the epoch, from psutil), to detect pid reuse.
        started: when the lock was taken (ISO 8601, UTC).
    """

    host: str
    pid: int
    pid_started: float
    started: str

    @classmethod
    def me(cls) -> Holder:
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            pid_started=process_start_time(os.getpid()) or 0.0,
            started=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Holder:
        return cls(
            host=str(data.get("host", "?")),
            pid=int(str(data.get("pid", 0)) or 0),
            pid_started=float(str(data.get("pid_started", 0.0)) or 0.0),
            started=str(data.get("started", "?")),
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started}"


class State(Enum):
    """What can be said about a lock's holder."""

    ALIVE = "alive"  # a live process, or a lease renewed recently
    DEAD = "dead"  # provably gone: take the lock over
    UNKNOWN = "unknown"  # cannot be decided (a live pid, but no start time recorded)


def process_start_time(pid: int) -> float | None:
    """Start time of ``pid`` (seconds since the epoch), or None if there is no such process."""
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:  # exists, but belongs to someone else and hides its details
        return -1.0


def holder_state(holder: Holder | None, lease_age: float, *, stale_after: float = LEASE_STALE) -> tuple[State, str]:
    """Decide whether ``holder`` (whose lease was last renewed ``lease_age`` s ago) is alive.

    Returns:
        The state and a short reason for the log line.
    """
    if holder is None:
        if lease_age > stale_after:
            return State.DEAD, f"unreadable lock not renewed for {lease_age:.0f}s"
        return State.ALIVE, "lock file being written"
    if holder.host != socket.gethostname():
        if lease_age > stale_after:
            return State.DEAD, f"lease not renewed for {lease_age:.0f}s (more than {stale_after:.0f}s)"
        return State.ALIVE, f"lease renewed {lease_age:.0f}s ago"
    started = process_start_time(holder.pid) if holder.pid > 0 else None
    if started is None:
        return State.DEAD, f"pid {holder.pid} is gone"
    if started < 0:
        return State.ALIVE, f"pid {holder.pid} exists (owned by another user)"
    if holder.pid_started and abs(started - holder.pid_started) > 1.0:
        return State.DEAD, f"pid {holder.pid} now belongs to another process (reused)"
    if not holder.pid_started:
        if lease_age > stale_after:
            return State.DEAD, f"pid {holder.pid} exists but the lock was not renewed for {lease_age:.0f}s"
        return State.UNKNOWN, f"pid {holder.pid} exists; the lock records no start time"
    return State.ALIVE, f"pid {holder.pid} is running"


class Heartbeat:
    """Renew a lease (the mtime of the open file ``fd``) every ``period`` seconds until stopped."""

    def __init__(self, fd: int, label: str, *, period: float = LEASE_PERIOD) -> None:
        self.fd = fd
        self.label = label
        self.period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease {label}", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                os.utime(self.fd)
            except OSError as exc:  # the filesystem hiccuped: try again next period
                logger.warning("%s: could not renew the lock's lease: %s", self.label, exc)

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(RuntimeError):
            self._thread.join(timeout=self.period + 1)


def lease_age(mtime: float) -> float:
    """Seconds since ``mtime`` by this host's clock (never negative)."""
    return max(0.0, time.time() - mtime)
