"""Objects: a global instance-label image and an object table, computed block by block.

Pass 1 labels each block's write box per class (``scipy.ndimage.label``, face connectivity) and
returns, per piece, its voxel count, first and second moments (about the block origin, so the
sums stay small and exact) and bounding box, with the block's label faces. The faces are joined
across block faces by the union-find of :class:`pipeline.qc.components.BlockComponents`
(``scipy.sparse.csgraph.connected_components``). Pieces are combined into objects with the
parallel-axis rule (no global coordinate is ever squared). Pass 2 labels each block again
(deterministic) and writes ``lut[piece]`` into the instance image: every write box owns whole
output chunks, so blocks never share a chunk.

The result equals ``scipy.ndimage.label`` of each class on the whole volume up to renumbering,
and the table equals scikit-image ``regionprops`` (tests/test_analyse_objects.py).

Memory: per block, its labels; in the merge, one row of moments per piece and the label faces
of the blocks (4 bytes per face voxel), never the volume.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import ndimage

from pipeline.compute.executors import Executor, SerialExecutor
from pipeline.core.errors import BlockFailedError
from pipeline.core.progress import Reporter
from pipeline.core.tiling import Block
from pipeline.qc.components import BlockComponents, block_faces

logger = logging.getLogger(__name__)

#: Table columns, in order (units: voxel indices for bbox, physical units for the rest).
COLUMNS = (
    "id", "class", "label", "voxels", "volume", "centroid_z", "centroid_y", "centroid_x",
    "bbox_z0", "bbox_y0", "bbox_x0", "bbox_z1", "bbox_y1", "bbox_x1", "equivalent_diameter",
    "axis_major", "axis_middle", "axis_minor", "direction_z", "direction_y", "direction_x",
    "elongation", "touches_border",
)


@dataclass(frozen=True)
class ObjectsJob:
    """What a block task needs (coordinates and paths only; picklable)."""

    seg: str
    labels: tuple[int, ...]
    out: str = ""  # instance array (pass 2)
    lut: str = ""  # .npy of global ids per piece (pass 2)
    bases: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = ()  # block index -> base per label


def _open(path: str, *, mode: Literal["r", "r+"] = "r") -> Any:
    """Level 0 of the OME-Zarr group at ``path``."""
    import zarr

    return zarr.open_group(path, mode=mode)["0"]


def piece_moments(lab: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Per piece 1..n of a (Z, Y, X) label block: ``count`` (n,), ``s1`` (n, 3) coordinate sums,
    ``m2`` (n, 3, 3) central second moments, ``lo``/``hi`` (n, 3) bounding box (half-open), all
    about the block origin, float64 except the int64 count and box."""
    idx = np.flatnonzero(lab)
    ids = lab.reshape(-1)[idx] - 1
    coords = np.unravel_index(idx, lab.shape)
    count = np.bincount(ids, minlength=n).astype(np.int64)
    s1 = np.stack([np.bincount(ids, weights=c, minlength=n) for c in coords], axis=1).astype(np.float64)
    mean = s1 / np.maximum(count, 1)[:, None]
    m2 = np.zeros((n, 3, 3))
    d = [c - mean[ids, a] for a, c in enumerate(coords)]
    for a in range(3):
        for b in range(a, 3):
            m2[:, a, b] = m2[:, b, a] = np.bincount(ids, weights=d[a] * d[b], minlength=n)
    lo = np.zeros((n, 3), dtype=np.int64)
    hi = np.zeros((n, 3), dtype=np.int64)
    for j, sl in enumerate(ndimage.find_objects(lab, max_label=n)):
        if sl is not None:
            lo[j] = [s.start for s in sl]
            hi[j] = [s.stop for s in sl]
    return {"count": count, "s1": s1, "m2": m2, "lo": lo, "hi": hi}


def label_block(job: ObjectsJob, block: Block) -> dict[str, Any]:
    """Pass 1 for one block: per label, its pieces' moments (global offsets) and faces."""
    seg = np.asarray(_open(job.seg)[block.write.to_slices()])
    out: dict[str, Any] = {"block": block.index, "voxels": int(seg.size), "classes": {}}
    origin = np.asarray(block.write.offset, dtype=np.float64)
    for label in job.labels:
        lab, n = ndimage.label(seg == label)
        lab = lab.astype(np.int32, copy=False)
        mom = piece_moments(lab, n)
        mom["s1"] += mom["count"][:, None] * origin
        mom["lo"] += np.asarray(block.write.offset)
        mom["hi"] += np.asarray(block.write.offset)
        faces = [(lo.copy(), hi.copy()) for lo, hi in block_faces(lab)]
        out["classes"][label] = {"n": n, "moments": mom, "faces": faces}
    return out


def write_block(job: ObjectsJob, block: Block) -> dict[str, Any]:
    """Pass 2 for one block: write the global object ids of its write box."""
    seg = np.asarray(_open(job.seg)[block.write.to_slices()])
    lut = np.load(job.lut, mmap_mode="r")
    bases = dict(job.bases)[block.index]
    dst = _open(job.out, mode="r+")
    ids = np.zeros(seg.shape, dtype=dst.dtype)
    for label, base in zip(job.labels, bases, strict=True):
        lab, n = ndimage.label(seg == label)
        if n:
            table = np.concatenate([[0], np.asarray(lut[base:base + n])]).astype(dst.dtype)
            ids += table[lab]
    dst[block.write.to_slices()] = ids
    return {"block": block.index, "voxels": int(seg.size)}


def _run(executor: Executor, fn: Any, job: ObjectsJob, blocks: Sequence[Block], reporter: Reporter | None,
         what: str) -> list[dict[str, Any]]:
    outcome = executor.run(fn, job, blocks, reporter=reporter)
    if outcome.failed:
        first = sorted(outcome.failed)[0]
        raise BlockFailedError(f"{job.seg}: {what} failed in {len(outcome.failed)} block(s), first {first}: "
                               f"{outcome.failed[first]}; fix the cause and rerun")
    return sorted(outcome.results, key=lambda r: tuple(r["block"]))


@dataclass(frozen=True)
class Objects:
    """The merged objects of all chosen classes.

    Attributes:
        table: column name -> (N,) array, see :data:`COLUMNS`; ids are 1..N.
        lut: (pieces,) uint64 global id of every pass-1 piece, in block order per class.
        bases: block index -> first piece of each chosen label in ``lut``.
    """

    table: Mapping[str, np.ndarray]
    lut: np.ndarray
    bases: dict[tuple[int, ...], tuple[int, ...]]

    @property
    def count(self) -> int:
        return len(self.table["id"])


def find_objects(
    seg: Path, shape: tuple[int, ...], blocks: Sequence[Block], labels: Mapping[int, str], *,
    voxel_size: Sequence[float], executor: Executor | None = None, reporter: Reporter | None = None,
) -> Objects:
    """Pass 1 and the merge: the object table and the piece -> id table for pass 2."""
    executor = executor or SerialExecutor()
    job = ObjectsJob(seg=str(seg), labels=tuple(labels))
    results = _run(executor, label_block, job, blocks, reporter, "object labelling")
    by_index = {tuple(r["block"]): r for r in results}
    columns: list[dict[str, np.ndarray]] = []
    luts: list[np.ndarray] = []
    bases: dict[tuple[int, ...], list[int]] = {tuple(b.index): [] for b in blocks}
    next_id = 1
    offset = 0
    for label in labels:
        comps = BlockComponents(shape)
        parts: list[dict[str, np.ndarray]] = []
        for block in blocks:
            r = by_index[tuple(block.index)]["classes"][label]
            base = comps.add_faces(block, r["n"], r["moments"]["count"], r["faces"])
            bases[tuple(block.index)].append(offset + base)
            if r["n"]:
                parts.append(r["moments"])
        offset += comps.next_id
        if not comps.next_id:
            continue
        n, comp = comps.merge()
        merged = _combine(parts, comp, n)
        order = np.argsort(merged["first"], kind="stable")  # ids in order of first piece (block order)
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n)
        luts.append((rank[comp] + next_id).astype(np.uint64))
        touches = np.bincount(comp, weights=np.concatenate(comps.border), minlength=n) > 0
        cols = _properties(merged, touches, voxel_size)
        cols = {k: v[order] for k, v in cols.items()}
        cols["id"] = np.arange(next_id, next_id + n, dtype=np.int64)
        cols["label"] = np.full(n, label, dtype=np.int64)
        cols["class"] = np.full(n, labels[label], dtype=object)
        columns.append(cols)
        next_id += n
    table = {c: np.concatenate([col[c] for col in columns]) if columns else np.zeros(0) for c in COLUMNS}
    lut = np.concatenate(luts) if luts else np.zeros(0, dtype=np.uint64)
    return Objects(table=table, lut=lut, bases={k: tuple(v) for k, v in bases.items()})


def write_instances(
    seg: Path, out: Path, objects: Objects, blocks: Sequence[Block], labels: Sequence[int], *,
    executor: Executor | None = None, reporter: Reporter | None = None,
) -> None:
    """Pass 2: ids into level 0 of the OME-Zarr group ``out`` (an existing array of the scan's shape)."""
    lut_path = out.with_name(out.name + ".lut.npy")
    np.save(lut_path, objects.lut)
    job = ObjectsJob(seg=str(seg), labels=tuple(labels), out=str(out), lut=str(lut_path),
                     bases=tuple(objects.bases.items()))
    try:
        _run(executor or SerialExecutor(), write_block, job, blocks, reporter, "writing the instance image")
    finally:
        lut_path.unlink(missing_ok=True)


def _combine(parts: list[dict[str, np.ndarray]], comp: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Moments of merged components from their pieces (parallel-axis rule)."""
    count = np.concatenate([p["count"] for p in parts])
    s1 = np.concatenate([p["s1"] for p in parts])
    m2 = np.concatenate([p["m2"] for p in parts])
    lo = np.concatenate([p["lo"] for p in parts])
    hi = np.concatenate([p["hi"] for p in parts])
    total = np.bincount(comp, weights=count, minlength=n)
    mean = np.stack([np.bincount(comp, weights=s1[:, a], minlength=n) for a in range(3)], axis=1) / total[:, None]
    piece_mean = s1 / count[:, None]
    d = piece_mean - mean[comp]
    cov = np.zeros((n, 3, 3))
    for a in range(3):
        for b in range(a, 3):
            w = m2[:, a, b] + count * d[:, a] * d[:, b]
            cov[:, a, b] = cov[:, b, a] = np.bincount(comp, weights=w, minlength=n)
    cov /= total[:, None, None]
    blo = np.full((n, 3), np.iinfo(np.int64).max, dtype=np.int64)
    bhi = np.zeros((n, 3), dtype=np.int64)
    np.minimum.at(blo, comp, lo)
    np.maximum.at(bhi, comp, hi)
    first = np.full(n, len(comp), dtype=np.int64)
    np.minimum.at(first, comp, np.arange(len(comp)))
    return {"count": total.astype(np.int64), "mean": mean, "cov": cov, "lo": blo, "hi": bhi, "first": first}


def _properties(m: dict[str, np.ndarray], touches: np.ndarray, voxel_size: Sequence[float]) -> dict[str, np.ndarray]:
    """Table columns (physical units) from merged moments; axes from the covariance (voxel
    spacing applied), lengths ``2 sqrt(5 lambda)`` (the solid ellipsoid with the same second
    moments, as scikit-image's ``axis_major_length``)."""
    vs = np.asarray(voxel_size, dtype=np.float64)
    cov = m["cov"] * vs[None, :, None] * vs[None, None, :]
    evals, evecs = np.linalg.eigh(cov)  # ascending
    evals = np.clip(evals, 0.0, None)
    lengths = 2.0 * np.sqrt(5.0 * evals)
    major = evecs[:, :, 2]
    major = major * np.where(major[:, :1] < 0, -1.0, 1.0)  # sign: direction_z >= 0
    volume = m["count"] * math.prod(vs)
    with np.errstate(divide="ignore", invalid="ignore"):
        elongation = np.where(lengths[:, 1] > 0, lengths[:, 2] / lengths[:, 1], np.inf)
    cols: dict[str, np.ndarray] = {
        "voxels": m["count"], "volume": volume,
        "equivalent_diameter": np.cbrt(6.0 * volume / np.pi),
        "axis_major": lengths[:, 2], "axis_middle": lengths[:, 1], "axis_minor": lengths[:, 0],
        "elongation": elongation, "touches_border": touches.astype(bool),
    }
    for a, name in enumerate("zyx"):
        cols[f"centroid_{name}"] = m["mean"][:, a] * vs[a]
        cols[f"bbox_{name}0"] = m["lo"][:, a]
        cols[f"bbox_{name}1"] = m["hi"][:, a]
        cols[f"direction_{name}"] = major[:, a]
    return cols


def write_table(table: Mapping[str, np.ndarray], path_stem: Path) -> Path:
    """Write the table as ``<stem>.parquet`` (pyarrow) or, without pyarrow, ``<stem>.csv``."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        import csv

        path = path_stem.with_suffix(".csv")
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(COLUMNS)
            for i in range(len(table["id"])):
                w.writerow([table[c][i] for c in COLUMNS])
        return path
    path = path_stem.with_suffix(".parquet")
    arrays = {c: pa.array(table[c].tolist() if c == "class" else table[c]) for c in COLUMNS}
    pq.write_table(pa.table(arrays), path)
    return path


__all__ = ["COLUMNS", "Objects", "ObjectsJob", "find_objects", "label_block", "piece_moments", "write_block",
           "write_instances", "write_table"]
