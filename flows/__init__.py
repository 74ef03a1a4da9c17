"""Thin Prefect 3 flows over :mod:`pipeline`.

Flows parse parameters, call the library and publish artifacts; they never run per-block work
as Prefect tasks (a stage's blocks run on the Dask cluster given to it). Modules:

- :mod:`flows.process`: ``ingest_flow``, ``train_flow``, ``segment_flow``, ``qc_flow`` and
  ``process_scan`` (ingest -> optional train -> segment -> qc);
- :mod:`flows.watch`: ``watch_folder``, scheduled processing of new complete scans;
- :mod:`flows.serving`: the deployments (``studios serve`` / ``studios deploy``);
- :mod:`flows.dashboard`: the monitoring web page (``studios dashboard``), no Prefect import;
- :mod:`flows.runstate`, :mod:`flows.reporting`, :mod:`flows.logs`: shared helpers.

Importing this package does nothing; the flows are loaded on first access
(``from flows import process_scan``).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ingest_flow": "flows.process",
    "train_flow": "flows.process",
    "segment_flow": "flows.process",
    "qc_flow": "flows.process",
    "process_scan": "flows.process",
    "watch_folder": "flows.watch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flows' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
