"""Scheduled beamline processing: ``watch_folder``, one look at the incoming folder per firing.

The rules (which scans are complete, exactly-once claims, the restart-proof record) are in
:mod:`pipeline.service.incoming`; this flow supplies the processing: each claimed scan runs
through the ``process_scan`` subflow, one after another.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from prefect import flow

from flows.artifacts import publish_markdown
from flows.logs import library_logs
from pipeline.core import interrupt
from pipeline.service import incoming as watcher
from pipeline.service.process import check_processing, error_line
from pipeline.service.summary import look_markdown


@flow(name="watch-folder")
def watch_folder(
    incoming: str | None = None,
    output_root: str | None = None,
    config: str | None = None,
    completion: str | None = None,
    settle_seconds: float | None = None,
    marker: str | None = None,
    state_dir: str | None = None,
    max_scans: int | None = None,
    model: dict[str, Any] | None = None,
    ingest: dict[str, Any] | None = None,
    segment: dict[str, Any] | None = None,
    cluster: dict[str, Any] | None = None,
    qc: dict[str, Any] | None = None,
    analyse: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One look at ``incoming``: process every new complete scan into ``output_root/<name>``.

    ``config`` is a run profile (e.g. ``configs/beamline.yaml``): its ``watch:`` section gives
    the folder and the completion rule, its other sections how each scan is processed; the
    parameters here override it. Scans run one after another through ``process_scan`` (as
    subflows); the blocks of each run in parallel on its cluster.
    """
    from prefect.runtime import flow_run

    with library_logs():
        settings = watcher.watch_settings(config, incoming, output_root, {
            "completion": completion, "settle_seconds": settle_seconds, "marker": marker, "state_dir": state_dir,
            "max_scans": max_scans})
        sections = {k: v for k, v in {"model": model, "ingest": ingest, "segment": segment, "cluster": cluster,
                                      "qc": qc, "analyse": analyse}.items() if v is not None}
        check_processing(config, sections)  # the processing template, once per firing, before any claim
        settings.output_root.mkdir(parents=True, exist_ok=True)
        state = watcher.WatchState(settings.state_path)
        look = watcher.claim_ready(state, settings, firing=str(flow_run.get_id() or "") or None)
        run = functools.partial(_process, config=config, sections=sections)
        with interrupt.handling():  # SIGTERM / SIGINT: the running scan stops cleanly, the rest wait
            results = watcher.process_all(state, look.claimed, settings.output_root, run)
        interrupt.check(f"watch {settings.incoming} stopped; {sum(r['state'] == 'done' for r in results.values())} "
                        "scan(s) done, the interrupted one resumes at the next firing")
        publish_markdown("watch-folder", look_markdown(settings.incoming, results, look.waiting),
                         f"look at {settings.incoming}")
        return {"incoming": str(settings.incoming), "output_root": str(settings.output_root),
                "processed": results, "waiting": look.waiting}


def _process(c: watcher.Candidate, out: Path, *, config: str | None, sections: dict[str, Any]) -> str | None:
    """``process_scan`` as a subflow; ``None`` when it completed, else its error on one line."""
    from flows.process import process_scan

    state = process_scan(source=str(c.path), output=str(out), name=c.name, config=config, return_state=True,
                         **sections)
    if state.is_completed():
        return None
    try:
        state.result()
    except Exception as exc:
        return error_line(exc)
    return str(getattr(state, "message", None) or state.type)
