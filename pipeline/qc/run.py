"""Quality control of a segmentation: ``qc.json`` for machines, ``report.html`` for people.

:func:`run_qc` reads a ``seg.zarr`` written by :func:`pipeline.segment.run.segment` and computes:

1. **from the ledger** (the per-block records written during the run, see :mod:`pipeline.segment.ledger`;
   no voxel is read again): class voxel counts and fractions, per-class intensity mean/std and
   the contrast between classes (from the raw-intensity sums), the histogram of the maximum class
   probability (10 bins over [0, 1]), the mean entropy, per-block confidence, run facts;
2. **in one streaming pass**, block by block over the uint8 label array (plus, where present, the
   stored probabilities, the scan and the ground truth, read box by box): class-fraction profiles
   along z, y and x; connected components; per-slice confidence; per-class intensity histograms;
   the confusion matrix against ground truth;
3. **a seam check** that recomputes a few boxes from the scan with the model saved in
   ``seg.zarr/model`` and compares them with the written output.

Memory is bounded by one block, one face plane per block of the previous block layer, and one
integer per connected-component piece; never by the volume.

Connected components across blocks
----------------------------------
Each chosen class is labelled per block with :func:`scipy.ndimage.label` (6-connectivity: voxels
that share a face). A component that crosses a block face appears as one *piece* in every block
it touches. Pieces get global ids (a running offset + their local id) and are merged with a
union-find over the block faces::

      block A: z in [0, B)          block B: z in [B, 2B)
      ... | a a . b |  <- face ->  | a' . . b' | ...
        last plane of A              first plane of B

For every pair of face-adjacent voxels (last plane of a block, first plane of its successor
along z, y or x) that both belong to the class, the two pieces are joined (a-a', b-b'). Face
adjacency *is* 6-connectivity, so block edges and corners need no extra rule: voxels in
diagonal blocks are never 6-neighbours. The union-find is solved once at the end as the
connected components of the piece graph (:func:`scipy.sparse.csgraph.connected_components`);
a component's volume is the sum of its pieces, and it touches the volume border if a piece
does. The result equals labelling the whole volume at once (a test checks this).

Seam check
----------
A box is centred on a corner of the run's block grid, i.e. it is a block of the grid shifted by
half a block (cropped to ``seam_box`` voxels per axis to keep it cheap), so it straddles the
faces where the run stitched blocks. It is read with the model's halo, normalised with the
scan's global statistics and predicted with the numerics of the run (``exact`` from the ledger
manifest), on ``device``. Reported per sample and in total: label differences against the
written labels, and the largest probability difference against the stored probabilities
(compared at their stored resolution, ``round(255 p)``) or, without stored probabilities,
against the same voxels recomputed block by block on the run's grid. Voxels the run did not
compute (label 0) are not compared. Exact runs must show 0 and 0; default-numerics runs may
show float-rounding differences (~1e-7), and label flips only where the top-two margin is below
1e-5 ("explained").

qc.json keys (schema ``"studios-qc/1"``; see ``docs/qc.md``)
------------------------------------------------------------
================================  ===============================================================
key                               meaning
================================  ===============================================================
schema                            ``"studios-qc/1"``
status                            ``"complete"`` or ``"incomplete"`` (missing/failed blocks, or
                                  the output is not marked complete)
created, studios_version          when and by which studios this file was made
inputs                            paths: segmentation, scan (or null), truth (or null), model
volume                            shape [z, y, x], voxel_size, voxels, computed_voxels,
                                  not_computed_fraction (label 0 / all voxels)
classes[]                         per class: label, name, voxels, fraction (of computed voxels),
                                  intensity_mean, intensity_std (raw scan units; from the ledger)
contrast[]                        per class pair: a, b (labels), difference (mean_b - mean_a),
                                  cnr (abs difference / pooled std)
intensity_histograms              null, or edges (bins+1) and counts {name: [...]} per class
profiles.{z,y,x}                  fractions {name: [per plane]} (of the plane's computed voxels),
                                  computed [per plane voxel count], confidence [per plane mean
                                  max probability or null], confidence_source
confidence                        source ("probabilities" or "ledger"), threshold, histogram
                                  {edges, counts} of the max probability, mean_max_probability,
                                  low_fraction (max probability < threshold), mean_entropy
                                  (nats), mean_normalized_entropy (/ ln K), lowest_slices[]
                                  {axis, index, mean_confidence, low_fraction}, lowest_blocks[]
                                  {id, offset, shape, mean_confidence, low_fraction}
components                        connectivity (6), block (QC block shape), classes {name:
                                  {label, count, voxels, largest, largest_fraction, mean,
                                  quantiles {p5, p25, p50, p75, p95}, single_voxel,
                                  touching_border, top[], histogram {edges, counts}}}
seam_check                        status ("ok", "failed", "skipped", "not_applicable"), reason,
                                  exact, precision, device, box, probability_reference ("stored" or
                                  "recomputed_on_run_grid"), samples[] {offset, shape,
                                  compared_voxels, label_differences,
                                  max_abs_probability_difference}, compared_voxels,
                                  label_differences, unexplained_label_differences,
                                  max_abs_probability_difference
truth                             null, or path, compared_voxels, ignored_voxels (truth 0),
                                  not_computed_voxels, per_class[] {label, name, iou, dice, f1,
                                  precision, recall, support}, mean_iou, accuracy, kappa,
                                  confusion {labels, matrix (rows truth, columns prediction)}
blocks                            total, done, computed, skipped, missing, missing_ids (first 20),
                                  failed {id: error}
run                               complete, finished, host, studios_version, seconds,
                                  voxels_per_second, stage_seconds, block_seconds (summed over
                                  blocks), workers, exact, probabilities, block, chunks,
                                  model_fingerprint, model
warnings[]                        plain-language findings, most important first
timings                           seconds spent by QC: ledger, pass, seam_check, report, total
analysis                          (with an analysis.json) json, fibre, pore, objects, main_direction, thumbnail
suggestions[]                     (with suggest > 0) axis, index, score, box, reason: where to annotate next
================================  ===============================================================

Numbers that cannot be defined (e.g. IoU of a class absent from truth and prediction) are null.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import InputError, StorageError
from pipeline.core.progress import NullReporter, Reporter
from pipeline.qc.assemble import SCHEMA, assemble
from pipeline.qc.facts import ledger_facts
from pipeline.qc.inputs import (
    TruthReader,
    choose_classes,
    open_segmentation,
    qc_block,
    resolve_scan,
    stored_probabilities,
)
from pipeline.qc.seams import seam_check
from pipeline.qc.stream import stream
from pipeline.qc.warnings import qc_warnings

logger = logging.getLogger(__name__)

__all__ = ["SCHEMA", "QCResult", "load_qc", "run_qc"]



@dataclass(frozen=True)
class QCResult:
    """Where QC wrote its files, and what it found.

    Attributes:
        json_path: ``qc.json``.
        report_path: ``report.html`` (None when the report was not requested).
        data: the content of ``qc.json``.
    """

    json_path: Path
    report_path: Path | None
    data: Mapping[str, Any] = field(repr=False)

    @property
    def status(self) -> str:
        return str(self.data["status"])

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def warnings(self) -> tuple[str, ...]:
        return tuple(self.data["warnings"])


def run_qc(
    seg: str | os.PathLike[str],
    *,
    scan: str | os.PathLike[str] | None = None,
    truth: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    component_classes: Sequence[str | int] | None = None,
    seam_samples: int = 2,
    confidence_threshold: float = 0.6,
    block: int | Sequence[int] | None = None,
    seam_box: int = 32,
    device: str = "cpu",
    rare_fraction: float = 1e-3,
    drift_threshold: float = 0.25,
    report: bool = True,
    analysis: str | os.PathLike[str] | None = None,
    suggest: int = 0,
    suggest_candidates: int | None = None,
    reporter: Reporter | None = None,
) -> QCResult:
    """Check a segmentation and write ``qc.json`` (and ``report.html``) into ``out_dir``.

    Args:
        seg: a ``seg.zarr`` written by ``studios segment`` (complete or not).
        scan: the segmented scan; default: the one recorded in the output, if it still exists.
            Needed for intensity histograms, slice views and the seam check.
        truth: dense ground truth (studios image / zarr / .npy / TIFF), (Z, Y, X) integer labels
            0..K, 0 = ignore; same shape as the segmentation.
        out_dir: folder for the files (created); default ``<seg>/qc``. Existing QC files there
            are replaced (they are derived data).
        component_classes: class names or labels to analyse for connected components; default
            every class except the one with most voxels.
        seam_samples: boxes recomputed by the seam check (0 disables it).
        confidence_threshold: voxels whose max probability is below it count as uncertain.
        block: QC block shape (default: the run's block, at most 256 per axis); any shape gives
            the same numbers, only memory and speed change.
        seam_box: edge of a seam-check box, at most the run's block.
        device: where the seam check runs the model.
        rare_fraction: warn about classes covering less than this fraction.
        drift_threshold: warn when a class fraction varies more than this along an axis.
        report: also write ``report.html``.
        analysis: an ``analysis.json`` (or its folder) of this segmentation, shown in the report's
            Analysis section; default: ``SEG.analysis/`` beside the segmentation when it analysed
            this output. ``qc.json`` records it under ``analysis``.
        suggest: rank this many slices where to annotate next (``qc.json`` ``suggestions``, the
            report's "Where to annotate next"), with the output's model and its training
            annotations (:mod:`pipeline.qc.suggestions`); 0: none.
        suggest_candidates: candidate slices per axis for ``suggest`` (default 16).

    Raises:
        InputError: missing or foreign ``seg``, wrong-shaped scan or truth, unknown class, an
            ``analysis`` of another segmentation.
    """
    from pipeline.qc.analysis import default_analysis, find_analysis, summary

    reporter = reporter or NullReporter()
    if not 0.0 < confidence_threshold <= 1.0:
        raise InputError(f"confidence threshold {confidence_threshold} must lie in (0, 1]")
    if suggest < 0 or (suggest_candidates is not None and suggest_candidates < 1):
        raise InputError(f"suggest {suggest} must be >= 0 and suggest_candidates >= 1")
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    image, group, ledger = open_segmentation(seg)
    attrs = dict(image.attrs)
    classes = [str(c) for c in attrs["classes"]]
    k = len(classes)
    shape = image.shape
    manifest = dict(attrs.get("ledger") or {})
    notes: list[str] = []
    scan_image = resolve_scan(scan, manifest, shape, notes)
    analysed = find_analysis(image.path, analysis)
    truth_reader = TruthReader(truth, shape, k) if truth is not None else None
    probs = stored_probabilities(group, k, shape)

    t = time.perf_counter()
    facts = ledger_facts(ledger)
    timings["ledger"] = time.perf_counter() - t
    chosen = choose_classes(component_classes, classes, facts.counts)

    t = time.perf_counter()
    qblock = qc_block(block, manifest, shape)
    acc = stream(image.array, qblock, k, chosen, probs=probs, scan=scan_image, truth=truth_reader,
                  threshold=confidence_threshold, reporter=reporter)
    timings["pass"] = time.perf_counter() - t

    t = time.perf_counter()
    seam = seam_check(image, probs, scan_image, manifest, samples=seam_samples, edge=seam_box, device=device)
    timings["seam_check"] = time.perf_counter() - t

    data = assemble(image, attrs, manifest, facts, acc, seam, classes, scan_image, truth, qblock,
                     confidence_threshold)
    if suggest:
        from pipeline.qc.suggestions import qc_suggestions

        t = time.perf_counter()
        found = qc_suggestions(image.path, scan_image, attrs, suggest, notes, candidates=suggest_candidates)
        if found is not None:
            data["suggestions"] = found
        timings["suggestions"] = time.perf_counter() - t
    data["warnings"] = notes + qc_warnings(data, rare_fraction=rare_fraction, drift_threshold=drift_threshold)
    data["timings"] = timings
    if analysed is not None:
        where = Path(analysis) if analysis is not None else default_analysis(image.path)
        data["analysis"] = summary(analysed, str(where / "analysis.json" if where.is_dir() else where))
    out = Path(out_dir) if out_dir is not None else image.path / "qc"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"{out}: cannot create the QC folder ({exc}); choose another --out") from None
    report_path = None
    if report:
        from pipeline.qc.report import write_report

        t = time.perf_counter()
        report_path = write_report(clean(data), out / "report.html", labels=group, scan=scan_image,
                                   probabilities=probs, analysis=analysed)
        timings["report"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    final = clean(data)
    json_path = out / "qc.json"
    write_text(json_path, json.dumps(final, indent=1, allow_nan=False) + "\n")
    logger.info("qc of %s: %s, %d warnings, %.1fs", image.path, final["status"], len(final["warnings"]),
                timings["total"])
    return QCResult(json_path=json_path, report_path=report_path, data=final)



# ----------------------------------------------------------------------------- output


def clean(value: Any) -> Any:
    """JSON-ready copy: numpy scalars to Python, NaN/Inf to None, floats to 6 significant digits."""
    if isinstance(value, Mapping):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return [clean(v) for v in value.tolist()]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        v = float(value)
        return float(f"{v:.6g}") if math.isfinite(v) else None
    return value


def write_text(path: Path, text: str) -> None:
    """Write via a temporary sibling and rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def refresh_report(qc_dir: str | os.PathLike[str], analysis: str | os.PathLike[str]) -> Path:
    """Add ``analysis`` (an ``analysis.json``) to the QC in ``qc_dir``: ``qc.json`` records it and
    ``report.html`` is rendered again with the Analysis section; nothing is recomputed.

    Raises:
        InputError: no ``qc.json`` in ``qc_dir``, or ``analysis`` of another segmentation.
    """
    from pipeline.qc.analysis import read_analysis, summary
    from pipeline.qc.report import write_report

    out = Path(qc_dir)
    data = load_qc(out)
    seg = data["inputs"]["segmentation"]
    analysed = read_analysis(analysis, seg)
    image, group, _ = open_segmentation(seg)
    manifest = dict(image.attrs.get("ledger") or {})
    recorded = {"scan": data["inputs"].get("scan") or manifest.get("scan")}
    scan_image = resolve_scan(None, recorded, image.shape, [])  # a scan gone since: views left out
    probs = stored_probabilities(group, len(data["classes"]), image.shape)
    data["analysis"] = summary(analysed, str(analysis))
    report = write_report(data, out / "report.html", labels=group, scan=scan_image, probabilities=probs,
                          analysis=analysed)
    write_text(out / "qc.json", json.dumps(clean(data), indent=1, allow_nan=False) + "\n")
    return report


def load_qc(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``qc.json`` (or the ``qc.json`` in a folder / in ``<seg>/qc``)."""
    p = Path(path)
    for cand in (p, p / "qc.json", p / "qc" / "qc.json"):
        if cand.is_file():
            data = json.loads(cand.read_text())
            if data.get("schema") != SCHEMA:
                raise InputError(f"{cand}: is not a {SCHEMA} file")
            return dict(data)
    raise InputError(f"{p}: no qc.json found; run 'studios qc' first")
