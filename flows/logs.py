"""Library logs (``pipeline.*``) in the flow-run logs.

Prefect forwards the loggers named in ``PREFECT_LOGGING_EXTRA_LOGGERS`` to its API, but reads
that setting once, when ``prefect`` is first imported, and then forwards those loggers' records
from *every* context (outside a run it warns about each one). The equivalent used here is
explicit and scoped: :func:`library_logs` attaches one handler to the ``pipeline`` logger for
the duration of a flow, forwarding records to Prefect's API log handler only from inside a
flow or task run, at INFO level. The library itself never configures logging.

Block-level messages are logged inside Dask worker processes and stay in the worker logs (the
Dask dashboard shows them); the stage-level messages of the flow's own process appear here.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

LIBRARY_LOGGER = "pipeline"
_lock = threading.Lock()
_depth = 0
_saved_level = logging.NOTSET


class RunLogHandler(logging.Handler):
    """Sends records to the Prefect API, but only from inside a flow or task run."""

    def __init__(self) -> None:
        super().__init__(level=logging.NOTSET)
        from prefect.logging.handlers import APILogHandler

        self._api: Any = APILogHandler()

    def emit(self, record: logging.LogRecord) -> None:
        from prefect.context import FlowRunContext, TaskRunContext

        if FlowRunContext.get() is None and TaskRunContext.get() is None:
            return
        self._api.handle(record)


_handler: RunLogHandler | None = None


def _has_api_handler(logger: logging.Logger) -> bool:
    from prefect.logging.handlers import APILogHandler

    return any(isinstance(h, APILogHandler | RunLogHandler) and h is not _handler for h in logger.handlers)


@contextlib.contextmanager
def library_logs(level: int = logging.INFO) -> Iterator[None]:
    """Forward ``pipeline.*`` records at ``level`` and above to the current flow run's logs."""
    global _depth, _handler, _saved_level
    logger = logging.getLogger(LIBRARY_LOGGER)
    with _lock:
        if _depth == 0:
            _saved_level = logger.level
            if logger.level == logging.NOTSET or logger.level > level:
                logger.setLevel(level)
            if not _has_api_handler(logger):
                _handler = _handler or RunLogHandler()
                logger.addHandler(_handler)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                logger.setLevel(_saved_level)
                if _handler is not None:
                    logger.removeHandler(_handler)
