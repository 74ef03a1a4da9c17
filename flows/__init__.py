"""Prefect glue over :mod:`pipeline` (whose :mod:`pipeline.service` holds the decisions).

Flows parse parameters, call the library and publish artifacts; per-block work runs on the
stage's Dask cluster, never as Prefect tasks. :mod:`flows.process` (stage tasks, the stage
flows, ``process_scan``), :mod:`flows.watch` (``watch_folder``), :mod:`flows.serving`
(deployments), :mod:`flows.artifacts`, :mod:`flows.logs`, :mod:`flows.cli` (``run``, ``serve``,
``deploy``, ``dashboard``) and :mod:`flows.dashboard` (the web app, no Prefect import).
Importing this package does nothing; ``from flows import process_scan`` loads the flow.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {**dict.fromkeys(("ingest_flow", "train_flow", "segment_flow", "qc_flow", "process_scan"), "flows.process"),
            "watch_folder": "flows.watch"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flows' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
