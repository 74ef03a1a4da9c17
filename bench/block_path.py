"""One block's path, stage by stage: the lean path against the previous one, interleaved.

    PYTHONPATH=. python bench/block_path.py [--block 128] [--arch NAME ...] [--reps 3] [--probabilities]

A block of the cement CT (tiled; the read box is block + 2 halo) goes through the worker's
stages in this process, with the model's seeded random weights (speed does not depend on them):

- ``read``: ``read_padded`` from an ingested zarr scan;
- ``forward``: normalise + model (``forward_logits``);
- ``post``: previous path: softmax to numpy (``forward``'s float32 probabilities),
  ``to_labels``, ``block_stats`` (confidence histogram, entropy, class sums) and ``quantize``
  when probabilities are written; lean path: ``post_block`` (softmax, one max over classes
  for labels and confidence, histogram and entropy reduced in torch, uint8 probabilities)
  + ``class_sums``;
- ``write``: labels (and probabilities) to zarr.

Both paths run on the same logits, alternating ``--reps`` times; each figure is the best rep.
The table gives per-stage milliseconds, the block's Mvox/s (write-box voxels over the sum of
the stages) and the lean/previous ratio. Labels and uint8 probabilities of the two paths are
checked equal.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--arch", nargs="+", default=["dilated_resnet", "filterbank_mlp"])
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--probabilities", action="store_true", help="also quantise and write probabilities")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import zarr

    from pipeline.core.geometry import Box
    from pipeline.core.tiling import Block
    from pipeline.ingest.run import ingest_array
    from pipeline.io.store import open_image, read_padded, write_box
    from pipeline.segment.post import post_block
    from pipeline.segment.predict import forward_logits, numerics, quantize, softmax_channels, to_labels
    from pipeline.segment.worker import block_stats, class_sums

    print(_common.machine_facts({"torch threads": args.threads, "probabilities": args.probabilities}))
    rows: list[list[Any]] = []
    b = args.block
    with tempfile.TemporaryDirectory(prefix="studios-block-") as tmp:
        root = Path(tmp)
        for arch in args.arch:
            bundle = _common.bundle(arch, None, classes=args.classes)
            model = bundle.build().eval()
            h = bundle.halo
            size = b + 2 * h + 8
            ingest_array(_common.cement_volume(size), root / f"{arch}.zarr")
            scan = open_image(root / f"{arch}.zarr").array
            write = Box((4 + h,) * 3, (b,) * 3)
            block = Block(index=(0, 0, 0), write=write, read=write.grow(h))
            out = zarr.open_group(str(root / f"{arch}-out.zarr"), mode="w")
            labels_arr = out.create_array("0", shape=(size,) * 3, chunks=(b,) * 3, dtype="uint8")
            probs_arr = out.create_array("p", shape=(args.classes, *(size,) * 3), chunks=(1, *(b,) * 3),
                                         dtype="uint8")
            times: dict[str, dict[str, list[float]]] = {"previous": {}, "lean": {}}

            def note(path: str, stage: str, t: float, times: dict[str, dict[str, list[float]]] = times) -> None:
                times[path].setdefault(stage, []).append(t)

            results: dict[str, Any] = {}
            for _rep in range(args.reps + 1):  # the first rep warms up (model copy, allocator)
                t = time.perf_counter()
                raw = read_padded(scan, block, (size,) * 3)
                t_read = time.perf_counter() - t
                inner = raw[h:-h, h:-h, h:-h]
                with numerics(exact=False):
                    t = time.perf_counter()
                    logits = forward_logits(model, raw, offset=0.0,
                                            scale=1.0 / 255)
                    t_fwd = time.perf_counter() - t
                    for path in ("previous", "lean"):
                        t = time.perf_counter()
                        if path == "previous":
                            probs = softmax_channels(logits).cpu().numpy()[0]
                            labels = to_labels(probs)
                            block_stats(inner, probs, labels, args.classes)
                            q = quantize(probs) if args.probabilities else None
                        else:
                            post = post_block(logits, probabilities=args.probabilities)
                            labels, q = post.labels, post.probabilities
                            class_sums(inner, labels, args.classes)
                        t_post = time.perf_counter() - t
                        t = time.perf_counter()
                        write_box(labels_arr, write, labels)
                        if q is not None:
                            write_box(probs_arr, write, q)
                        t_write = time.perf_counter() - t
                        results[path] = (labels, q)
                        if _rep:
                            for stage, v in (("read", t_read), ("forward", t_fwd), ("post", t_post),
                                             ("write", t_write)):
                                note(path, stage, v)
            same = np.array_equal(results["previous"][0], results["lean"][0]) and (
                not args.probabilities or np.array_equal(results["previous"][1], results["lean"][1]))
            best = {p: {s: min(v) for s, v in st.items()} for p, st in times.items()}
            total = {p: sum(best[p].values()) for p in best}
            for p in ("previous", "lean"):
                st = best[p]
                rows.append([arch, p, *(f"{1e3 * st[s]:.0f}" for s in ("read", "forward", "post", "write")),
                             f"{1e3 * total[p]:.0f}", f"{b**3 / total[p] / 1e6:.2f}",
                             f"{b**3 / st['post'] / 1e6:.1f}",
                             f"{total['previous'] / total[p]:.2f}", "yes" if same else "NO"])
            print(f"{arch} done; {_common.load_line()}", flush=True)
    print()
    print(_common.table(["model", "path", "read ms", "forward ms", "post ms", "write ms", "block ms", "Mvox/s",
                         "post Mvox/s", "speed vs previous", "same output"], rows))
    print(f"\nblock {b}^3 (read box {b}+2h), best of {args.reps} interleaved reps; {_common.load_line()}")


if __name__ == "__main__":
    main()
