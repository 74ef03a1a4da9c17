"""``analyse``: quantify a segmentation block by block (objects, orientation, pores, surfaces).

Output folder (default ``SEG.analysis`` beside ``SEG.zarr``)::

    objects.zarr/      global instance labels (uint32, uint64 past 2^32-1 objects), OME-Zarr label image
    objects.parquet    object table (objects.csv without pyarrow), columns in pipeline.analyse.objects.COLUMNS
    orientation.zarr/  (3, Z, Y, X) float32 fibre directions (only with orientation_field=True)
    meshes/CLASS.stl, CLASS.ply, precomputed/   per-class surfaces
    thumbnail.png      the middle z-slice in the label colours (dashboards)
    analysis.json      every figure, keys in docs/analysis.md

Each measure reads blocks with the halo its operator needs (0 for objects and phases,
``ceil(4 sigma) + ceil(4 rho)`` for orientation, ``2 R`` for local thickness, the smoothing
radius + 1 for meshes); see the modules for why each is exact.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import __version__
from pipeline.analyse import objects as obj
from pipeline.analyse import orientation as ori
from pipeline.analyse import pores, surfaces
from pipeline.compute.executors import Executor
from pipeline.core.errors import InputError, OutputExistsError
from pipeline.core.progress import NullReporter, Reporter
from pipeline.core.tiling import Block, plan_blocks
from pipeline.io.labels import list_in_scan, relative_source
from pipeline.io.store import create_array, create_group, multiscales, open_image, read_padded

logger = logging.getLogger(__name__)

FIBRE_NAMES = ("fibre", "fiber", "fibres", "fibers")
PORE_NAMES = ("pore", "pores", "void", "voids", "air", "porosity")


@dataclass(frozen=True)
class AnalysisResult:
    """Where the outputs are, and the analysis.json content."""

    out: Path
    data: dict[str, Any]

    @property
    def json_path(self) -> Path:
        return self.out / "analysis.json"


def _resolve(spec: str | int | None, classes: Sequence[str], names: Sequence[str], what: str, seg: Path) -> int | None:
    if spec is None:
        return next((k for k, c in enumerate(classes, 1) if c.lower() in names), None)
    if isinstance(spec, int) or str(spec).isdigit():
        k = int(spec)
        if 1 <= k <= len(classes):
            return k
    elif spec in classes:
        return list(classes).index(spec) + 1
    raise InputError(f"{seg}: has no class {spec!r} for {what}; "
                     f"choose one of {', '.join(classes)} (or 1..{len(classes)})")


def analyse(
    seg: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    classes: Sequence[str | int] | None = None,
    fibre: str | int | None = None,
    pore: str | int | None = None,
    sigma: float = 1.0,
    rho: float = 3.0,
    mesh_sigma: float = 1.0,
    meshes: bool = True,
    orientation_field: bool = False,
    max_radius: int = 16,
    block: int | Sequence[int] | None = None,
    device: str = "cpu",
    executor: Executor | None = None,
    overwrite: bool = False,
    reporter: Reporter | None = None,
) -> AnalysisResult:
    """Analyse a finished segmentation; writes the folder described in the module docstring.

    Args:
        seg: a complete studios segmentation (``seg.zarr``).
        out: output folder (default ``SEG.analysis`` beside it).
        classes: classes (names or labels) for objects and meshes (default: every class but the
            most frequent one, the matrix).
        fibre: class for the orientation analysis (default: a class named fibre/fiber; none: skipped).
        pore: class for porosity, pore sizes and local thickness (default: pore/void/air).
        sigma, rho: structure-tensor noise and integration scales (voxels).
        mesh_sigma: Gaussian smoothing of a class mask before marching cubes (0: raw).
        block: block edge (default: the segmentation's chunks, at least 128 per axis).
        device: torch device for the structure tensor.
        executor: runs the object passes (default in-process, :class:`SerialExecutor`).
    """
    seg = Path(seg)
    image = open_image(seg, kind="segmentation")
    names = [str(c) for c in image.attrs.get("classes", [])]
    if not names:
        raise InputError(f"{seg}: records no class names; rewrite it with 'studios segment'")
    out = Path(out) if out is not None else seg.with_name(seg.stem + ".analysis")
    o, s_ = out.resolve(), seg.resolve()
    if o == s_ or s_ in o.parents or o in s_.parents:
        raise InputError(f"{out}: would overlap the segmentation {seg}; choose another --out")
    if out.exists():
        if not overwrite:
            raise OutputExistsError(f"{out}: already exists; pass --overwrite to replace it or choose another --out")
        shutil.rmtree(out)
    fibre_k = _resolve(fibre, names, FIBRE_NAMES, "orientation", seg)
    pore_k = _resolve(pore, names, PORE_NAMES, "porosity", seg)
    chosen: list[int] | None = None
    if classes is not None:
        chosen = [k for k in (_resolve(c, names, (), "objects", seg) for c in classes) if k is not None]
    shape = image.shape
    chunks = tuple(int(c) for c in image.array.chunks)
    edge = (block,) * 3 if isinstance(block, int) else tuple(block) if block is not None else tuple(
        c * max(1, math.ceil(128 / c)) for c in chunks)
    blocks = plan_blocks(shape, edge, 0, chunk_shape=chunks)
    reporter = reporter or NullReporter()
    vs = image.voxel_size
    seconds: dict[str, float] = {}
    out.mkdir(parents=True)
    data: dict[str, Any] = {"version": 1, "segmentation": str(seg.resolve()), "shape": list(shape),
                            "voxel_size": list(vs), "classes": names, "block": list(edge), "blocks": len(blocks),
                            "studios_version": __version__, "source_run": segmentation_identity(seg)}

    t = time.perf_counter()
    counts = pores.PhaseCounts(shape, len(names))
    for b in blocks:
        counts.add(b.write.offset, np.asarray(image.array[b.write.to_slices()]))
    data["phases"] = counts.to_json(names, vs)
    seconds["phases"] = time.perf_counter() - t
    if chosen is None:
        by_size = sorted(range(1, len(names) + 1), key=lambda k: -data["phases"]["classes"][names[k - 1]]["voxels"])
        chosen = sorted(by_size[1:])
    labels = {k: names[k - 1] for k in chosen}

    t = time.perf_counter()
    found = obj.find_objects(seg, shape, blocks, labels, voxel_size=vs, executor=executor, reporter=reporter)
    dtype = "uint32" if found.count < 2**32 - 1 else "uint64"
    group = create_group(out / "objects.zarr")
    create_array(group, "0", shape=shape, dtype=dtype, chunks=chunks)
    obj.write_instances(seg, out / "objects.zarr", found, blocks, list(labels), executor=executor, reporter=reporter)
    scan = _scan(image.attrs)
    group.attrs["ome"] = {"version": "0.5", "multiscales": [multiscales(1, voxel_size=vs, name="objects")],
                          "image-label": {"source": {"image": relative_source(out / "objects.zarr", scan or seg)}}}
    group.attrs["studios"] = {"kind": "objects", "classes": {str(k): v for k, v in labels.items()}, "complete": True}
    if scan is not None:
        list_in_scan(scan, out / "objects.zarr")
    table_path = obj.write_table(found.table, out / "objects")
    seconds["objects"] = time.perf_counter() - t
    data["objects"] = _objects_json(found, labels, table_path, out)

    t = time.perf_counter()
    data["orientation"] = None if fibre_k is None else _orientation(
        image, blocks, fibre_k, names, sigma=sigma, rho=rho, device=device, out=out if orientation_field else None)
    seconds["orientation"] = time.perf_counter() - t

    t = time.perf_counter()
    data["pores"] = None if pore_k is None else _pores(image, blocks, pore_k, names, found, max_radius)
    seconds["pores"] = time.perf_counter() - t

    t = time.perf_counter()
    data["surfaces"] = _surfaces(image, blocks, labels, mesh_sigma, out) if meshes else None
    seconds["surfaces"] = time.perf_counter() - t

    t = time.perf_counter()
    data["thumbnail"] = write_thumbnail(image, out / "thumbnail.png")
    seconds["thumbnail"] = time.perf_counter() - t

    data["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    data["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    (out / "analysis.json").write_text(json.dumps(data, indent=1))
    logger.info("analyse %s: %d objects, %s in %.1fs -> %s", seg, found.count, ", ".join(
        f"{n} {100 * (c['fraction'] or 0):.2f}%" for n, c in data["phases"]["classes"].items()),
        sum(seconds.values()), out)
    return AnalysisResult(out=out, data=data)


def segmentation_identity(seg: str | os.PathLike[str]) -> dict[str, Any]:
    """What names one finished segmentation: path, model fingerprint, finish time of its run and
    the time its metadata (``zarr.json``, rewritten when a run completes) was last written, in ns.

    An ``analysis.json`` with the same identity analysed this very output (not an earlier one
    overwritten since); the flows reuse it instead of analysing again.
    """
    path = Path(seg).resolve()
    try:
        attrs = open_image(seg, kind="segmentation").attrs
        written = (path / "zarr.json").stat().st_mtime_ns
    except (InputError, OSError):
        return {"segmentation": str(path)}
    ledger: dict[str, Any] = attrs["ledger"] if isinstance(attrs.get("ledger"), dict) else {}
    run: dict[str, Any] = attrs["run"] if isinstance(attrs.get("run"), dict) else {}
    return {"segmentation": str(path), "model_fingerprint": ledger.get("model_fingerprint"),
            "finished": run.get("finished"), "written": written}


def write_thumbnail(image: Any, path: Path, max_px: int = 256) -> str:
    """The middle z-slice of a segmentation as a PNG in the label colours (0 black); its file name.

    Read from the finest pyramid level whose slice is at most ``max_px`` on a side (every
    ``step``-th voxel of level 0 otherwise), so the cost does not grow with the volume.
    """
    from matplotlib.image import imsave

    from pipeline.io.labels import class_color

    array = image.array
    _, y, x = image.shape
    step = max(1, math.ceil(max(y, x) / max_px))
    plane = np.asarray(array[image.shape[0] // 2, ::step, ::step])
    colours = np.zeros((256, 3), dtype=np.uint8)
    for k in range(1, 256):
        colours[k] = class_color(k)[:3]
    imsave(path, colours[plane])
    return path.name


def headline(data: dict[str, Any]) -> dict[str, Any]:
    """The figures a dashboard shows for one ``analysis.json``: fibre fraction, porosity, objects.

    ``fibre`` / ``pore``: ``{"class": name, "fraction": f}`` of the analysed orientation and pore
    classes (``None`` when the analysis had none); ``fraction`` among computed voxels.
    """
    phases = (data.get("phases") or {}).get("classes") or {}

    def part(key: str) -> dict[str, Any] | None:
        section = data.get(key)
        if not isinstance(section, dict) or section.get("class") not in phases:
            return None
        return {"class": section["class"], "fraction": phases[section["class"]].get("fraction")}

    orientation = data.get("orientation") or {}
    return {"fibre": part("orientation"), "pore": part("pores"),
            "objects": (data.get("objects") or {}).get("count"),
            "main_direction": orientation.get("main_direction"), "thumbnail": data.get("thumbnail"),
            "finished": data.get("finished")}


def _scan(attrs: Any) -> Path | None:
    recorded = attrs.get("ledger", {}).get("scan") if isinstance(attrs.get("ledger"), dict) else None
    return Path(recorded) if recorded and Path(recorded).is_dir() else None


def _objects_json(found: obj.Objects, labels: dict[int, str], table: Path, out: Path) -> dict[str, Any]:
    t = found.table
    per: dict[str, Any] = {}
    for k, name in labels.items():
        rows = t["label"] == k
        d = np.asarray(t["equivalent_diameter"][rows], dtype=np.float64)
        per[name] = {"label": k, "count": int(rows.sum()), "touching_border": int(np.sum(t["touches_border"][rows])),
                     "mean_equivalent_diameter": float(d.mean()) if len(d) else None,
                     "max_voxels": int(np.max(t["voxels"][rows])) if len(d) else 0}
    return {"count": found.count, "instance_image": str((out / "objects.zarr").name), "table": table.name,
            "connectivity": "face (6)", "classes": per}


def _orientation(image: Any, blocks: Sequence[Block], k: int, names: Sequence[str], *, sigma: float, rho: float,
                 device: str, out: Path | None) -> dict[str, Any]:
    h = ori.halo_for(sigma, rho)
    stats = ori.OrientationStats()
    field = None
    if out is not None:
        g = create_group(out / "orientation.zarr")
        field = create_array(g, "0", shape=(3, *image.shape), dtype="float32", chunks=(3, *image.array.chunks),
                             dimension_names=("c", "z", "y", "x"))
        g.attrs["ome"] = {"version": "0.5", "multiscales": [multiscales(1, voxel_size=image.voxel_size, ndim=4,
                                                                        name="orientation")]}
    for b in blocks:
        padded = read_padded(image.array, Block(b.index, b.write, b.write.grow(h)), image.shape)
        inner = padded[tuple(slice(h, h + s) for s in b.write.shape)] == k
        if not inner.any():
            continue
        tensor = ori.structure_tensor(padded == k, sigma, rho, device=device)
        p = ori.directions(tensor[torch.as_tensor(inner, device=tensor.device)]).cpu().numpy()  # (N, 3)
        stats.add(p)
        if field is not None:
            vec = np.zeros((3, *b.write.shape), dtype=np.float32)
            vec[:, inner] = p.T
            field[(slice(None), *b.write.to_slices())] = vec
    return {"class": names[k - 1], "label": k, "sigma": sigma, "rho": rho, "halo": h, "method": "torch",
            "field": "orientation.zarr" if field is not None else None, **stats.to_json()}


def _pores(image: Any, blocks: Sequence[Block], k: int, names: Sequence[str], found: obj.Objects,
           max_radius: int) -> dict[str, Any]:
    t = found.table
    rows = t["label"] == k
    extent = np.min(np.stack([t[f"bbox_{a}1"][rows] - t[f"bbox_{a}0"][rows] for a in "zyx"]), axis=0) \
        if rows.any() else np.zeros(0)
    radius = pores.thickness_radius(extent, max_radius) if rows.any() else max_radius
    hist = np.zeros(radius + 1, dtype=np.int64)
    for b in blocks:
        th = pores.thickness_block(image.array, b.write, image.shape, k, radius)
        hist += np.bincount((th[th > 0] / 2).astype(np.int64), minlength=radius + 1)[: radius + 1]
    voxels = int(hist.sum())
    vs = image.voxel_size
    iso = max(vs) - min(vs) < 1e-9 * max(vs)
    phase = {"class": names[k - 1], "label": k}
    return {
        **phase,
        "size_distribution": pores.size_distribution(np.asarray(t["equivalent_diameter"][rows], dtype=np.float64),
                                                     np.asarray(t["volume"][rows], dtype=np.float64))
        if rows.any() else None,
        "local_thickness": {
            "unit": "voxel", "radius_cap": radius, "capped": bool(rows.any() and radius == max_radius),
            "halo": 2 * radius, "physical_scale": float(vs[0]) if iso else None,
            "values": [2 * r for r in range(1, radius + 1)], "voxels": hist[1:].tolist(),
            "mean": float((hist[1:] * 2 * np.arange(1, radius + 1)).sum() / voxels) if voxels else None,
        },
    }


def _surfaces(image: Any, blocks: Sequence[Block], labels: dict[int, str], sigma: float, out: Path) -> dict[str, Any]:
    mdir = out / "meshes"
    mdir.mkdir()
    done: dict[int, surfaces.Mesh] = {}
    info: dict[str, Any] = {"sigma": sigma, "classes": {}}
    for k, name in labels.items():
        builder = surfaces.MeshBuilder()
        for b in blocks:
            builder.add(*surfaces.block_mesh(image.array, b, image.shape, k, sigma))
        mesh = builder.finish(image.voxel_size)
        done[k] = mesh
        surfaces.write_stl(mesh, mdir / f"{name}.stl")
        surfaces.write_ply(mesh, mdir / f"{name}.ply")
        info["classes"][name] = {"label": k, "vertices": len(mesh.vertices), "faces": len(mesh.faces),
                                 "area": mesh.area, "stl": f"meshes/{name}.stl", "ply": f"meshes/{name}.ply",
                                 **{k2: v for k2, v in mesh.check().items() if k2 in ("closed", "euler")}}
    surfaces.write_precomputed(done, labels, mdir / "precomputed")
    info["precomputed"] = "meshes/precomputed"
    return info


__all__ = ["AnalysisResult", "analyse", "headline", "segmentation_identity", "write_thumbnail"]
