"""QC's "Where to annotate next": :func:`pipeline.train.suggest.suggest` with what the output knows.

The model is the one saved in the segmentation (``seg.zarr/model``, the one the run used), the
annotations those the model was trained from (``run.model.annotations.source``, when that file
still exists; without them the ranking only spreads the slices), the scan the segmented one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.io.store import Image

logger = logging.getLogger(__name__)


def qc_suggestions(seg: Path, scan: Image | None, attrs: Mapping[str, Any], n: int, notes: list[str],
                   *, candidates: int | None = None) -> list[dict[str, Any]] | None:
    """Up to ``n`` suggestions as JSON (:meth:`~pipeline.train.suggest.Suggestion.to_json`), best
    first; ``None`` (and a note) when the scan or the saved model is missing."""
    from pipeline.train.suggest import suggestions_for_qc

    if scan is None:
        notes.append("no scan: no suggestions where to annotate next")
        return None
    model = seg / "model"
    if not (model / "model.json").is_file():
        notes.append(f"{model}: no saved model: no suggestions where to annotate next")
        return None
    run: Mapping[str, Any] = attrs["run"] if isinstance(attrs.get("run"), Mapping) else {}
    trained: Mapping[str, Any] = run["model"] if isinstance(run.get("model"), Mapping) else {}
    ann = trained.get("annotations")
    recorded = ann.get("source") if isinstance(ann, Mapping) else None
    annotations = Path(recorded) if recorded and Path(recorded).exists() else None
    if recorded and annotations is None:
        logger.info("suggestions without the training annotations: %s is gone", recorded)
    return suggestions_for_qc(scan, model, annotations, n=n, candidates=candidates)


__all__ = ["qc_suggestions"]
