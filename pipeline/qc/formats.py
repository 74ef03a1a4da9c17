"""How the report writes numbers: shared by its sections (:mod:`pipeline.qc.report`, :mod:`pipeline.qc.analysis`)."""

from __future__ import annotations

from typing import Any


def num(value: Any, digits: int = 4) -> str:
    """``n/a`` for None, yes/no for bools, thousands separators for ints, ``digits`` significant for floats."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def pct(value: Any) -> str:
    """A fraction as a percentage with 3 significant digits (``n/a`` for None)."""
    return "n/a" if value is None else f"{100 * float(value):.3g} %"


__all__ = ["num", "pct"]
