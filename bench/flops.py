"""Achieved GFLOP/s of the model forward against a large float32 matrix product, same cores.

    .venv/bin/python bench/flops.py [--block 128] [--reps 3] [--arch NAME] [--params JSON]
                                    [--no-compile] [--threads N ...]

GFLOP/s of the forward = ``model.flops_per_voxel()`` x output voxels / seconds (2 x
multiply-adds of the convolutions; ReLU, adds and softmax are not counted). The reference is a
4096 x 4096 float32 matmul (``torch.mm``, MKL) on the same torch threads. Variants of the
forward, each timed as the best of ``--reps`` runs on one block of ``--block``^3 output voxels
(input ``block + 2 halo``), interleaved round-robin so that load drift hits every variant alike:

- ``plain``: ``model(x)`` on NCDHW tensors, oneDNN on (what studios ran before channels-last);
- ``exact``: oneDNN off (``--exact`` mode: bit-identical to the whole-volume pass);
- ``channels_last``: model and input in ``torch.channels_last_3d`` (NDHWC), oneDNN on;
- ``pipeline.forward``: :func:`pipeline.segment.predict.forward` itself, what blocks run by default
  (normalise, channels-last model on CPU with oneDNN, softmax);
- ``batch8``: eight blocks of half the edge (same output voxels, more halo) in one batched call;
- ``compile``: ``torch.compile`` (inductor, CPU; needs a C compiler), plain layout;
- ``compile+cl``: ``torch.compile`` on the channels-last model;
- each variant at 1 torch thread and at all cores (``--threads``).

``--malloc retain`` (the default, as studios' workers run) first tells glibc to keep freed
memory in the process (``mallopt``: no ``mmap`` per large buffer, no trimming; everything here
runs on the main thread, which uses the main arena). With ``--malloc glibc`` every tensor over
32 MiB is a fresh ``mmap`` whose pages fault in zeroed, and is unmapped when freed: run both
ways to see what that costs.

Also printed: the largest difference of each variant's logits from ``plain`` (a variant that is
not within float tolerance is not a candidate).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import torch  # noqa: E402


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def sweep(args: argparse.Namespace) -> None:
    """Output voxels/s of pipeline.forward per block edge: halo overhead against cache fit."""
    import numpy as np

    from pipeline.compute.hosts import cpu_count
    from pipeline.segment.predict import forward, numerics

    b = _common.bundle(args.arch, args.params)
    model = b.build().eval()
    h, fpv = b.halo, model.flops_per_voxel()
    torch.set_num_threads(cpu_count())
    print(_common.machine_facts({"": f"malloc {args.malloc}"}))
    print(_common.describe(b))
    rng = np.random.default_rng(0)
    raws = {n: rng.integers(0, 255, (n + 2 * h,) * 3).astype(np.uint8) for n in args.sweep}
    best: dict[int, float] = {}
    with numerics(exact=False):
        for n in args.sweep:
            forward(model, raws[n][:40, :40, :40], offset=0.0, scale=0.01)
        for _ in range(args.reps):  # interleaved
            for n in args.sweep:
                dt = _timed(lambda n=n: forward(model, raws[n], offset=0.0, scale=0.01))
                best[n] = min(best.get(n, float("inf")), dt)
    rows = []
    top = max(args.sweep, key=lambda n: n**3 / best[n])
    for n in args.sweep:
        inp = (n + 2 * h) ** 3
        act = 4 * inp * getattr(model, "channels", 16)
        rows.append([n, f"{n + 2 * h}", f"{inp / n**3:.2f}", f"{act / 2**20:.0f}", f"{best[n]:.2f}",
                     f"{n**3 / best[n] / 1e6:.3f}", f"{fpv * n**3 / best[n] / 1e9:.1f}",
                     f"{(n**3 / best[n]) / (top**3 / best[top]):.2f}"])
    print()
    print(_common.table(["block", "input edge", "halo overhead", "one activation MiB", "best s", "output Mvox/s",
                         "GFLOP/s (output)", "vs best"], rows))
    print(_common.load_line())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block", type=int, default=128, help="output edge of the timed block")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--arch", default=None)
    ap.add_argument("--params", default=None, help="JSON overriding the registry defaults")
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="torch thread counts (default: 1 and all cores)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    ap.add_argument("--only", nargs="+", default=None, help="run only these variants")
    ap.add_argument("--malloc", choices=("retain", "glibc"), default="retain",
                    help="retain (studios' default worker_heap): driver and workers keep freed memory; "
                         "glibc: its defaults")
    ap.add_argument("--sweep", type=int, nargs="+", default=None,
                    help="instead: time pipeline.forward at these block edges (all cores), output Mvox/s")
    args = ap.parse_args()
    if args.malloc == "retain":
        _common.retain_heap()
    if args.sweep:
        sweep(args)
        return

    from pipeline.compute.hosts import cpu_count
    from pipeline.segment.predict import forward, numerics

    cores = cpu_count()
    threads = args.threads or sorted({1, cores})
    b = _common.bundle(args.arch, args.params)
    model = b.build().eval()
    h, n = b.halo, args.block
    fpv = model.flops_per_voxel()
    print(_common.machine_facts())
    print(_common.describe(b))
    print(f"block {n}^3 output, input {n + 2 * h}^3; best of {args.reps}, variants interleaved; malloc {args.malloc}\n")

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, n + 2 * h, n + 2 * h, n + 2 * h, generator=gen)
    raw = (x[0, 0] * 255).to(torch.uint8).numpy()
    half = n // 2
    xb = torch.rand(8, 1, half + 2 * h, half + 2 * h, half + 2 * h, generator=gen)  # same output voxels
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last_3d)
    x_cl = x.contiguous(memory_format=torch.channels_last_3d)

    variants: dict[str, Callable[[], Any]] = {}

    def run_plain() -> Any:
        return model(x)

    def run_exact() -> Any:
        with numerics(exact=True):
            return model(x)

    def run_cl() -> Any:
        return model_cl(x_cl)

    def run_pipeline() -> Any:
        return forward(model, raw, offset=0.0, scale=1.0 / 255)

    def run_batch() -> Any:
        return model(xb)

    variants = {"plain": run_plain, "exact": run_exact, "channels_last": run_cl,
                "pipeline.forward": run_pipeline, "batch8": run_batch}
    compile_note = ""
    if not args.no_compile:
        try:
            compiled = torch.compile(model, dynamic=False)
            compiled_cl = torch.compile(model_cl, dynamic=False)
            with torch.inference_mode():
                t = time.perf_counter()
                compiled(x)
                compiled_cl(x_cl)
                took = time.perf_counter() - t
                compile_note = f"torch.compile (inductor): first calls (compilation) took {took:.1f}s"
            variants["compile"] = lambda: compiled(x)
            variants["compile+cl"] = lambda: compiled_cl(x_cl)
        except Exception as exc:  # no compiler, unsupported op...
            compile_note = f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    if args.only:
        variants = {k: v for k, v in variants.items() if k in args.only}

    failed: dict[str, str] = {}

    def attempt(name: str) -> Any:
        """Run a variant once; a variant that raises is reported and dropped."""
        try:
            return variants[name]()
        except Exception as exc:
            failed[name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}"
            del variants[name]
            return None

    # numerical check against plain (oneDNN, NCDHW)
    with torch.inference_mode():
        ref = model(x)
        diffs = {}
        for name in list(variants):
            out = attempt(name)
            if out is not None and name not in ("pipeline.forward", "batch8"):
                diffs[name] = float((out.float() - ref).abs().max())

    mm = {}
    best: dict[tuple[str, int], float] = {}
    for nt in threads:
        torch.set_num_threads(nt)
        mm[nt] = _common.matmul_gflops()
        with torch.inference_mode():
            for name in list(variants):  # warm-up at this thread count
                attempt(name)
            for _ in range(args.reps):
                for name in list(variants):
                    t = time.perf_counter()
                    if attempt(name) is not None:
                        best[(name, nt)] = min(best.get((name, nt), float("inf")), time.perf_counter() - t)
        print(f"  threads {nt} done; {_common.load_line()}", flush=True)

    vox = n**3
    header = ["variant", *[f"{nt} thr s" for nt in threads], *[f"{nt} thr GFLOP/s" for nt in threads],
              *[f"% of mm ({nt})" for nt in threads], "vs plain", "max |diff|"]
    rows = [["matmul 4096^2 (MKL)", *["" for _ in threads], *[f"{mm[nt]:.1f}" for nt in threads],
             *["100" for _ in threads], "", ""]]
    top = threads[-1]
    for name in variants:
        if any((name, nt) not in best for nt in threads):
            continue
        g = {nt: fpv * vox / best[(name, nt)] / 1e9 for nt in threads}
        rows.append([name, *[f"{best[(name, nt)]:.2f}" for nt in threads], *[f"{g[nt]:.1f}" for nt in threads],
                     *[f"{100 * g[nt] / mm[nt]:.0f}" for nt in threads],
                     f"{best[('plain', top)] / best[(name, top)]:.2f}x" if "plain" in variants else "",
                     f"{diffs[name]:.1e}" if name in diffs else "-"])
    print()
    print(_common.table(header, rows))
    if compile_note:
        print(compile_note)
    for name, why in failed.items():
        print(f"variant {name} failed and was dropped: {why}")
    print(f"thread scaling of plain: {best[('plain', threads[0])] / best[('plain', top)]:.2f}x "
          f"from {threads[0]} to {top} threads" if "plain" in variants and len(threads) > 1 else "")
    print(_common.load_line())


if __name__ == "__main__":
    main()
