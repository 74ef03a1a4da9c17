"""Scribble training at a fixed number of optimiser steps: load-independent trainer comparisons.

Phantoms (``pipeline.testing.phantom``, 128^3 by default) of ``--seeds``; annotations: scribbles
(``pipeline.testing.scribbles``: 10 strokes of 5 steps per class and slice) on ``--scribbles``
z-slices, or the full truth on ``--slices`` z-slices. Each variant (a name and the keyword
arguments it passes to :func:`pipeline.train.loop.train`) trains with ``epochs`` (``--steps`` /
50, so a fixed number of steps whatever the machine's load) on ``--threads`` thread(s), then
predicts the whole volume; every variant is scored on **all unannotated voxels** (mean IoU, IoU
per class). The random forest of ``bench/accuracy.py`` (19 features, 100 trees) on the same
annotations is the baseline row. One table from one run; wall times are for reading only.

    python bench/scribbles.py --seeds 11 12 --steps 500 \\
        --variant default='{}' --variant no-teacher='{"teacher": "off"}'

Phantoms are cached in ``--work`` (default ``/tmp/studios-scribbles``), so a rerun skips them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_line, machine_facts  # noqa: E402

CLASSES = ("matrix", "fibre", "pore")


def phantom(seed: int, size: int, work: Path) -> tuple[Path, np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """(ingested scan, uint16 volume, truth) of one phantom, cached under ``work``."""
    from pipeline.ingest.run import ingest_array
    from pipeline.testing.phantom import make_phantom, to_uint16

    cache, scan = work / f"phantom-{seed}-{size}.npz", work / f"phantom-{seed}-{size}.zarr"
    if cache.exists() and scan.exists():
        d = np.load(cache)
        return scan, d["volume"], d["truth"]
    ph = make_phantom((size, size, size), seed=seed)
    volume, truth = to_uint16(ph.volume), ph.labels
    ingest_array(volume, scan, overwrite=True) if scan.exists() else ingest_array(volume, scan)
    np.savez(cache, volume=volume, truth=truth)
    return scan, volume, truth


def annotations(truth: np.ndarray[Any, Any], kind: str, n: int, seed: int) -> np.ndarray[Any, Any]:
    from pipeline.testing.phantom import make_annotations
    from pipeline.testing.scribbles import make_scribbles

    return make_scribbles(truth, n, seed=seed) if kind == "scribbles" else make_annotations(truth, n)


def score(truth: np.ndarray[Any, Any], pred: np.ndarray[Any, Any], mask: np.ndarray[Any, Any]) -> dict[str, Any]:
    from pipeline.core.metrics import confusion_matrix, scores

    s = scores(confusion_matrix(truth, pred, len(CLASSES), mask=mask), CLASSES)
    return {"mean_iou": s["mean_iou"], "iou": [c["iou"] for c in s["per_class"]]}


def run_variant(scan: Path, volume: np.ndarray[Any, Any], ann: np.ndarray[Any, Any], out: Path,
                kwargs: dict[str, Any], *, steps: int, seed: int, threads: int) -> dict[str, Any]:
    import torch

    from pipeline.io.bundle import load_bundle
    from pipeline.io.store import open_image
    from pipeline.segment.predict import predict_volume, to_labels
    from pipeline.train.annotations import from_array
    from pipeline.train.loop import train

    epochs = max(1, steps // 50)
    t0, c0 = time.perf_counter(), time.process_time()
    res = train(scan, from_array(ann, classes=len(CLASSES)), out, classes=CLASSES, epochs=epochs,
                steps_per_epoch=50, seed=seed, threads=threads, overwrite=True, **kwargs)
    train_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    bundle = load_bundle(res.bundle_path)
    offset, scale = bundle.normalization.affine(open_image(scan).stats)
    torch.set_num_threads(threads)
    probs = predict_volume(bundle.build(), volume, offset=offset, scale=scale)
    m = res.metrics
    alt = {}
    if m.get("prior_shift") is not None:  # the same weights with other output-bias shifts (argmax only)
        logits = np.log(np.maximum(probs, 1e-30)) - np.asarray(m["prior_shift"], np.float32)[:, None, None, None]
        alt["no-shift"] = to_labels(logits)
        if m.get("teacher_prior"):
            t = np.log(np.maximum(np.asarray(m["teacher_prior"]), 1e-4) / np.asarray(m["prior_train"]))
            alt["teacher-prior"] = to_labels(logits + t.astype(np.float32)[:, None, None, None])
    pred = to_labels(probs)
    return {"pred": pred, "alt": alt, "steps": res.steps, "final_steps": m.get("final_steps"),
            "stopped": m.get("stopped"),
            "train_s": train_s, "cpu_s": cpu_s, "prior_scan": m.get("prior_scan"), "teacher": m.get("teacher")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[11, 12])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--scribbles", type=int, nargs="*", default=[3], help="z-slices with scribbles")
    p.add_argument("--slices", type=int, nargs="*", default=[], help="fully annotated z-slices")
    p.add_argument("--steps", type=int, default=500, help="optimiser steps of the validated phase (epochs x 50)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                   help="a trainer variant: name and train() keyword arguments as JSON (repeatable)")
    p.add_argument("--no-forest", action="store_true", help="skip the random forest row")
    p.add_argument("--work", type=Path, default=Path("/tmp/studios-scribbles"))
    p.add_argument("--json", type=Path, default=None, help="append the rows here (JSON lines)")
    args = p.parse_args(argv)
    variants = []
    for spec in args.variant or ["default={}"]:
        name, _, js = spec.partition("=")
        variants.append((name, json.loads(js or "{}")))
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    print(machine_facts({"budget": f"{args.steps} steps, {args.threads} thread(s)"}), flush=True)
    print(f"start: {load_line()}", flush=True)
    rows: list[dict[str, Any]] = []
    cases = [("scribbles", n) for n in args.scribbles] + [("slices", n) for n in args.slices]
    for seed in args.seeds:
        scan, volume, truth = phantom(seed, args.size, args.work)
        for kind, n in cases:
            ann = annotations(truth, kind, n, seed)
            mask = ann == 0
            tag = {"seed": seed, "annotation": f"{kind} {n}", "annotated": int((ann > 0).sum())}
            if not args.no_forest:
                from accuracy import _random_forest

                t0 = time.perf_counter()
                pred, _ = _random_forest(volume, ann, seed=seed, threads=args.threads)
                rows.append({**tag, "variant": "random_forest", "steps": 0, "train_s": time.perf_counter() - t0,
                             **score(truth, pred, mask)})
                print(json.dumps(rows[-1]), flush=True)
            for name, kwargs in variants:
                r = run_variant(scan, volume, ann, args.work / f"model-{seed}-{kind}{n}-{name}", kwargs,
                                steps=args.steps, seed=seed, threads=args.threads)
                pred, alt = r.pop("pred"), r.pop("alt")
                rows.append({**tag, "variant": name, **r, **score(truth, pred, mask)})
                for label, other in alt.items():
                    rows.append({**rows[-1], "variant": f"{name} [{label}]", **score(truth, other, mask)})
                for row in rows[-1 - len(alt):]:
                    print(json.dumps(row), flush=True)
                    if args.json:
                        with args.json.open("a") as f:
                            f.write(json.dumps({**row, "kwargs": kwargs}) + "\n")
    print(f"end: {load_line()}\n")
    print("| seed | annotation | variant | steps (+ all labels) | mean IoU | IoU m / f / p | train s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        st = f"{r['steps'] - (r.get('final_steps') or 0)} + {r.get('final_steps') or 0}" if r["steps"] else "-"
        ious = " / ".join(f"{v:.3f}" for v in r["iou"])
        print(f"| {r['seed']} | {r['annotation']} ({r['annotated']} vox) | {r['variant']} | {st} | "
              f"{r['mean_iou']:.3f} | {ious} | {r['train_s']:.0f} |")
    names = list(dict.fromkeys(r["variant"] for r in rows if r["variant"] != "random_forest"))
    for name in names:
        sel = [r for r in rows if r["variant"] == name]
        rf = {(r["seed"], r["annotation"]): r["mean_iou"] for r in rows if r["variant"] == "random_forest"}
        gaps = [r["mean_iou"] - rf[(r["seed"], r["annotation"])] for r in sel if (r["seed"], r["annotation"]) in rf]
        print(f"{name}: mean IoU {np.mean([r['mean_iou'] for r in sel]):.3f}"
              + (f", minus forest {np.mean(gaps):+.3f}" if gaps else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
