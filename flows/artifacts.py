"""Prefect artifacts of the flows: live progress and markdown summaries.

:class:`ArtifactReporter` is a :class:`pipeline.service.runstate.StatusReporter` (throttled,
mirrored into ``studios-run.json``) that also keeps a Prefect progress artifact up to date. The
summaries' text comes from :mod:`pipeline.service.summary`. A failing API call is logged once
and never stops the run.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from pipeline.service.runstate import RunStatus, StatusReporter

logger = logging.getLogger(__name__)


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key: lowercase letters, digits and dashes."""
    key = re.sub(r"[^a-z0-9]+", "-", "-".join(p for p in parts if p).lower()).strip("-")
    return key[:100] or "studios"


class ArtifactReporter(StatusReporter):
    """Reporter -> Prefect progress artifact ``key`` (+ the run-status file), at most every ``min_interval`` s."""

    def __init__(self, key: str, *, status: RunStatus | None = None, min_interval: float = 2.0) -> None:
        super().__init__(status, min_interval=min_interval)
        self.key = artifact_key(key)
        self.updates = 0
        self._artifact_id: Any = None
        self._api_failed = False

    def published(self, *, first: bool) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        try:
            if first:
                self._artifact_id = create_progress_artifact(0.0, key=self.key, description=self.describe())
            elif self._artifact_id is not None:
                update_progress_artifact(self._artifact_id, min(self.percent, 100.0), description=self.describe())
            else:
                return
            self.updates += 1
        except Exception as exc:
            if first:
                self._artifact_id = None
            if not self._api_failed:
                logger.warning("progress artifact %s not published (%s: %s); the run goes on",
                               self.key, type(exc).__name__, exc)
            self._api_failed = True


def publish_markdown(key: str, markdown: str, description: str) -> None:
    """Create a markdown artifact; a failing API call is logged, never raised."""
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown, key=artifact_key(key), description=description)
    except Exception as exc:
        logger.warning("summary artifact %s not published (%s: %s)", key, type(exc).__name__, exc)
