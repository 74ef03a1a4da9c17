"""Graceful stops on SIGTERM and SIGINT.

SLURM at walltime, ``kill``, systemd and container runtimes send SIGTERM; Ctrl-C sends SIGINT.
Inside :func:`handling` (installed by the ``studios`` command around every subcommand) the first
such signal only *records* a stop request; the long loops (the block executors, ingest's slabs,
training's epochs, the watcher's scans) call :func:`requested` or :func:`check`, stop starting
new work, let running work finish within a bounded grace period, record what finished and
raise :class:`Interrupted`, whose exit status is 143 (SIGTERM) or 130 (SIGINT). Locks and
temporary outputs are released by the ordinary ``with`` blocks on the way out. A second SIGINT
stops at once (``KeyboardInterrupt``), still through those ``with`` blocks; a repeated SIGTERM
(SLURM sends one before the walltime and one at it) changes nothing.

Without :func:`handling` (library use in a notebook), signals keep Python's default behaviour.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType

from pipeline.core.errors import StudiosError

logger = logging.getLogger(__name__)

#: Seconds running blocks get to finish after a stop request before they are abandoned.
GRACE_SECONDS = 20.0
EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}
RESUME_HINT = "run the same command to resume"

_event = threading.Event()
_signal: list[int] = []
_depth: list[int] = [0]


class Interrupted(StudiosError):
    """The run stopped on SIGTERM / SIGINT after recording what finished.

    Attributes:
        signum: the signal received; ``exit_code`` is 128 + signum (143 or 130).
    """

    exit_code = 143

    def __init__(self, message: str, signum: int = signal.SIGTERM) -> None:
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum


def requested() -> int | None:
    """The signal number of a pending stop request, or None."""
    return _signal[0] if _event.is_set() and _signal else None


def request(signum: int = signal.SIGTERM) -> None:
    """Ask the running loops to stop, as if ``signum`` had arrived (also used by tests)."""
    if not _event.is_set():
        _signal[:] = [int(signum)]
        _event.set()


def clear() -> None:
    """Forget a stop request (a new run in the same process starts clean)."""
    _event.clear()
    _signal.clear()


def wait(timeout: float) -> bool:
    """Sleep up to ``timeout`` s, waking early on a stop request; True if one is pending."""
    return _event.wait(timeout)


def check(what: str) -> None:
    """Raise :class:`Interrupted` ("interrupted: <what>; ...") if a stop was requested."""
    signum = requested()
    if signum is not None:
        raise Interrupted(f"interrupted: {what}", signum)


def _handler(signum: int, frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    if _event.is_set():
        if signum == signal.SIGINT:  # Ctrl-C twice: the user insists
            raise KeyboardInterrupt(f"second {name}: stopping now")
        logger.warning("%s received again: still stopping", name)  # SLURM / systemd repeat SIGTERM
        return
    logger.warning("%s received: finishing running work (up to %.0fs), then stopping", name, GRACE_SECONDS)
    request(signum)


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """Turn SIGTERM / SIGINT into stop requests while inside (main thread only).

    Re-entrant, and re-installs itself where other code (Prefect's flow engine) replaced the
    handlers in between; a pending request is cleared only by the outermost entry.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in EXIT_CODES}
    if all(h is _handler for h in previous.values()):
        yield
        return
    try:
        for s in EXIT_CODES:
            signal.signal(s, _handler)
    except ValueError:  # pragma: no cover - not the main interpreter
        yield
        return
    outermost = _depth[0] == 0
    if outermost:
        clear()
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1
        for s, h in previous.items():
            signal.signal(s, h)


def exit_code(default: int = 130) -> int:
    """Exit status for a stop: 128 + the signal received, else ``default``."""
    signum = requested()
    return 128 + signum if signum is not None else default
