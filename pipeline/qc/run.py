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
================================  ===============================================================

Numbers that cannot be defined (e.g. IoU of a class absent from truth and prediction) are null.
"""

from __future__ import annotations

import datetime as dt
import itertools
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
import zarr

from pipeline import __version__
from pipeline.core.errors import InputError, StorageError
from pipeline.core.geometry import AXES, Box
from pipeline.core.metrics import scores
from pipeline.core.progress import NullReporter, Reporter
from pipeline.core.tiling import iter_blocks
from pipeline.io.store import Image, open_image
from pipeline.qc.components import BlockComponents, component_stats
from pipeline.qc.seams import seam_check
from pipeline.qc.warnings import qc_warnings
from pipeline.segment.ledger import CONF_BINS, Ledger

logger = logging.getLogger(__name__)

SCHEMA = "studios-qc/1"
HIST_BINS = 64
_TOP = 5


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

    Raises:
        InputError: missing or foreign ``seg``, wrong-shaped scan or truth, unknown class.
    """
    reporter = reporter or NullReporter()
    if not 0.0 < confidence_threshold <= 1.0:
        raise InputError(f"confidence threshold {confidence_threshold} must lie in (0, 1]")
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    image, group, ledger = _open_segmentation(seg)
    attrs = dict(image.attrs)
    classes = [str(c) for c in attrs["classes"]]
    k = len(classes)
    shape = image.shape
    manifest = dict(attrs.get("ledger") or {})
    notes: list[str] = []
    scan_image = _resolve_scan(scan, manifest, shape, notes)
    truth_reader = _TruthReader(truth, shape, k) if truth is not None else None
    probs = _probabilities(group, k, shape)

    t = time.perf_counter()
    facts = _ledger_facts(ledger, k, confidence_threshold, where=str(image.path))
    timings["ledger"] = time.perf_counter() - t
    chosen = _choose_classes(component_classes, classes, facts["counts"])

    t = time.perf_counter()
    qc_block = _qc_block(block, manifest, shape)
    acc = _stream(image.array, qc_block, k, chosen, probs=probs, scan=scan_image, truth=truth_reader,
                  threshold=confidence_threshold, reporter=reporter)
    timings["pass"] = time.perf_counter() - t

    t = time.perf_counter()
    seam = seam_check(image, probs, scan_image, manifest, samples=seam_samples, edge=seam_box, device=device)
    timings["seam_check"] = time.perf_counter() - t

    data = _assemble(image, attrs, manifest, ledger, facts, acc, seam, classes, scan_image, truth, qc_block,
                     confidence_threshold)
    data["warnings"] = notes + qc_warnings(data, rare_fraction=rare_fraction, drift_threshold=drift_threshold)
    data["timings"] = timings
    out = Path(out_dir) if out_dir is not None else image.path / "qc"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"{out}: cannot create the QC folder ({exc}); choose another --out") from None
    report_path = None
    if report:
        from pipeline.qc.report import write_report

        t = time.perf_counter()
        report_path = write_report(_clean(data), out / "report.html", labels=group, scan=scan_image,
                                   probabilities=probs)
        timings["report"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    clean = _clean(data)
    json_path = out / "qc.json"
    _write_text(json_path, json.dumps(clean, indent=1, allow_nan=False) + "\n")
    logger.info("qc of %s: %s, %d warnings, %.1fs", image.path, clean["status"], len(clean["warnings"]),
                timings["total"])
    return QCResult(json_path=json_path, report_path=report_path, data=clean)


# ----------------------------------------------------------------------------- inputs


def _open_segmentation(seg: str | os.PathLike[str]) -> tuple[Image, zarr.Group, Ledger]:
    image = open_image(seg, kind="segmentation", require_complete=False)
    classes = image.attrs.get("classes")
    if not isinstance(classes, list) or not classes or image.array.ndim != 3 or image.array.dtype != np.uint8:
        raise InputError(f"{image.path}: is not a studios segmentation (uint8 (z, y, x) labels with class names); "
                         "make one with 'studios segment'")
    group = zarr.open_group(str(image.path), mode="r")
    try:
        ledger = Ledger(group)
    except (KeyError, AssertionError, TypeError):
        raise InputError(f"{image.path}: has no block ledger; make it with 'studios segment'") from None
    return image, group, ledger


def _resolve_scan(scan: Any, manifest: Mapping[str, Any], shape: tuple[int, ...], notes: list[str]) -> Image | None:
    if scan is not None:
        image = open_image(scan, kind="scan")
    else:
        recorded = manifest.get("scan")
        if not recorded:
            notes.append("no scan given or recorded: intensity histograms, slice views and the seam check are skipped")
            return None
        try:
            image = open_image(recorded, kind="scan")
        except InputError as exc:
            notes.append(f"the segmented scan is not available ({exc}); pass --scan for intensity histograms, "
                         "slice views and the seam check")
            return None
    if image.shape != shape:
        raise InputError(f"{image.path}: scan shape {image.shape} differs from the segmentation {shape}; "
                         "give the scan that was segmented")
    return image


def _probabilities(group: zarr.Group, k: int, shape: tuple[int, ...]) -> zarr.Array | None:
    try:
        arr = group["probabilities/0"]
    except KeyError:
        return None
    if isinstance(arr, zarr.Array) and tuple(arr.shape) == (k, *shape):
        return arr
    return None


class _TruthReader:
    """Dense truth labels read box by box (zarr / studios image / .npy directly; TIFF/HDF5 by z-slab)."""

    def __init__(self, path: str | os.PathLike[str], shape: tuple[int, ...], classes: int) -> None:
        self.path = Path(path)
        self.classes = classes
        self._slab: tuple[int, int, np.ndarray[Any, Any]] | None = None
        self._source: Any = None
        self._array: Any = None
        if not self.path.exists():
            raise InputError(f"{self.path}: truth does not exist; check the path")
        if self.path.suffix.lower() == ".npy":
            try:
                self._array = np.load(self.path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as exc:
                raise InputError(f"{self.path}: truth is not a readable .npy array ({exc})") from None
        elif self.path.is_dir() and ((self.path / "zarr.json").exists() or self.path.suffix.lower() == ".zarr"):
            try:
                node = zarr.open(str(self.path), mode="r")
                self._array = node["0"] if isinstance(node, zarr.Group) else node
            except (KeyError, FileNotFoundError, ValueError, TypeError) as exc:
                raise InputError(f"{self.path}: truth is not a zarr array or studios image ({exc})") from None
        else:
            from pipeline.io.sources import open_source

            self._source = open_source(self.path)
        found = tuple(int(s) for s in (self._array if self._array is not None else self._source).shape)
        dtype = np.dtype((self._array if self._array is not None else self._source).dtype)
        if found != tuple(shape):
            raise InputError(f"{self.path}: truth shape {found} differs from the segmentation {tuple(shape)}; "
                             "give labels for the same volume")
        if dtype.kind not in "uib":
            raise InputError(f"{self.path}: truth has voxel type {dtype}; integer labels (0 = ignore, 1..K) are needed")

    def read(self, box: Box) -> np.ndarray[Any, Any]:
        if self._array is not None:
            data = np.asarray(self._array[box.to_slices()])
        else:
            z0, z1 = box.offset[0], box.end[0]
            if self._slab is None or self._slab[:2] != (z0, z1):
                self._slab = (z0, z1, np.asarray(self._source.read(z0, z1)))
            data = self._slab[2][(slice(None), *box.to_slices()[1:])]
        if data.size and (int(data.min()) < 0 or int(data.max()) > self.classes):
            bad = int(data.max()) if int(data.max()) > self.classes else int(data.min())
            raise InputError(f"{self.path}: truth has label {bad} but the segmentation has {self.classes} classes; "
                             "truth labels must be 0 (ignore) or 1..K")
        return data


def _choose_classes(wanted: Sequence[str | int] | None, classes: Sequence[str], counts: np.ndarray) -> list[int]:
    """Labels (1..K) to analyse for connected components."""
    if wanted is None:
        if counts.sum() == 0:
            return []
        majority = int(np.argmax(counts)) + 1
        return [c for c in range(1, len(classes) + 1) if c != majority]
    out = []
    for w in wanted:
        text = str(w)
        if text in classes:
            out.append(classes.index(text) + 1)
        elif text.isdigit() and 1 <= int(text) <= len(classes):
            out.append(int(text))
        else:
            raise InputError(f"class {text!r} is not one of {', '.join(classes)} (or labels 1..{len(classes)})")
    return sorted(set(out))


def _qc_block(
    block: int | Sequence[int] | None, manifest: Mapping[str, Any], shape: tuple[int, ...]
) -> tuple[int, ...]:
    """The QC block: given, or the run's block capped at 256 per axis (bounds QC memory)."""
    if block is None:
        block = [min(int(v), 256) for v in manifest.get("block") or (256, 256, 256)]
    b = (int(block),) * 3 if isinstance(block, int) else tuple(int(v) for v in block)
    if len(b) != 3 or min(b) < 1:
        raise InputError(f"QC block shape {block!r} must be one or three positive integers")
    return tuple(min(v, s) for v, s in zip(b, shape, strict=True))


# ----------------------------------------------------------------------------- ledger


def _ledger_facts(ledger: Ledger, k: int, threshold: float, *, where: str) -> dict[str, Any]:
    names = ledger.names
    needed = [f"count_{k}", f"isum_{k}", f"isum2_{k}", f"conf_{CONF_BINS - 1}", "entropy_sum"]
    if any(n not in names for n in needed) or f"count_{k + 1}" in names:
        raise InputError(f"{where}: the ledger fields do not match its {k} classes; the output is damaged, "
                         "segment again with --overwrite")
    col = {n: i for i, n in enumerate(names)}
    stats = np.asarray(ledger.stats_array[...], dtype=np.float64)  # type: ignore[index]
    done = ledger.done_mask()
    flat = stats.reshape(-1, len(names))[done.reshape(-1) > 0]
    total = flat.sum(axis=0) if len(flat) else np.zeros(len(names))

    def cols(prefix: str) -> list[int]:
        return [col[f"{prefix}_{c + 1}"] for c in range(k)]

    conf = stats[..., [col[f"conf_{i}"] for i in range(CONF_BINS)]]  # (GZ, GY, GX, 10)
    conf = np.where(done[..., None] == 1, conf, 0.0)
    return {
        "done": done,
        "counts": total[cols("count")],
        "isum": total[cols("isum")],
        "isum2": total[cols("isum2")],
        "conf_hist": total[[col[f"conf_{i}"] for i in range(CONF_BINS)]],
        "entropy_sum": float(total[col["entropy_sum"]]),
        "block_seconds": {n: float(total[col[n]]) for n in ("read_s", "normalize_s", "forward_s", "write_s")},
        "block_conf": conf,
        "threshold": threshold,
    }


def _below(hist: np.ndarray, threshold: float) -> np.ndarray:
    """Counts under ``threshold`` from 10-bin histograms (..., 10); linear within the cut bin."""
    pos = threshold * CONF_BINS
    full = int(math.floor(pos + 1e-9))
    below = hist[..., :full].sum(axis=-1)
    part = pos - full
    if full < CONF_BINS and part > 1e-9:
        below = below + part * hist[..., full]
    return np.asarray(below, dtype=np.float64)


_CENTRES = (np.arange(CONF_BINS) + 0.5) / CONF_BINS


# ----------------------------------------------------------------------------- streaming pass


@dataclass
class _Accumulated:
    profiles: list[np.ndarray]  # per axis (n, K + 1) voxel counts, column 0 = not computed
    components: dict[int, tuple[np.ndarray, np.ndarray]]
    conf_sum: list[np.ndarray] | None = None  # per axis (n,) sum of max probability (uint8 units)
    conf_low: list[np.ndarray] | None = None  # per axis (n,) voxels under the threshold
    conf_total: tuple[float, float, float] = (0.0, 0.0, 0.0)  # (sum q, low, voxels)
    intensity: np.ndarray | None = None  # (K, HIST_BINS)
    edges: np.ndarray | None = None
    confusion: np.ndarray | None = None  # (K + 1, K + 1), row truth, column prediction
    ignored: int = 0


def _plane_sums(values: np.ndarray, dtype: Any = np.int64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    zy = values.sum(axis=2, dtype=dtype)
    return zy.sum(axis=1), zy.sum(axis=0), values.sum(axis=(0, 1), dtype=dtype)


def _stream(
    labels: zarr.Array,
    block_shape: tuple[int, ...],
    k: int,
    chosen: Sequence[int],
    *,
    probs: zarr.Array | None,
    scan: Image | None,
    truth: _TruthReader | None,
    threshold: float,
    reporter: Reporter,
) -> _Accumulated:
    shape = tuple(labels.shape)
    acc = _Accumulated(profiles=[np.zeros((n, k + 1), dtype=np.int64) for n in shape], components={})
    trackers = {c: BlockComponents(shape) for c in chosen}
    if probs is not None:
        acc.conf_sum = [np.zeros(n, dtype=np.float64) for n in shape]
        acc.conf_low = [np.zeros(n, dtype=np.float64) for n in shape]
    lo = hi = 0.0
    if scan is not None:
        st = scan.stats
        lo, hi = st.percentiles.get("0.1", st.min), st.percentiles.get("99.9", st.max)
        if not hi > lo:
            lo, hi = st.min, (st.max if st.max > st.min else st.min + 1.0)
        acc.edges = np.linspace(lo, hi, HIST_BINS + 1)
        acc.intensity = np.zeros((k, HIST_BINS), dtype=np.int64)
    if truth is not None:
        acc.confusion = np.zeros((k + 1, k + 1), dtype=np.int64)
    q_threshold = 255.0 * threshold
    blocks = list(iter_blocks(shape, block_shape, 0))
    reporter.start("qc", len(blocks))
    csum = clow = cvox = 0.0
    for block in blocks:
        sl = block.write.to_slices()
        z0, y0, x0 = block.write.offset
        z1, y1, x1 = block.write.end
        lab = np.asarray(labels[sl])
        for c in range(1, k + 1):
            mask = lab == c
            pz, py, px = _plane_sums(mask)
            acc.profiles[0][z0:z1, c] += pz
            acc.profiles[1][y0:y1, c] += py
            acc.profiles[2][x0:x1, c] += px
            if c in trackers:
                trackers[c].add(block, mask)
        valid = lab > 0
        if probs is not None and acc.conf_sum is not None and acc.conf_low is not None:
            top = np.asarray(probs[(slice(None), *sl)]).max(axis=0)
            top = np.where(valid, top, 0)
            low = valid & (top < q_threshold)
            sums, lows = _plane_sums(top), _plane_sums(low)
            for a, (s, e) in enumerate(((z0, z1), (y0, y1), (x0, x1))):
                acc.conf_sum[a][s:e] += sums[a]
                acc.conf_low[a][s:e] += lows[a]
            csum += float(top.sum(dtype=np.int64))
            clow += float(np.count_nonzero(low))
            cvox += float(np.count_nonzero(valid))
        if scan is not None and acc.intensity is not None:
            raw = np.asarray(scan.array[sl]).astype(np.float32)
            bins = np.clip(((raw - lo) * (HIST_BINS / (hi - lo))).astype(np.int64), 0, HIST_BINS - 1)
            idx = lab.astype(np.int64) * HIST_BINS + bins
            acc.intensity += np.bincount(idx.reshape(-1), minlength=(k + 1) * HIST_BINS).reshape(k + 1, -1)[1:]
        if truth is not None and acc.confusion is not None:
            t = truth.read(block.write).astype(np.int64)
            acc.ignored += int(np.count_nonzero(t == 0))
            idx = t * (k + 1) + lab
            acc.confusion += np.bincount(idx.reshape(-1), minlength=(k + 1) ** 2).reshape(k + 1, k + 1)
        reporter.advance(1, voxels=block.write.size)
    reporter.finish()
    for a in range(3):
        plane = math.prod(s for i, s in enumerate(shape) if i != a)
        acc.profiles[a][:, 0] = plane - acc.profiles[a][:, 1:].sum(axis=1)
    acc.conf_total = (csum, clow, cvox)
    acc.components = {c: tr.finish() for c, tr in trackers.items()}
    return acc


# ----------------------------------------------------------------------------- assembly


def _ratio(a: float, b: float) -> float | None:
    return float(a) / float(b) if b else None


def _assemble(
    image: Image,
    attrs: Mapping[str, Any],
    manifest: Mapping[str, Any],
    ledger: Ledger,
    facts: Mapping[str, Any],
    acc: _Accumulated,
    seam: dict[str, Any],
    classes: Sequence[str],
    scan: Image | None,
    truth: Any,
    qc_block: Sequence[int],
    threshold: float,
) -> dict[str, Any]:
    k = len(classes)
    shape = image.shape
    done = facts["done"]
    run = dict(attrs.get("run") or {})
    failed = dict(run.get("failed") or {})
    missing_idx = [tuple(int(i) for i in ix) for ix in zip(*np.nonzero(done == 0), strict=True)]
    n_blocks = int(done.size)
    status = "complete" if attrs.get("complete") and not missing_idx and not failed else "incomplete"
    counts = facts["counts"]
    computed = float(counts.sum())
    per_class = []
    moments: list[tuple[float, float] | None] = []
    for c in range(k):
        n = float(counts[c])
        if n:
            mean = float(facts["isum"][c]) / n
            moments.append((mean, math.sqrt(max(float(facts["isum2"][c]) / n - mean * mean, 0.0))))
        else:
            moments.append(None)
        ms = moments[c]
        per_class.append({"label": c + 1, "name": classes[c], "voxels": int(n), "fraction": _ratio(n, computed),
                          "intensity_mean": ms[0] if ms else None, "intensity_std": ms[1] if ms else None})
    contrast = []
    for a, b in itertools.combinations(range(k), 2):
        first, second = moments[a], moments[b]
        if first is None or second is None:
            continue
        (ma, sa), (mb, sb) = first, second
        pooled = math.sqrt((sa * sa + sb * sb) / 2)
        contrast.append({"a": a + 1, "b": b + 1, "difference": mb - ma, "cnr": _ratio(abs(mb - ma), pooled)})

    profiles: dict[str, Any] = {}
    conf_layers = _layer_confidence(facts, shape, manifest)
    for a, axis in enumerate(AXES):
        prof = acc.profiles[a]
        comp_n = prof[:, 1:].sum(axis=1)
        fr = {classes[c]: [_ratio(prof[i, c + 1], comp_n[i]) for i in range(len(prof))] for c in range(k)}
        if acc.conf_sum is not None and acc.conf_low is not None:
            conf = [_ratio(acc.conf_sum[a][i] / 255.0, comp_n[i]) for i in range(len(prof))]
            source = "probabilities"
        else:
            conf, source = conf_layers[a], "ledger"
        profiles[axis] = {"fractions": fr, "computed": comp_n.tolist(), "confidence": conf, "confidence_source": source}

    hist = facts["conf_hist"]
    n_conf = float(hist.sum())
    csum, clow, cvox = acc.conf_total
    confidence = {
        "source": "probabilities" if acc.conf_sum is not None else "ledger",
        "threshold": threshold,
        "histogram": {"edges": np.linspace(0, 1, CONF_BINS + 1).tolist(), "counts": hist.astype(np.int64).tolist()},
        "mean_max_probability": _ratio(csum / 255.0, cvox) if acc.conf_sum is not None
        else _ratio(float((hist * _CENTRES).sum()), n_conf),
        "low_fraction": _ratio(clow, cvox) if acc.conf_sum is not None
        else _ratio(float(_below(hist, threshold)), n_conf),
        "mean_entropy": _ratio(facts["entropy_sum"], computed),
        "mean_normalized_entropy": _ratio(facts["entropy_sum"], computed * math.log(k)) if k > 1 else None,
        "lowest_slices": _lowest_slices(profiles, acc, shape, manifest.get("block") or shape),
        "lowest_blocks": _lowest_blocks(facts, manifest, shape, threshold),
    }
    comp_classes = {classes[c - 1]: component_stats(c, volumes, touches, int(acc.profiles[0][:, c].sum()))
                    for c, (volumes, touches) in acc.components.items()}
    components = {"connectivity": 6, "block": list(qc_block), "classes": comp_classes}

    intensity = None
    if acc.intensity is not None and acc.edges is not None:
        intensity = {"edges": acc.edges.tolist(),
                     "counts": {classes[c]: acc.intensity[c].tolist() for c in range(k)}}
    block_seconds = facts["block_seconds"]
    n_done = int((done > 0).sum())
    return {
        "schema": SCHEMA,
        "status": status,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "studios_version": __version__,
        "inputs": {"segmentation": str(image.path), "scan": str(scan.path) if scan else None,
                   "truth": str(truth) if truth is not None else None, "model": str(image.path / "model")},
        "volume": {"shape": list(shape), "voxel_size": list(image.voxel_size), "voxels": math.prod(shape),
                   "computed_voxels": int(acc.profiles[0][:, 1:].sum()),
                   "not_computed_fraction": _ratio(acc.profiles[0][:, 0].sum(), math.prod(shape))},
        "classes": per_class,
        "contrast": contrast,
        "intensity_histograms": intensity,
        "profiles": profiles,
        "confidence": confidence,
        "components": components,
        "seam_check": seam,
        "truth": _truth_metrics(acc, classes, truth) if acc.confusion is not None else None,
        "blocks": {"total": n_blocks, "done": n_done, "computed": int((done == 1).sum()),
                   "skipped": int((done == 2).sum()), "missing": len(missing_idx),
                   "missing_ids": ["-".join(map(str, ix)) for ix in missing_idx[:20]], "failed": failed},
        "run": {
            "complete": bool(attrs.get("complete", False)), "finished": run.get("finished"), "host": run.get("host"),
            "studios_version": run.get("studios_version"), "seconds": run.get("seconds"),
            "voxels_per_second": run.get("voxels_per_second"), "stage_seconds": run.get("stage_seconds"),
            "block_seconds": block_seconds, "workers": run.get("workers"), "exact": manifest.get("exact"),
            "probabilities": manifest.get("probabilities"), "block": manifest.get("block"),
            "chunks": manifest.get("chunks"), "model_fingerprint": manifest.get("model_fingerprint"),
            "model": run.get("model"),
        },
    }


def _layer_confidence(facts: Mapping[str, Any], shape: Sequence[int], manifest: Mapping[str, Any]) -> list[list[Any]]:
    """Per-plane mean confidence from the ledger: each plane gets the value of its block layer."""
    conf = facts["block_conf"]  # (GZ, GY, GX, 10)
    block = manifest.get("block") or shape
    out = []
    for a in range(3):
        other = tuple(i for i in range(3) if i != a)
        layer = conf.sum(axis=other)  # (G_a, 10)
        n = layer.sum(axis=1)
        mean = [_ratio(float((layer[g] * _CENTRES).sum()), float(n[g])) for g in range(len(layer))]
        out.append([mean[min(i // int(block[a]), len(mean) - 1)] for i in range(shape[a])])
    return out


def _lowest_slices(
    profiles: Mapping[str, Any], acc: _Accumulated, shape: Sequence[int], block: Sequence[int]
) -> list[dict[str, Any]]:
    """Up to 3 planes per axis with the lowest mean confidence, at least 1/20 of the axis apart.

    From the ledger (no stored probabilities) only the centre plane of each block layer is a candidate.
    """
    out = []
    for a, axis in enumerate(AXES):
        conf = profiles[axis]["confidence"]
        computed = profiles[axis]["computed"]
        plane = math.prod(s for i, s in enumerate(shape) if i != a)
        if acc.conf_low is None:
            b = int(block[a])
            planes = [(g + min(g + b, shape[a])) // 2 for g in range(0, shape[a], b)]
        else:
            planes = list(range(shape[a]))
        cand = [i for i in planes if conf[i] is not None and computed[i] >= 0.01 * plane]
        cand.sort(key=lambda i: conf[i])
        gap = max(1, shape[a] // 20)
        picked: list[int] = []
        for i in cand:
            if all(abs(i - j) >= gap for j in picked):
                picked.append(i)
            if len(picked) == 3:
                break
        for i in picked:
            low = _ratio(acc.conf_low[a][i], computed[i]) if acc.conf_low is not None else None
            out.append({"axis": axis, "index": i, "mean_confidence": conf[i], "low_fraction": low})
    out.sort(key=lambda d: d["mean_confidence"])
    return out


def _lowest_blocks(facts: Mapping[str, Any], manifest: Mapping[str, Any], shape: Sequence[int],
                   threshold: float) -> list[dict[str, Any]]:
    conf = facts["block_conf"]
    n = conf.sum(axis=-1)
    low = _below(conf, threshold)
    mean = (conf * _CENTRES).sum(axis=-1)
    block = [int(b) for b in (manifest.get("block") or shape)]
    idx = [tuple(int(i) for i in ix) for ix in zip(*np.nonzero(n > 0), strict=True)]
    idx.sort(key=lambda ix: (-low[ix] / n[ix], mean[ix] / n[ix]))
    out = []
    for ix in idx[:_TOP]:
        box = Box(tuple(i * b for i, b in zip(ix, block, strict=True)), tuple(block)).intersect(Box.from_shape(shape))
        out.append({"id": "-".join(map(str, ix)), "offset": list(box.offset), "shape": list(box.shape),
                    "mean_confidence": float(mean[ix] / n[ix]), "low_fraction": float(low[ix] / n[ix])})
    return out


def _truth_metrics(acc: _Accumulated, classes: Sequence[str], truth: Any) -> dict[str, Any]:
    conf = acc.confusion
    if conf is None:
        raise InputError("truth metrics were requested but no truth was accumulated; pass --truth")
    k = len(classes)
    summary = scores(conf[1:, 1:], classes)  # truth 1..K x prediction 1..K
    return {
        "path": str(truth), "compared_voxels": summary["voxels"], "ignored_voxels": int(acc.ignored),
        "not_computed_voxels": int(conf[1:, 0].sum()), "per_class": summary["per_class"],
        "mean_iou": summary["mean_iou"], "accuracy": summary["accuracy"], "kappa": summary["kappa"],
        "confusion": {"labels": list(range(1, k + 1)), "matrix": conf[1:, 1:].tolist()},
    }


# ----------------------------------------------------------------------------- output


def _clean(value: Any) -> Any:
    """JSON-ready copy: numpy scalars to Python, NaN/Inf to None, floats to 6 significant digits."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_clean(v) for v in value.tolist()]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        v = float(value)
        return float(f"{v:.6g}") if math.isfinite(v) else None
    return value


def _write_text(path: Path, text: str) -> None:
    """Write via a temporary sibling and rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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
