"""Active learning: do ``studios suggest``'s slices reach a given IoU in fewer rounds?

A simulated annotator labels a fibre-composite phantom (:mod:`pipeline.testing.phantom`) from its
dense truth. Round 0: scribbles on the middle z-slice. In each of ``--rounds`` rounds every
strategy adds one slice (the same budget), scribbled (or labelled fully with ``--full``) from the
truth, retrains from scratch with a fixed budget (epochs x steps, same seed), and is scored by the
mean IoU over all voxels it has not annotated:

- ``suggested``: the top slice of :func:`pipeline.train.suggest.suggest` (any axis) for the
  strategy's current model and annotations;
- ``uniform``: z-slices at uniform spacing (the midpoint of the largest gap, including the ends);
- ``random``: a random axis and index (seeded), not annotated before.

Scribbles: per class, ``--strokes`` straight strokes of up to ``--stroke-length`` voxels, each
from a random voxel of that class, kept inside the class eroded by one voxel (annotators draw
inside a phase, not on its edge). The same sampler and seed serve all strategies.

Usage::

    python bench/active_learning.py                      # 96^3 phantom, 4 rounds, seeds 0 and 1
    python bench/active_learning.py --seeds 0 --epochs 3 --steps 10
    python bench/active_learning.py --quick              # smoke test (seconds)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_line, machine_facts  # noqa: E402

from pipeline.core.metrics import confusion_matrix, scores  # noqa: E402
from pipeline.ingest.run import ingest_array  # noqa: E402
from pipeline.io.bundle import load_bundle  # noqa: E402
from pipeline.segment.predict import predict_volume, to_labels  # noqa: E402
from pipeline.testing.phantom import CLASSES, make_phantom  # noqa: E402
from pipeline.train.annotations import from_array  # noqa: E402
from pipeline.train.loop import train  # noqa: E402
from pipeline.train.suggest import suggest  # noqa: E402

STRATEGIES = ("suggested", "uniform", "random")
AXES = ("z", "y", "x")


def plane_key(axis: int, index: int) -> tuple[Any, ...]:
    key: list[Any] = [slice(None)] * 3
    key[axis] = index
    return tuple(key)


def scribble(truth: np.ndarray, rng: np.random.Generator, *, strokes: int, length: int) -> np.ndarray:
    """Straight strokes inside each class of a 2D truth plane; returns a uint8 plane (0 = unlabelled)."""
    out = np.zeros_like(truth, dtype=np.uint8)
    for k in np.unique(truth):
        inside = ndimage.binary_erosion(truth == k, iterations=1)
        if not inside.any():
            inside = truth == k
        ys, xs = np.nonzero(inside)
        for _ in range(strokes):
            i = rng.integers(len(ys))
            angle = rng.uniform(0, np.pi)
            t = np.arange(-(length // 2), length - length // 2)
            py = np.rint(ys[i] + t * np.sin(angle)).astype(int)
            px = np.rint(xs[i] + t * np.cos(angle)).astype(int)
            ok = (py >= 0) & (py < truth.shape[0]) & (px >= 0) & (px < truth.shape[1])
            py, px = py[ok], px[ok]
            keep = inside[py, px]
            out[py[keep], px[keep]] = k
    return out


def annotate(labels: np.ndarray, truth: np.ndarray, axis: int, index: int, rng: np.random.Generator,
             args: argparse.Namespace) -> None:
    plane = truth[plane_key(axis, index)]
    drawn = plane if args.full else scribble(plane, rng, strokes=args.strokes, length=args.stroke_length)
    labels[plane_key(axis, index)] = drawn


def uniform_next(taken: list[tuple[int, int]], n: int) -> tuple[int, int]:
    """The z-slice farthest from the annotated z-slices, the volume ends counting half a gap.

    With the ends weighted so, m slices chosen this way approach the uniform ``n (i + 1/2) / m``.
    """
    zs = np.array([i for a, i in taken if a == 0])
    z = np.arange(n)
    d = np.minimum(2 * (z + 0.5), 2 * (n - z - 0.5))
    if zs.size:
        d = np.minimum(d, np.abs(z[:, None] - zs[None, :]).min(axis=1))
    return 0, int(np.argmax(d))


def random_next(taken: list[tuple[int, int]], shape: tuple[int, ...], rng: np.random.Generator) -> tuple[int, int]:
    while True:
        axis = int(rng.integers(3))
        index = int(rng.integers(shape[axis]))
        if (axis, index) not in taken:
            return axis, index


def score(bundle_dir: Path, volume: np.ndarray, truth: np.ndarray, labels: np.ndarray, offset: float,
          scale: float) -> float:
    model = load_bundle(bundle_dir).build()
    pred = to_labels(predict_volume(model, volume, offset=offset, scale=scale))
    m = confusion_matrix(truth, pred, len(CLASSES), mask=labels == 0)
    return float(scores(m, CLASSES)["mean_iou"])


def run_seed(seed: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from pipeline.io.store import open_image

    phantom = make_phantom(tuple(args.shape), seed=seed)
    volume, truth = phantom.volume, phantom.labels
    scan = work / f"phantom{seed}.zarr"
    ingest_array(volume, scan)
    shape = volume.shape
    image = open_image(scan, kind="scan")
    opts = {"arch": args.arch, "params": json.loads(args.params), "classes": list(CLASSES), "epochs": args.epochs,
            "steps_per_epoch": args.steps, "batch_size": args.batch, "patch": args.patch, "val_fraction": 0.0,
            "seed": seed, "threads": args.threads, "lr": args.lr, "overwrite": True}
    start = np.zeros_like(truth)
    annotate(start, truth, 0, shape[0] // 2, np.random.default_rng([seed, 0]), args)
    t = time.perf_counter()
    first = train(scan, from_array(start, classes=3), work / f"s{seed}_r0", **opts)
    bundle = load_bundle(first.bundle_path)
    offset, scale = bundle.normalization.affine(image.stats)
    iou0 = score(first.bundle_path, volume, truth, start, offset, scale)
    print(f"seed {seed} round 0: z={shape[0] // 2} scribbled, mean IoU {iou0:.4f} ({time.perf_counter() - t:.0f} s)",
          flush=True)
    result: dict[str, Any] = {}
    for name in STRATEGIES:
        labels = start.copy()
        taken = [(0, shape[0] // 2)]
        model_dir = first.bundle_path
        rng = np.random.default_rng([seed, 1])
        curve, picks = [iou0], []
        for r in range(1, args.rounds + 1):
            t = time.perf_counter()
            if name == "suggested":
                s = suggest(image, model_dir, from_array(labels, classes=3), n=1, candidates=args.candidates)[0]
                pick = (AXES.index(s.axis), s.index)
            elif name == "uniform":
                pick = uniform_next(taken, shape[0])
            else:
                pick = random_next(taken, shape, rng)
            taken.append(pick)
            annotate(labels, truth, *pick, np.random.default_rng([seed, 2, r]), args)
            out = train(scan, from_array(labels, classes=3), work / f"s{seed}_{name}_r{r}", **opts)
            model_dir = out.bundle_path
            curve.append(score(model_dir, volume, truth, labels, offset, scale))
            picks.append(f"{AXES[pick[0]]}{pick[1]}")
            print(f"seed {seed} {name:9s} round {r}: +{picks[-1]:5s} mean IoU {curve[-1]:.4f} "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
        result[name] = {"iou": curve, "picks": picks}
    return result


def table(results: list[dict[str, Any]], rounds: int) -> str:
    lines = [f"{'round':>5}  " + "  ".join(f"{s:>18}" for s in STRATEGIES)]
    for r in range(rounds + 1):
        cells = []
        for s in STRATEGIES:
            vals = [res[s]["iou"][r] for res in results]
            cells.append(f"{np.mean(vals):.4f}" + (f" +- {np.std(vals):.4f}" if len(vals) > 1 else " " * 9))
        lines.append(f"{r:>5}  " + "  ".join(f"{c:>18}" for c in cells))
    return "\n".join(lines)


def rounds_to(results: list[dict[str, Any]], target: float) -> dict[str, int | None]:
    """First round whose seed-mean IoU reaches ``target``, per strategy."""
    out: dict[str, int | None] = {}
    for s in STRATEGIES:
        curve = np.mean([res[s]["iou"] for res in results], axis=0)
        hit = [i for i, v in enumerate(curve) if v >= target]
        out[s] = hit[0] if hit else None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=(96, 96, 96))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--arch", default="filterbank_mlp")
    p.add_argument("--params", default='{"hidden": 16, "layers": 1}')
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="optimiser steps per epoch")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.01, help="learning rate (short budgets need a large one)")
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--candidates", type=int, default=8, help="candidate slices per axis for suggest")
    p.add_argument("--strokes", type=int, default=4, help="strokes per class and slice")
    p.add_argument("--stroke-length", type=int, default=24)
    p.add_argument("--full", action="store_true", help="label suggested slices fully instead of scribbling")
    p.add_argument("--json", type=Path, help="write the curves as JSON")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny phantom, 2 rounds, a few steps")
    args = p.parse_args(argv)
    if args.quick:
        args.shape, args.rounds, args.epochs, args.steps, args.patch, args.candidates = (24, 32, 32), 2, 1, 2, 16, 3
        args.seeds = args.seeds[:1]
        args.params = '{"sigmas": [0.7, 1.6], "hidden": 4, "layers": 1}'
    print(machine_facts({"phantom": "x".join(map(str, args.shape)), "training": f"{args.arch} {args.params}, "
                         f"{args.epochs} x {args.steps} steps, batch {args.batch}, patch {args.patch}",
                         "annotator": "full slices" if args.full else f"{args.strokes} strokes/class of "
                         f"{args.stroke_length} voxels"}))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="studios-al-") as tmp:
        results = [run_seed(seed, args, Path(tmp)) for seed in args.seeds]
    print(f"\nmean IoU on unannotated voxels per round ({len(args.seeds)} seed(s); round 0 = 1 scribbled z-slice)")
    print(table(results, args.rounds))
    final = np.mean([res["uniform"]["iou"][-1] for res in results])
    print(f"rounds to reach uniform's final IoU {final:.4f}: {rounds_to(results, float(final))}")
    for i, res in enumerate(results):
        print(f"picks seed {args.seeds[i]}: " + "; ".join(f"{s} {' '.join(res[s]['picks'])}" for s in STRATEGIES))
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "seeds": args.seeds, "results": results}, indent=2) + "\n")
    print(f"total {time.perf_counter() - t0:.0f} s; {load_line()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
