"""Processes on this host: is the holder of a lock, claim or run still alive?

Locks and claims record who holds them (:func:`holder_info`: host, pid and the process's start
time). :func:`pid_alive` answers whether that process still runs; given the recorded start
time it also tells a *reused* pid (the holder died and the kernel gave its number to a newer
process) from the holder itself. Standard library and ``psutil`` only.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

import psutil

#: Seconds two readings of one process's start time may differ by (clock ticks, rounding).
START_TOLERANCE = 1.0


def hostname() -> str:
    """This host's name as locks record it."""
    return socket.gethostname()


def process_start_time(pid: int) -> float | None:
    """Start time of process ``pid`` (seconds since the epoch), or None if there is none."""
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except (psutil.AccessDenied, OSError, ValueError, OverflowError):
        return None


def pid_alive(pid: int, *, started: float | None = None) -> bool:
    """Whether process ``pid`` exists on this host (and, with ``started``, is the same process).

    Args:
        pid: a process id; ``<= 0`` is never alive.
        started: the process's start time as recorded by :func:`holder_info`; a process with
            this pid that started at another time is a different one (the pid was reused).
    """
    if pid <= 0:
        return False
    try:
        if not psutil.pid_exists(pid):
            return False
    except (OverflowError, ValueError):
        return False
    if started is None:
        return True
    now = process_start_time(pid)
    if now is None:  # exists but cannot be inspected (another user): assume it is the holder
        return True
    return abs(now - started) <= START_TOLERANCE


def holder_info() -> dict[str, Any]:
    """Who this process is, for a lock or claim file: ``host``, ``pid``, ``pid_started``."""
    pid = os.getpid()
    return {"host": hostname(), "pid": pid, "pid_started": process_start_time(pid)}


def holder_alive(holder: Mapping[str, Any]) -> bool | None:
    """Whether the process a lock/claim record names is alive; None if it is on another host.

    ``holder`` holds ``host`` and ``pid``, and ``pid_started`` when :func:`holder_info` wrote it.
    """
    if holder.get("host") != hostname():
        return None
    try:
        pid = int(holder.get("pid") or 0)
    except (TypeError, ValueError):
        return False
    raw = holder.get("pid_started")
    started = float(raw) if isinstance(raw, int | float) and not isinstance(raw, bool) else None
    return pid_alive(pid, started=started)
