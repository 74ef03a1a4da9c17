"""Safe outputs: validation, atomic replacement and exclusive locks.

- :func:`check_output` refuses to overwrite without ``overwrite=True`` and refuses an output
  inside one of the inputs.
- :func:`atomic_directory` builds an output under a temporary sibling name and renames it into
  place only when complete, so a killed run never leaves something that looks finished.
- :class:`OutputLock` makes one run the only writer of an output; the lock file names its
  holder (host, pid, start time), and a lock whose process is gone is reported as stale and can
  be taken over explicitly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from pipeline.core.errors import DiskFullError, InputError, LockError, OutputExistsError, StorageError, is_disk_full
from pipeline.core.hosts import holder_alive, holder_info

logger = logging.getLogger(__name__)


def storage_error(out: Path | str, exc: OSError, *, what: str = "") -> StorageError:
    """A one-line error for a failed write to ``out``; a full disk gives :class:`DiskFullError`.

    The one place that turns an ``OSError`` into the error type (:func:`is_disk_full` decides).
    ``what`` names the part being written (e.g. ``"block 0-1-2"``); the message then says
    "writing <what> failed".
    """
    action = f"writing {what}" if what else "writing"
    if is_disk_full(exc):
        return DiskFullError(
            f"{out}: {action} failed ({exc.strerror}); free space on its filesystem or choose another output, "
            "then rerun"
        )
    return StorageError(f"{out}: {action} failed ({exc}); check the path, permissions and free space")


def check_output(out: Path, *, inputs: Iterable[Path] = (), overwrite: bool = False) -> None:
    """Raise unless ``out`` may be written."""
    out_abs = out.resolve()
    for inp in inputs:
        inp_abs = Path(inp).resolve()
        if out_abs == inp_abs or (inp_abs.is_dir() and inp_abs in out_abs.parents):
            raise InputError(f"{out}: output lies inside the input {inp}; choose an output path outside it")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: already exists; pass --overwrite to replace it or choose another path")
    if not out.parent.exists():
        raise InputError(f"{out}: parent folder {out.parent} does not exist; create it first")


@contextlib.contextmanager
def atomic_directory(out: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``out``; on success it replaces ``out`` atomically.

    On any exception the temporary directory is removed and ``out`` is left as it was.
    """
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise OutputExistsError(f"{out}: appeared while writing; pass --overwrite to replace it")
        trash = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


class OutputLock:
    """Exclusive lock on an output path, held as ``<out>.lock`` beside it.

    Args:
        out: the output being written.
        take_over: remove a *stale* lock (holder process gone on this host) instead of failing.
    """

    def __init__(self, out: Path, *, take_over: bool = False) -> None:
        self.out = out
        self.path = out.with_name(out.name + ".lock")
        self.take_over = take_over
        self._held = False

    def holder(self) -> dict[str, object] | None:
        try:
            return dict(json.loads(self.path.read_text()))
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        info = {**holder_info(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder() or {}
                stale = holder_alive(holder) is False
                who = f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"
                if stale and self.take_over:
                    logger.warning("%s: taking over stale lock (%s)", self.out, who)
                    self.path.unlink(missing_ok=True)
                    continue
                if stale:
                    raise LockError(
                        f"{self.out}: locked by a run that is no longer alive ({who}); "
                        f"pass --take-over-lock to take it over, or delete {self.path}"
                    ) from None
                raise LockError(f"{self.out}: another run is writing it ({who}); wait for it to finish") from None
            with os.fdopen(fd, "w") as fh:
                json.dump(info, fh)
            self._held = True
            return
        raise LockError(f"{self.out}: could not take the lock {self.path}; delete it if no run is active")

    def release(self) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
