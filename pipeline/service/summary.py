"""Markdown summaries of runs and watcher looks (the text of the flows' summary artifacts).

Pure text: every value from data is escaped for a markdown table cell (:func:`md`), so a scan
name or an error message can never break the table or inject HTML.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


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
    """The summary of a stage or run: state, facts, classes, QC table, warnings, output paths."""
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
    rows = qc_rows(qc) if qc else []
    if rows:
        lines += ["## QC", "", "| metric | value |", "| --- | --- |", *(f"| {md(k)} | {v} |" for k, v in rows), ""]
    warnings = [str(w) for w in warnings]
    lines += ["## Warnings", "", *([f"- {md(w)}" for w in warnings] if warnings else ["none"]), ""]
    if outputs:
        lines += ["## Outputs", "", "| output | path |", "| --- | --- |"]
        lines += [f"| {md(k)} | {md(v)} |" for k, v in outputs.items() if v]
        lines.append("")
    return "\n".join(lines)


def look_markdown(incoming: Any, processed: Mapping[str, Mapping[str, Any]], waiting: Mapping[str, str]) -> str:
    """One watcher look: each scan processed now (its outcome) and each scan still waiting (why)."""
    failed = sum(r.get("state") == "failed" for r in processed.values())
    rows = ["| scan | outcome | detail |", "| --- | --- | --- |"]
    rows += [f"| {md(n)} | {md(r['state'])} | {md(r.get('error') or r.get('output', ''))} |"
             for n, r in processed.items()]
    rows += [f"| {md(n)} | waiting | {md(why)} |" for n, why in waiting.items()]
    return "\n".join([f"# watch {md(incoming)}", "",
                      f"{len(processed)} processed now, {len(waiting)} waiting, {failed} failed", "", *rows, ""])


def run_lines(result: Mapping[str, Any]) -> list[str]:
    """What ``studios run`` prints about a finished ``process_scan`` result: outcome, outputs, warnings."""
    seg, outputs = result["segment"], result["outputs"]
    lines = [f"done: {result['name']} in {result['seconds']:.1f}s; {seg.get('blocks_done')}/{seg.get('blocks_total')} "
             f"blocks{' (reused)' if seg.get('reused') else ''}"]
    keys = ("scan", "model", "segmentation", "qc_json", "report", "analysis_json")
    lines += [f"  {key:13s} {outputs[key]}" for key in keys if outputs.get(key)]
    return lines + [f"  warning: {w}" for w in result["qc_warnings"]]
