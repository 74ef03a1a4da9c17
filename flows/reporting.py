"""Prefect artifacts for the flows: a progress reporter and markdown summaries.

:class:`ArtifactReporter` implements :class:`pipeline.core.progress.Reporter`: it creates a progress
artifact when a stage starts and updates it while blocks finish, at most once every
``min_interval`` seconds (a 10^5-block run makes a few hundred API calls, not 10^5), and
mirrors the same numbers into the scan's ``studios-run.json`` for the dashboard. A failing API
call is logged once and never stops the run.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

from flows.runstate import RunStatus, now_iso

logger = logging.getLogger(__name__)


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key: lowercase letters, digits and dashes."""
    text = "-".join(p for p in parts if p)
    key = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return key[:100] or "studios"


def dask_dashboard_link() -> str | None:
    """The dashboard of the Dask client the current stage just opened, if any."""
    try:
        from distributed import default_client

        return str(default_client().dashboard_link) or None
    except Exception:  # no client (serial executor), or distributed not usable
        return None


class ArtifactReporter:
    """Reporter -> Prefect progress artifact (+ the scan's run-status file), throttled.

    Args:
        key: the artifact key prefix (e.g. ``segment-progress-<scan>``).
        status: also write ``progress`` into this run-status file.
        min_interval: seconds between two updates (the last one is always sent).
    """

    def __init__(self, key: str, *, status: RunStatus | None = None, min_interval: float = 2.0) -> None:
        self.key = artifact_key(key)
        self.status = status
        self.min_interval = min_interval
        self.stage = ""
        self.total = 0
        self.done = 0
        self.voxels = 0
        self.updates = 0
        self._artifact_id: Any = None
        self._t0 = 0.0
        self._last = 0.0
        self._api_failed = False

    # Reporter protocol ------------------------------------------------------------------------
    def start(self, stage: str, total: int) -> None:
        self.stage, self.total, self.done, self.voxels = stage, int(total), 0, 0
        self._t0 = self._last = time.monotonic()
        self._artifact_id = None
        extra: dict[str, Any] = {}
        link = dask_dashboard_link() if stage == "segment" else None
        if link:
            extra["dask_dashboard"] = link
        try:
            from prefect.artifacts import create_progress_artifact

            self._artifact_id = create_progress_artifact(0.0, key=self.key, description=self._describe())
            self.updates += 1
        except Exception as exc:
            self._api_error(exc)
        self._write_status(**extra)

    def advance(self, n: int = 1, *, voxels: int = 0) -> None:
        self.done += n
        self.voxels += voxels
        now = time.monotonic()
        if now - self._last >= self.min_interval:
            self._last = now
            self._push()

    def finish(self) -> None:
        self._push()

    # ------------------------------------------------------------------------------------------
    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 100.0

    @property
    def voxels_per_second(self) -> float:
        elapsed = time.monotonic() - self._t0
        return self.voxels / elapsed if elapsed > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        elapsed = time.monotonic() - self._t0
        if not self.done or self.done >= self.total:
            return None if self.done < self.total else 0.0
        return elapsed / self.done * (self.total - self.done)

    def _describe(self) -> str:
        text = f"{self.stage}: {self.done}/{self.total} blocks ({self.percent:.0f}%)"
        if self.voxels:
            text += f", {self.voxels_per_second / 1e6:.2f} Mvox/s"
        eta = self.eta_seconds
        if eta:
            text += f", ETA {format_seconds(eta)}"
        return text

    def _push(self) -> None:
        if self._artifact_id is not None:
            try:
                from prefect.artifacts import update_progress_artifact

                update_progress_artifact(self._artifact_id, min(self.percent, 100.0), description=self._describe())
                self.updates += 1
            except Exception as exc:
                self._api_error(exc)
        self._write_status()

    def _write_status(self, **extra: Any) -> None:
        if self.status is None:
            return
        eta = self.eta_seconds
        progress = {
            "stage": self.stage, "done": self.done, "total": self.total, "voxels": self.voxels,
            "voxels_per_second": round(self.voxels_per_second, 1),
            "eta_seconds": round(eta, 1) if eta is not None else None, "updated": now_iso(),
        }
        try:
            self.status.update(progress=progress, **extra)
        except OSError as exc:
            logger.warning("cannot write %s: %s", self.status.path, exc)

    def _api_error(self, exc: Exception) -> None:
        if not self._api_failed:
            logger.warning("progress artifact %s not published (%s: %s); the run goes on",
                           self.key, type(exc).__name__, exc)
        self._api_failed = True


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def md(text: Any) -> str:
    """Escape a value for a markdown table cell (no HTML, no table breaks)."""
    s = str(text)
    for a, b in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("|", "\\|"), ("\n", " "), ("`", "'")):
        s = s.replace(a, b)
    return s


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return md(value)


def _get(data: Mapping[str, Any], *path: str) -> Any:
    value: Any = data
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def qc_rows(qc: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The headline QC facts of a ``studios-qc/1`` document as (metric, value) rows."""
    rows: list[tuple[str, str]] = []

    def add(label: str, value: Any, pct: bool = False) -> None:
        if value is None:
            return
        if pct and isinstance(value, int | float):
            rows.append((label, f"{100 * float(value):.2f} %"))
        else:
            rows.append((label, _fmt(value)))

    add("status", qc.get("status"))
    for c in qc.get("classes") or []:
        if isinstance(c, Mapping):
            add(f"fraction {c.get('name', c.get('label'))}", c.get("fraction"), pct=True)
    add("mean max probability", _get(qc, "confidence", "mean_max_probability"))
    add("uncertain voxels", _get(qc, "confidence", "low_fraction"), pct=True)
    add("seam check", _get(qc, "seam_check", "status"))
    add("seam label differences", _get(qc, "seam_check", "label_differences"))
    add("seam max probability difference", _get(qc, "seam_check", "max_abs_probability_difference"))
    for name, comp in (_get(qc, "components", "classes") or {}).items():
        if isinstance(comp, Mapping):
            add(f"components {name}", comp.get("count"))
    add("truth mean IoU", _get(qc, "truth", "mean_iou"))
    add("truth kappa", _get(qc, "truth", "kappa"))
    add("blocks done", _get(qc, "blocks", "done"))
    add("blocks total", _get(qc, "blocks", "total"))
    return rows


def summary_markdown(
    title: str,
    *,
    state: str,
    facts: Iterable[tuple[str, Any]] = (),
    class_fractions: Mapping[str, float] | None = None,
    qc: Mapping[str, Any] | None = None,
    warnings: Iterable[str] = (),
    outputs: Mapping[str, Any] | None = None,
    error: str | None = None,
) -> str:
    """The markdown summary artifact of a flow: state, facts, QC table, warnings, output paths."""
    lines = [f"# {md(title)}", "", f"**State:** {md(state)}", ""]
    if error:
        lines += [f"**Error:** {md(error)}", ""]
    facts = list(facts)
    if facts:
        lines += ["| fact | value |", "| --- | --- |", *(f"| {md(k)} | {_fmt(v)} |" for k, v in facts), ""]
    if class_fractions:
        lines += ["## Classes", "", "| class | volume fraction |", "| --- | --- |"]
        lines += [f"| {md(c)} | {100 * float(f):.2f} % |" for c, f in class_fractions.items()]
        lines.append("")
    if qc:
        rows = qc_rows(qc)
        if rows:
            lines += ["## QC", "", "| metric | value |", "| --- | --- |", *(f"| {md(k)} | {v} |" for k, v in rows), ""]
    warnings = [str(w) for w in warnings]
    lines += ["## Warnings", ""]
    lines += [f"- {md(w)}" for w in warnings] if warnings else ["none"]
    lines.append("")
    if outputs:
        lines += ["## Outputs", "", "| output | path |", "| --- | --- |"]
        lines += [f"| {md(k)} | {md(v)} |" for k, v in outputs.items() if v]
        lines.append("")
    return "\n".join(lines)


def publish_markdown(key: str, markdown: str, description: str) -> None:
    """Create a markdown artifact; a failing API call is logged, never raised."""
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown, key=artifact_key(key), description=description)
    except Exception as exc:
        logger.warning("summary artifact %s not published (%s: %s)", key, type(exc).__name__, exc)
