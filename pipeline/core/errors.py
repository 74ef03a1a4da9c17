"""One error hierarchy for studios.

Every error raised on purpose by the library derives from :class:`StudiosError` and also
from the matching built-in exception, so callers can catch either. Messages are one line and
say what to do: ``"<file>: <problem>; <fix>"``. The CLI prints ``str(error)`` and exits with
:attr:`StudiosError.exit_code`.
"""

from __future__ import annotations

import errno


class StudiosError(Exception):
    """Root of all studios errors."""

    exit_code: int = 1


class InputError(StudiosError, ValueError):
    """An input file or array is unusable (missing, truncated, wrong shape/dtype, NaN...)."""

    exit_code = 2


class ConfigError(StudiosError, ValueError):
    """A configuration file or command-line option is malformed."""

    exit_code = 2


class GeometryError(StudiosError, ValueError):
    """Boxes, blocks or chunk grids that do not fit together."""

    exit_code = 2


class ModelError(StudiosError, ValueError):
    """A model bundle is missing, malformed, unsafe or does not match its weights."""

    exit_code = 2


class OutputExistsError(StudiosError, FileExistsError):
    """The output exists and ``overwrite`` was not given."""

    exit_code = 3


class LockError(StudiosError, RuntimeError):
    """Another run holds the output's lock."""

    exit_code = 3


class LedgerMismatchError(StudiosError, ValueError):
    """A resumable output was made with different inputs, model or blocks."""

    exit_code = 3


class StorageError(StudiosError, OSError):
    """Reading or writing storage failed (disk full, corrupted chunk, permissions)."""

    exit_code = 4


class DiskFullError(StorageError):
    """No space left on the output's filesystem; the run stops instead of failing every block."""

    exit_code = 4


#: ``errno`` values of a write that failed for want of space: no space, quota, file too large.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def is_disk_full(exc: OSError) -> bool:
    """Whether a failed write failed for want of space (see :data:`DISK_FULL_ERRNOS`)."""
    return exc.errno in DISK_FULL_ERRNOS


class ClusterError(StudiosError, RuntimeError):
    """A compute cluster could not be started or reached."""

    exit_code = 5


class BlockFailedError(StudiosError, RuntimeError):
    """One or more blocks kept failing after their retries."""

    exit_code = 6

    def __init__(self, message: str, failed: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.failed: dict[str, str] = dict(failed or {})


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``str(exc)`` on one line (whitespace collapsed), cut to ``limit`` characters."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
