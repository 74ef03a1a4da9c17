"""Prefect glue over :mod:`pipeline`: flows, deployments, artifacts, the dashboard app.

Flows parse parameters, call the library and publish artifacts; they never run per-block work
as Prefect tasks (a stage's blocks run on the Dask cluster given to it). The decisions (what is
reused, which model source, when a scan is complete) live in :mod:`pipeline.service`. Modules:

- :mod:`flows.process`: ``ingest_flow``, ``train_flow``, ``segment_flow``, ``qc_flow`` and
  ``process_scan`` (ingest -> optional train -> segment -> qc), one Prefect task per stage;
- :mod:`flows.watch`: ``watch_folder``, one look of :mod:`pipeline.service.incoming` per firing;
- :mod:`flows.serving`: the deployments (``studios serve`` / ``studios deploy``);
- :mod:`flows.artifacts`, :mod:`flows.logs`: progress and summary artifacts, library logs in runs;
- :mod:`flows.dashboard`: the monitoring web app (``studios dashboard``), no Prefect import;
- :mod:`flows.cli`: the subcommands ``run``, ``serve``, ``deploy``, ``dashboard``.

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
