"""Safe outputs: validation, atomic replacement and exclusive locks.

- :func:`check_output` refuses to overwrite without ``overwrite=True`` and refuses an output
  inside one of the inputs.
- :func:`atomic_directory` builds an output under a temporary sibling name and renames it into
  place only when complete, so a killed run never leaves something that looks finished.
- :class:`OutputLock` makes one run the only writer of an output; the lock file names its
  holder (host, pid, start time), is ``flock``-ed for the holder's life and renewed as a lease,
  so a lock whose holder died (any way, on any host) is taken over automatically.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from pipeline.core.errors import DiskFullError, InputError, LockError, OutputExistsError, StorageError, is_disk_full
from pipeline.io.lease import LEASE_PERIOD, LEASE_STALE, Heartbeat, Holder, State, holder_state, lease_age

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


ZARR_MARKERS = ("zarr.json", ".zgroup", ".zarray")


def enclosing_zarr(path: Path) -> Path | None:
    """The nearest existing zarr store (v3 ``zarr.json`` or v2 ``.zgroup``/``.zarray``) above ``path``."""
    for parent in path.resolve().parents:
        if any((parent / m).is_file() for m in ZARR_MARKERS):
            return parent
    return None


def check_output(out: Path, *, inputs: Iterable[Path] = (), overwrite: bool = False) -> None:
    """Raise unless ``out`` may be written.

    Refused: ``out`` equal to or inside an input, inside any existing zarr store (a new array
    there would silently become part of that store), an existing ``out`` without ``overwrite``,
    a missing parent folder.
    """
    out_abs = out.resolve()
    for inp in inputs:
        inp_abs = Path(inp).resolve()
        if out_abs == inp_abs or (inp_abs.is_dir() and inp_abs in out_abs.parents):
            raise InputError(f"{out}: output lies inside the input {inp}; choose an output path outside it")
    store = enclosing_zarr(out)
    if store is not None:
        raise InputError(f"{out}: output lies inside the existing zarr store {store}; choose a path outside it")
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

    The lock file is created with ``O_EXCL`` and names its holder (:class:`~pipeline.io.lease.Holder`:
    host, pid and the pid's start time). While held it is also

    - ``flock``-ed for the holder's life: the kernel drops that lock when the holder dies, however
      it dies (SIGKILL, out of memory), so a dead holder is recognised at once where the
      filesystem supports ``flock`` (local disks; NFS and Lustre/GPFS as docs/reliability.md says);
    - a lease: its mtime is renewed every :data:`~pipeline.io.lease.LEASE_PERIOD` seconds, so a
      holder on another host that stopped renewing it is recognised as gone.

    A holder that is provably gone (pid gone or reused on this host, lease stale elsewhere) is
    taken over automatically with one warning. ``take_over`` also takes over a lock whose holder
    cannot be checked (unreadable file, no start time); a lock ``flock``-ed by a live process is
    never taken over.

    Args:
        out: the output being written.
        take_over: take over a lock whose holder cannot be proved alive or dead.
        stale_after: seconds without renewal after which another host's lease is stale.
    """

    def __init__(
        self, out: Path, *, take_over: bool = False, stale_after: float = LEASE_STALE, period: float = LEASE_PERIOD
    ) -> None:
        self.out = out
        self.path = out.with_name(out.name + ".lock")
        self.take_over = take_over
        self.stale_after = stale_after
        self.period = period
        self._fd: int | None = None
        self._heartbeat: Heartbeat | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> dict[str, object] | None:
        try:
            return dict(json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def acquire(self) -> None:
        """Take the lock, taking over a dead holder's; raise :class:`LockError` if it is held."""
        me = Holder.me()
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            except FileExistsError:
                self._take_over_existing()  # raises unless the holder is gone (or just released it)
                continue
            except OSError as exc:
                raise storage_error(self.path, exc) from None
            try:
                _flock(fd, self.path)
                os.write(fd, me.to_json().encode())
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                self.path.unlink(missing_ok=True)
                raise
            self._fd = fd
            self._heartbeat = Heartbeat(fd, str(self.out), period=self.period).start()
            return
        raise LockError(f"{self.out}: could not take the lock {self.path} (other runs keep taking it); retry")

    def _take_over_existing(self) -> None:
        """The lock file exists: remove it if its holder is gone (then the caller tries again), else raise."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return  # released meanwhile
        except OSError as exc:
            raise storage_error(self.path, exc) from None
        try:
            if not _flock(fd, self.path, blocking_ok=True):
                info = self.holder()
                who = Holder.from_json(info).describe() if info else "holder unknown"
                raise LockError(f"{self.out}: another run is writing it ({who}); wait for it to finish")
            try:  # we flock-ed the file that is still at the path (not one a competitor just replaced)
                st_path = os.stat(self.path)
            except FileNotFoundError:
                return
            st_fd = os.fstat(fd)
            if (st_path.st_ino, st_path.st_dev) != (st_fd.st_ino, st_fd.st_dev):
                return
            raw = self.holder()
            holder = Holder.from_json(raw) if raw else None
            state, reason = holder_state(holder, lease_age(st_fd.st_mtime), stale_after=self.stale_after)
            who = holder.describe() if holder else "holder unknown"
            if state is State.ALIVE or (state is State.UNKNOWN and not self.take_over):
                if state is State.ALIVE:
                    raise LockError(f"{self.out}: another run is writing it ({who}; {reason}); wait for it to finish")
                raise LockError(
                    f"{self.out}: locked by a run that cannot be checked ({who}; {reason}); if no run is writing it, "
                    f"pass --take-over-lock or delete {self.path}"
                )
            logger.warning("%s: taking over the lock of a run that is gone (%s; %s)", self.out, who, reason)
            self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)  # also drops our flock on the old file

    def release(self) -> None:
        """Stop the lease and remove the lock file (only if it is still ours)."""
        if self._fd is None:
            return
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        fd, self._fd = self._fd, None
        try:
            st_fd = os.fstat(fd)
            st_path = os.stat(self.path)
            if (st_path.st_ino, st_path.st_dev) == (st_fd.st_ino, st_fd.st_dev):
                self.path.unlink()
            else:
                logger.warning("%s: the lock %s was taken over by another run while held", self.out, self.path)
        except FileNotFoundError:
            logger.warning("%s: the lock %s disappeared while held", self.out, self.path)
        finally:
            os.close(fd)

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _flock(fd: int, path: Path, *, blocking_ok: bool = False) -> bool:
    """Try an exclusive, non-blocking ``flock`` on ``fd``.

    Returns False if another open file holds it (only when ``blocking_ok``; otherwise that
    raises :class:`LockError`). Filesystems without ``flock`` support (some Lustre/BeeGFS
    mounts) return True: the lease alone then protects the lock.
    """
    import errno
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if blocking_ok:
            return False
        raise LockError(f"{path}: held by another process; wait for it to finish") from None
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            logger.debug("%s: flock unsupported here (%s); relying on the lease", path, exc)
            return True
        raise
    return True
