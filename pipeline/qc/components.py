"""Connected components of a label volume computed block by block and merged across block faces.

Each block's write box is labelled on its own (``scipy.ndimage.label``, face connectivity); the
labels on a block's upper faces are kept until the neighbouring block arrives, pairs that touch
across a face become graph edges, and ``scipy.sparse.csgraph.connected_components`` merges them
at the end. Memory: one face per open neighbour plus one integer per piece, never the volume.
The result equals labelling the whole volume at once (tested against scipy on whole volumes).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse import csgraph

from pipeline.core.tiling import Block

_TOP = 5  # largest components listed


class BlockComponents:
    """Connected components of one class, labelled per block and merged across block faces."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape
        self.sizes: list[np.ndarray] = []
        self.border: list[np.ndarray] = []
        self.edges: list[np.ndarray] = []
        self.faces: dict[tuple[int, tuple[int, ...]], np.ndarray] = {}
        self.next_id = 0

    def add(self, block: Block, mask: np.ndarray) -> None:
        """Label ``mask`` (the block's write box, bool) and join its pieces to earlier blocks."""
        lab, n = ndimage.label(mask)
        sizes = np.bincount(lab.reshape(-1), minlength=n + 1)[1:].astype(np.int64)
        self.add_faces(block, n, sizes, block_faces(lab))

    def add_faces(
        self, block: Block, n: int, sizes: np.ndarray, faces: list[tuple[np.ndarray, np.ndarray]]
    ) -> int:
        """Join a block labelled elsewhere (``n`` pieces 1..n, their voxel ``sizes``, and its
        ``(low, high)`` label faces per axis, see :func:`block_faces`); blocks come in C order.

        Returns the block's base: piece ``j`` of this block is piece ``base + j - 1`` overall.
        """
        base = self.next_id
        self.next_id += n
        if n:
            self.sizes.append(np.asarray(sizes, dtype=np.int64))
            flags = np.zeros(n + 1, dtype=bool)
        for axis in range(3):
            lo, hi = faces[axis]
            prev_index = tuple(i - (a == axis) for a, i in enumerate(block.index))
            prev = self.faces.pop((axis, prev_index), None)
            if n and prev is not None:
                cur = np.where(lo > 0, lo.astype(np.int64) + (base - 1), -1)
                both = (prev >= 0) & (cur >= 0)
                if both.any():
                    self.edges.append(np.unique(np.stack([prev[both], cur[both]], axis=1), axis=0))
            if not n:
                continue
            if block.write.offset[axis] == 0:
                flags[lo.reshape(-1)] = True
            if block.write.end[axis] == self.shape[axis]:
                flags[hi.reshape(-1)] = True
            else:
                self.faces[(axis, tuple(block.index))] = np.where(hi > 0, hi.astype(np.int64) + (base - 1), -1)
        if n:
            self.border.append(flags[1:])
        return base

    def merge(self) -> tuple[int, np.ndarray]:
        """(number of components, component index of every piece) after all blocks were added."""
        if not self.edges:
            return self.next_id, np.arange(self.next_id)
        pairs = np.concatenate(self.edges)
        graph = sparse.coo_matrix(
            (np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(self.next_id, self.next_id)
        )
        n, comp = csgraph.connected_components(graph, directed=False)
        return int(n), comp

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """(volumes, touches_border) of the merged components."""
        if not self.next_id:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
        sizes = np.concatenate(self.sizes)
        border = np.concatenate(self.border)
        if not self.edges:
            return sizes, border
        n, comp = self.merge()
        volumes = np.bincount(comp, weights=sizes, minlength=n).astype(np.int64)
        touches = np.bincount(comp, weights=border, minlength=n) > 0
        return volumes, touches


def block_faces(lab: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(first, last)`` planes of a (Z, Y, X) label block along each axis (views)."""
    return [(np.take(lab, 0, axis=a), np.take(lab, -1, axis=a)) for a in range(3)]


def component_stats(label: int, volumes: np.ndarray, touches: np.ndarray, class_voxels: int) -> dict[str, Any]:
    stats: dict[str, Any] = {"label": label, "count": int(len(volumes)), "voxels": int(volumes.sum())}
    if not len(volumes):
        stats.update(largest=0, largest_fraction=None, mean=None, single_voxel=0, touching_border=0, top=[],
                     quantiles={f"p{q}": None for q in (5, 25, 50, 75, 95)}, histogram={"edges": [], "counts": []})
        return stats
    top_power = int(np.log2(volumes.max())) + 1
    edges = [2**i for i in range(top_power + 1)]
    counts, _ = np.histogram(volumes, bins=edges)
    q = np.percentile(volumes, [5, 25, 50, 75, 95])
    stats.update(
        largest=int(volumes.max()), mean=float(volumes.mean()),
        largest_fraction=float(volumes.max()) / class_voxels if class_voxels else None,
        quantiles={f"p{p}": float(v) for p, v in zip((5, 25, 50, 75, 95), q, strict=True)},
        single_voxel=int(np.count_nonzero(volumes == 1)), touching_border=int(np.count_nonzero(touches)),
        top=[int(v) for v in np.sort(volumes)[::-1][:_TOP]],
        histogram={"edges": edges, "counts": counts.astype(np.int64).tolist()},
    )
    return stats


__all__ = ["BlockComponents", "block_faces", "component_stats"]
