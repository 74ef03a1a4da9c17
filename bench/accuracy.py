"""Accuracy from a few annotated slices: every studios model against classic baselines and a U-Net.

Phantoms (``pipeline.testing.phantom``: glass-fibre composite, radon/iradon with Poisson noise, blur and
rings; stored as uint16 like a beamline does), seeds ``--seeds``, annotations: the full truth on
``--slices`` evenly spread z-slices, and scribbles (``pipeline.testing.scribbles``: 10 short strokes
per class on each of ``--scribbles`` z-slices, ~150 labelled voxels a slice). Every method
learns from the same annotations and is scored on **all
unannotated voxels** against the dense truth: per-class IoU, mean IoU, macro F1, Cohen's kappa.

Methods:
  * ``dilated_resnet`` (the default), ``rotinv_dilated``, ``filterbank_mlp``: ``pipeline.train.loop``
    with a ``--minutes`` budget, then whole-volume inference (equal to blockwise, see
    docs/exactness.md);
  * ``multi_otsu``: scikit-image multi-Otsu thresholds (256-bin histogram); each intensity bin
    is named by the annotated class most over-represented in it (it uses the annotations too);
  * ``random_forest``: scikit-learn, 100 trees on the same 19 filter features the
    ``filterbank_mlp`` model computes (ilastik's recipe), fitted on every annotated voxel;
  * ``unet3d``: MONAI residual 3D U-Net, same annotations, masked loss, augmentations and budget
    (``bench/_unet.py``; needs the ``bench`` extra).

Then the real InSegt glass-fibre slices (``../shared/data/insegt``): the scribbles of each class
are split into two folds (alternate scribbles; a class drawn as one stroke is cut in two along
its length); each method trains on one fold and is scored on the other, both ways round. And
across images: trained on ALL scribbles of one image (glass or slice 1), scored on the scribbles
of the other (each normalised with its own statistics, as ``studios segment`` does).
``--quick``: a smoke test of all of it in about a minute.

Each seed runs in its own process with ``--threads`` torch/sklearn threads (default: cores /
jobs), so the budgets are per process. Prints a markdown table; ``--json`` keeps every row.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, load_line, machine_facts  # noqa: E402

STUDIOS = ("dilated_resnet", "rotinv_dilated", "filterbank_mlp")
METHODS = (*STUDIOS, "multi_otsu", "random_forest", "unet3d")
PHANTOM_CLASSES = ("matrix", "fibre", "pore")
INSEGT_CLASSES = ("matrix", "fibre")
INSEGT = ROOT.parent / "shared" / "data" / "insegt"


# ----------------------------------------------------------------------------- methods


def _score(truth: np.ndarray[Any, Any], pred: np.ndarray[Any, Any], mask: np.ndarray[Any, Any],
           names: tuple[str, ...]) -> dict[str, Any]:
    from pipeline.core.metrics import confusion_matrix, scores

    s = scores(confusion_matrix(truth, pred, len(names), mask=mask), names)
    return {"iou": {c["name"]: c["iou"] for c in s["per_class"]}, "mean_iou": s["mean_iou"],
            "mean_f1": s["mean_f1"], "kappa": s["kappa"], "accuracy": s["accuracy"], "scored_voxels": s["voxels"]}


def _zscore(v: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return ((v - v.mean()) / (v.std() or 1.0)).astype(np.float32)


def _multi_otsu(volume: np.ndarray[Any, Any], ann: np.ndarray[Any, Any], k: int,
                target: np.ndarray[Any, Any] | None = None) -> tuple[np.ndarray[Any, Any], dict[str, Any]]:
    """Thresholds (and bin names) from ``volume``/``ann``; applied to ``target`` (z-scored) if given."""
    from skimage.filters import threshold_multiotsu

    t0 = time.perf_counter()
    src = volume if target is None else _zscore(volume)
    counts, edges = np.histogram(src, bins=256)  # 256 bins: uint16 would otherwise use 65,536
    thresholds = threshold_multiotsu(hist=(counts, (edges[:-1] + edges[1:]) / 2), classes=k)
    bins = np.digitize(src, thresholds)
    # name each bin by the annotated class most over-represented in it (votes / class size)
    sizes = np.maximum(np.bincount(ann[ann > 0], minlength=k + 1)[1:], 1)
    lut = np.zeros(k, dtype=np.uint8)
    for b in range(k):
        lut[b] = int(np.argmax(np.bincount(ann[(bins == b) & (ann > 0)], minlength=k + 1)[1:] / sizes)) + 1
    pred = lut[bins if target is None else np.digitize(_zscore(target), thresholds)]
    seconds = time.perf_counter() - t0
    return pred, {"params": k - 1, "train_s": 0.0, "infer_vox_s": pred.size / seconds}


def _features(volume: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """(N, 19) float32 filter features of the z-scored volume (the filterbank_mlp bank, edge padding)."""
    import torch

    from pipeline.models.filterbank import FilterBankMLP

    bank = FilterBankMLP(classes=2)
    x = (volume - volume.mean()) / (volume.std() or 1.0)
    padded = np.pad(x.astype(np.float32), bank.halo, mode="edge")
    with torch.inference_mode():
        f = bank.features(torch.from_numpy(padded)[None, None])[0].numpy()
    return np.ascontiguousarray(f.reshape(f.shape[0], -1).T)


def _random_forest(volume: np.ndarray[Any, Any], ann: np.ndarray[Any, Any], *, seed: int, threads: int,
                   target: np.ndarray[Any, Any] | None = None) -> tuple[np.ndarray[Any, Any], dict[str, Any]]:
    from sklearn.ensemble import RandomForestClassifier

    t0 = time.perf_counter()
    feats = _features(volume)
    t_feat = time.perf_counter() - t0
    labelled = ann.ravel() > 0
    rf = RandomForestClassifier(n_estimators=100, n_jobs=threads, random_state=seed)
    rf.fit(feats[labelled], ann.ravel()[labelled])
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    if target is not None:
        volume = target
        feats = _features(target)
    pred = rf.predict(feats).reshape(volume.shape).astype(np.uint8)
    t_pred = time.perf_counter() - t1
    nodes = sum(int(e.tree_.node_count) for e in rf.estimators_)
    return pred, {"params": nodes, "params_note": "tree nodes", "train_s": train_s,
                  "infer_vox_s": volume.size / (t_feat + t_pred)}


def _studios(arch: str, scan: Path, volume: np.ndarray[Any, Any], ann: np.ndarray[Any, Any], names: tuple[str, ...],
             work: Path, *, minutes: float, seed: int, threads: int, target_scan: Path | None = None,
             target: np.ndarray[Any, Any] | None = None) -> tuple[np.ndarray[Any, Any], dict[str, Any]]:
    import torch

    from pipeline.io.bundle import load_bundle
    from pipeline.io.store import open_image
    from pipeline.segment.predict import predict_volume, to_labels
    from pipeline.train.annotations import from_array
    from pipeline.train.loop import train

    res = train(scan, from_array(ann, classes=len(names)), work / arch, arch=arch, classes=names,
                minutes=minutes, seed=seed, threads=threads, overwrite=True)
    bundle = load_bundle(res.bundle_path)
    model = bundle.build()
    if target is not None and target_scan is not None:  # another image: its own statistics, as segment does
        scan, volume = target_scan, target
    offset, scale = bundle.normalization.affine(open_image(scan).stats)
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    pred = to_labels(predict_volume(model, volume, offset=offset, scale=scale))
    seconds = time.perf_counter() - t0
    return pred, {"params": sum(p.numel() for p in model.parameters()), "train_s": res.seconds,
                  "infer_vox_s": volume.size / seconds, "epochs": res.epochs, "steps": res.steps,
                  "stopped": res.metrics.get("stopped"), "halo": model.halo,
                  "final_steps": res.metrics.get("final_steps"), "val_voxels": res.metrics.get("val_voxels", 0)}


def _unet(volume: np.ndarray[Any, Any], ann: np.ndarray[Any, Any], k: int, *, minutes: float, seed: int,
          target: np.ndarray[Any, Any] | None = None) -> tuple[np.ndarray[Any, Any], dict[str, Any]]:
    import dataclasses

    from _unet import predict_unet, train_unet

    res = train_unet(volume, ann, classes=k, minutes=minutes, seed=seed)
    if target is not None:  # another image: normalised with its own statistics
        res = dataclasses.replace(res, mean=float(target.mean()), std=float(target.std()) or 1.0)
        volume = target
    t0 = time.perf_counter()
    pred = predict_unet(res, volume)
    seconds = time.perf_counter() - t0
    return pred, {"params": res.params, "train_s": res.seconds, "infer_vox_s": volume.size / seconds,
                  "steps": res.steps}


def run_methods(methods: tuple[str, ...], volume: np.ndarray[Any, Any], ann: np.ndarray[Any, Any],
                truth: np.ndarray[Any, Any], mask: np.ndarray[Any, Any], names: tuple[str, ...], work: Path,
                *, minutes: float, seed: int, threads: int, tag: dict[str, Any],
                target: np.ndarray[Any, Any] | None = None) -> list[dict[str, Any]]:
    """Train each method on one (volume, annotations) case; apply it to ``volume`` (or to
    ``target``, another image, when given: ``truth``/``mask`` are then of ``target``); score where ``mask``."""
    from pipeline.ingest.run import ingest_array

    scan, target_scan = work / "scan.zarr", work / "target.zarr"
    if any(m in STUDIOS for m in methods):
        if not scan.exists():
            ingest_array(volume, scan)
        if target is not None and not target_scan.exists():
            ingest_array(target, target_scan)
    rows = []
    for method in methods:
        t0 = time.perf_counter()
        if method in STUDIOS:
            pred, info = _studios(method, scan, volume, ann, names, work, minutes=minutes, seed=seed, threads=threads,
                                  target_scan=target_scan if target is not None else None, target=target)
        elif method == "multi_otsu":
            pred, info = _multi_otsu(volume, ann, len(names), target=target)
        elif method == "random_forest":
            pred, info = _random_forest(volume, ann, seed=seed, threads=threads, target=target)
        elif method == "unet3d":
            pred, info = _unet(volume, ann, len(names), minutes=minutes, seed=seed, target=target)
        else:  # pragma: no cover - argparse restricts choices
            raise ValueError(method)
        row = {**tag, "method": method, **info, **_score(truth, pred, mask, names),
               "wall_s": time.perf_counter() - t0}
        print(f"  {json.dumps(_brief(row))}", flush=True)
        rows.append(row)
    return rows


def _brief(row: dict[str, Any]) -> dict[str, Any]:
    keep = ("case", "seed", "annotation", "slices", "annotated", "fold", "method", "mean_iou", "kappa", "train_s",
            "steps")
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k in keep}


# ----------------------------------------------------------------------------- cases


def phantom_case(seed: int, size: int, slices: list[int], methods: tuple[str, ...], minutes: float, threads: int,
                 work: Path, scribbles: list[int] | None = None) -> list[dict[str, Any]]:
    """All methods on one phantom at each annotation count; scored on unannotated voxels.

    ``slices``: full annotated z-slices; ``scribbles``: slice counts annotated with strokes
    (``pipeline.testing.scribbles.make_scribbles``: 10 strokes of 5 px per class and slice).
    """
    import torch

    from pipeline.testing.phantom import make_annotations, make_phantom, to_uint16
    from pipeline.testing.scribbles import make_scribbles

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    ph = make_phantom((size, size, size), seed=seed)
    volume, truth = to_uint16(ph.volume), ph.labels
    print(f"phantom seed {seed} {size}^3 in {time.perf_counter() - t0:.0f} s; class fractions "
          f"{np.round(np.bincount(truth.ravel(), minlength=4)[1:] / truth.size, 3).tolist()}", flush=True)
    rows: list[dict[str, Any]] = []
    cases = [("slices", n) for n in slices] + [("scribbles", n) for n in scribbles or []]
    for kind, n in cases:
        ann = make_annotations(truth, n) if kind == "slices" else make_scribbles(truth, n, seed=seed)
        case = work / f"phantom-s{seed}-{kind}{n}"
        case.mkdir(parents=True, exist_ok=True)
        tag = {"case": "phantom", "annotation": kind, "seed": seed, "slices": n, "size": size,
               "annotated": int((ann > 0).sum())}
        rows += run_methods(methods, volume, ann, truth, ann == 0, PHANTOM_CLASSES, case, minutes=minutes,
                            seed=seed, threads=threads, tag=tag)
    return rows


def scribble_folds(labels: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Fold 1 or 2 for every scribble pixel of a 2D label image (0 elsewhere).

    Per class, 8-connected scribbles alternate between the folds in order of their centroid; a
    class drawn as one scribble is cut at the median of its pixels' projection on its long axis.
    """
    from scipy import ndimage

    folds = np.zeros(labels.shape, dtype=np.uint8)
    for c in np.unique(labels[labels > 0]):
        comp, n = ndimage.label(labels == c, structure=np.ones((3, 3)))
        if n >= 2:
            centres = ndimage.center_of_mass(labels == c, comp, range(1, n + 1))
            order = sorted(range(n), key=lambda i: (centres[i][1], centres[i][0]))
            for rank, i in enumerate(order):
                folds[comp == i + 1] = 1 + rank % 2
        else:
            pts = np.argwhere(comp == 1).astype(np.float64)
            centred = pts - pts.mean(axis=0)
            axis = np.linalg.svd(centred, full_matrices=False)[2][0]
            proj = centred @ axis
            folds[tuple(pts[proj <= np.median(proj)].astype(int).T)] = 1
            folds[tuple(pts[proj > np.median(proj)].astype(int).T)] = 2
    return folds


def _insegt_image(name: str) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """(volume (Z, Y, X), scribbles (Y, X) of slice 0) of an InSegt image."""
    from PIL import Image

    if name == "glass":
        return np.asarray(Image.open(INSEGT / "glass.png"))[None], np.asarray(Image.open(INSEGT / "glass_labels.png"))
    # five nearby slices, scribbles on the first
    volume = np.stack([np.asarray(Image.open(INSEGT / f"slice{i}.png")) for i in range(1, 6)])
    return volume, np.asarray(Image.open(INSEGT / "slice1_labeling.png"))


def insegt_case(name: str, methods: tuple[str, ...], minutes: float, threads: int, work: Path) -> list[dict[str, Any]]:
    """The real InSegt fibre slices: train on one fold of the scribbles, score on the other."""
    import torch

    torch.set_num_threads(threads)
    volume, scribbles = _insegt_image(name)
    folds = scribble_folds(scribbles)
    rows: list[dict[str, Any]] = []
    for fold in (1, 2):
        ann = np.zeros(volume.shape, dtype=np.uint8)
        ann[0] = np.where(folds == fold, scribbles, 0)
        truth = np.zeros(volume.shape, dtype=np.uint8)
        truth[0] = np.where(folds == 3 - fold, scribbles, 0)
        case = work / f"insegt-{name}-fold{fold}"
        case.mkdir(parents=True, exist_ok=True)
        tag = {"case": f"insegt-{name}", "seed": 0, "fold": fold, "shape": list(volume.shape),
               "annotated": int((ann > 0).sum())}
        rows += run_methods(methods, volume, ann, truth, truth > 0, INSEGT_CLASSES, case, minutes=minutes,
                            seed=0, threads=threads, tag=tag)
    return rows


def insegt_cross_case(source: str, methods: tuple[str, ...], minutes: float, threads: int,
                      work: Path) -> list[dict[str, Any]]:
    """Train on ALL scribbles of one InSegt image, score on the scribbles of the other image."""
    import torch

    torch.set_num_threads(threads)
    other = "slices" if source == "glass" else "glass"
    volume, scribbles = _insegt_image(source)
    target, target_scribbles = _insegt_image(other)
    ann = np.zeros(volume.shape, dtype=np.uint8)
    ann[0] = scribbles
    truth = np.zeros(target.shape, dtype=np.uint8)
    truth[0] = target_scribbles
    case = work / f"insegt-{source}-to-{other}"
    case.mkdir(parents=True, exist_ok=True)
    tag = {"case": f"insegt-{source}->{other}", "seed": 0, "fold": 0, "shape": list(volume.shape),
           "annotated": int((ann > 0).sum())}
    return run_methods(methods, volume, ann, truth, truth > 0, INSEGT_CLASSES, case, minutes=minutes, seed=0,
                       threads=threads, tag=tag, target=target)


# ----------------------------------------------------------------------------- report


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(vals)) if vals else float("nan")


def table(rows: list[dict[str, Any]], methods: tuple[str, ...]) -> str:
    """Markdown tables: phantom rows per (slices, method), means over seeds; then InSegt per case."""
    out = []
    phantom = [r for r in rows if r["case"] == "phantom"]
    if phantom:
        seeds = sorted({r["seed"] for r in phantom})
        out.append("| annotation | method | mIoU " + " ".join(f"s{s}" for s in seeds) + " | mean IoU | IoU matrix / "
                   "fibre / pore | macro F1 | kappa | train s | params | infer Mvox/s |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        kinds = sorted({(r.get("annotation", "slices"), r["slices"]) for r in phantom})
        for kind, n in kinds:
            for m in methods:
                sel = [r for r in phantom if (r.get("annotation", "slices"), r["slices"]) == (kind, n)
                       and r["method"] == m]
                if not sel:
                    continue
                per_seed = " / ".join(f"{r['mean_iou']:.3f}" for r in sorted(sel, key=lambda r: r["seed"]))
                ious = " / ".join(f"{np.mean([r['iou'][c] or 0 for r in sel]):.3f}" for c in PHANTOM_CLASSES)
                label = f"{n} slice{'s' * (n != 1)}" if kind == "slices" else \
                    f"scribbles on {n} ({int(_mean(sel, 'annotated'))} vox)"
                out.append(f"| {label} | {m} | {per_seed} | {_mean(sel, 'mean_iou'):.3f} | {ious} | "
                           f"{_mean(sel, 'mean_f1'):.3f} | {_mean(sel, 'kappa'):.3f} | {_mean(sel, 'train_s'):.0f} | "
                           f"{int(_mean(sel, 'params'))} | {_mean(sel, 'infer_vox_s') / 1e6:.2f} |")
    insegt = [r for r in rows if r["case"].startswith("insegt")]
    if insegt:
        out.append("")
        out.append("| InSegt case | method | mIoU fold 1 / 2 (or train -> other image) | mean IoU | "
                   "IoU matrix / fibre | kappa | train s |")
        out.append("|---|---|---|---|---|---|---|")
        for case in sorted({r["case"] for r in insegt}):
            for m in methods:
                sel = sorted([r for r in insegt if r["case"] == case and r["method"] == m], key=lambda r: r["fold"])
                if not sel:
                    continue
                folds = " / ".join(f"{r['mean_iou']:.3f}" for r in sel)
                ious = " / ".join(f"{np.mean([r['iou'][c] or 0 for r in sel]):.3f}" for c in INSEGT_CLASSES)
                out.append(f"| {case} | {m} | {folds} | {_mean(sel, 'mean_iou'):.3f} | {ious} | "
                           f"{_mean(sel, 'kappa'):.3f} | {_mean(sel, 'train_s'):.0f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=128, help="phantom edge in voxels (default 128)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--slices", type=int, nargs="*", default=[1, 3, 10], help="fully annotated z-slices per phantom")
    p.add_argument("--scribbles", type=int, nargs="*", default=[1, 3],
                   help="z-slices with scribbles (10 strokes of 5 px per class and slice) per phantom")
    p.add_argument("--minutes", type=float, default=3.0, help="training budget of every learnt model (phantoms)")
    p.add_argument("--insegt-minutes", type=float, default=0.5, help="training budget on the InSegt slices")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--insegt", nargs="*", choices=("glass", "slices"), default=["glass", "slices"],
                   help="InSegt images: two folds of its scribbles, and all its scribbles -> the other image")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: one 32^3 phantom, scribbles on 1 slice, dilated_resnet / multi_otsu / "
                   "random_forest, a few seconds of training, the glass -> slices case")
    p.add_argument("--jobs", type=int, default=2, help="cases run side by side (default 2)")
    p.add_argument("--threads", type=int, default=None, help="threads per case (default: cores / jobs)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--json", type=Path, default=None, help="write every row here")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.seeds, args.slices, args.scribbles = 32, [1], [], [1]
        args.minutes = args.insegt_minutes = 0.1
        args.methods, args.insegt, args.jobs = ["dilated_resnet", "multi_otsu", "random_forest"], ["glass"], 1
    methods = tuple(args.methods)
    if "unet3d" in methods:
        try:
            import monai  # noqa: F401
        except ImportError:
            p.error("unet3d needs MONAI: pip install -e '.[bench]' (or leave unet3d out of --methods)")
    if args.insegt and not INSEGT.is_dir():
        p.error(f"{INSEGT}: not found; pass --insegt with no names to skip the real slices")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    print(machine_facts({"budget": f"{args.minutes} min per learnt model (phantoms), {args.insegt_minutes} min "
                                   f"(InSegt); {args.jobs} cases side by side, {threads} thread(s) each"}), flush=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="studios-accuracy-"))
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        futures = [pool.submit(phantom_case, s, args.size, args.slices, methods, args.minutes, threads, work,
                               args.scribbles) for s in args.seeds]
        if not args.quick:
            futures += [pool.submit(insegt_case, name, methods, args.insegt_minutes, threads, work)
                        for name in args.insegt]
        futures += [pool.submit(insegt_cross_case, name, methods, args.insegt_minutes, threads, work)
                    for name in args.insegt]
        rows = [r for f in futures for r in f.result()]
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; {load_line()}\n")
    print(table(rows, methods))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
