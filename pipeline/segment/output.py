"""Prepare a segmentation's output: resume an unfinished one or create it, and save the model into it.

Layout created here: labels ``0`` (Z, Y, X) uint8, optionally ``probabilities/0`` (K, Z, Y, X)
uint8, the ledger over the block grid, ``studios`` attributes (``complete`` false until the end,
``ledger`` = the manifest), and ``model/`` (the bundle the blocks load).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zarr

from pipeline.core.errors import OutputExistsError
from pipeline.io.bundle import ModelBundle, save_bundle
from pipeline.io.outputs import check_output
from pipeline.io.store import create_array, create_group, set_studios_attrs, studios_attrs
from pipeline.segment.ledger import Ledger, check_manifest
from pipeline.segment.plan import Plan

logger = logging.getLogger(__name__)


def open_output(
    out: Path, plan: Plan, wanted: dict[str, Any], bundle: ModelBundle, scan: Path, *, overwrite: bool,
    probabilities: bool,
) -> tuple[zarr.Group, Ledger, Path]:
    """Resume or create the output; save the model into it. Returns (group, ledger, model folder)."""
    group, resumed = _prepare_output(out, wanted, overwrite=overwrite, inputs=[scan])
    if not resumed:
        _create_output(group, plan, bundle, probabilities=probabilities)
        set_studios_attrs(group, ledger=wanted)
    model_dir = out / "model"
    if not (model_dir / "model.json").exists():
        save_bundle(bundle, model_dir)
    ledger = Ledger(group)
    ledger.check_layout()
    return group, ledger, model_dir


def _prepare_output(
    out: Path, manifest: dict[str, Any], *, overwrite: bool, inputs: Sequence[Path]
) -> tuple[zarr.Group, bool]:
    """Open an unfinished output to resume, or create a fresh one. Returns (group, resumed)."""
    if out.exists():
        try:
            group = zarr.open_group(str(out), mode="r+")
            attrs = studios_attrs(group)
        except Exception:
            attrs = {}
            group = None
        finished = attrs.get("complete", False)
        if group is not None and attrs.get("kind") == "segmentation" and not finished and not overwrite:
            check_manifest(attrs.get("ledger"), manifest, str(out))
            sweep_orphans(out)
            return group, True
        if not overwrite:
            what = "a finished segmentation" if finished else "something that is not a studios segmentation"
            raise OutputExistsError(
                f"{out}: already holds {what}; pass --overwrite to replace it or choose another path"
            )
        check_output(out, inputs=inputs, overwrite=True)
        shutil.rmtree(out)
    else:
        check_output(out, inputs=inputs, overwrite=overwrite)
    return create_group(out), False


#: zarr's LocalStore writes ``NAME.<uuid4 hex>.partial`` and renames it: a writer killed in between leaves it.
_ORPHAN = re.compile(r"\.[0-9a-f]{32}\.partial$")


def sweep_orphans(out: Path) -> int:
    """Remove the temporary chunk files a killed writer left in ``out``; how many.

    Called on resume, under the output's lock and before any block is dispatched, so no writer
    of this output is running: every such file is an orphan (its chunk is rewritten, or was
    never done, per the ledger).
    """
    removed = 0
    for folder, _, files in os.walk(out):
        for name in files:
            if _ORPHAN.search(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(folder, name))
                    removed += 1
    if removed:
        logger.info("%s: removed %d temporary chunk file(s) left by an interrupted run", out, removed)
    return removed


def _create_output(group: zarr.Group, plan: Plan, bundle: ModelBundle, *, probabilities: bool) -> None:
    """Labels ``0`` (and ``probabilities/0``) over the volume, and an empty ledger over the grid."""
    k = len(bundle.classes)
    set_studios_attrs(group, kind="segmentation", complete=False, classes=list(bundle.classes))
    create_array(group, "0", shape=plan.volume, dtype="uint8", chunks=plan.chunks)
    if probabilities:
        probs = group.create_group("probabilities")
        create_array(probs, "0", shape=(k, *plan.volume), dtype="uint8", chunks=(k, *plan.chunks),
                     dimension_names=("c", "z", "y", "x"))
    Ledger.create(group, plan.grid, k)
