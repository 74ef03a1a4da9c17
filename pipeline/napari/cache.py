"""A write-back chunk cache over a zarr label array: painting at numpy speed, saving only touched chunks.

napari paints with fancy indices (``data[(zs, ys, xs)] = label``) and reads the old values
twice per brush dab (for the change test and the undo history). Straight on zarr each of those
decodes (and the write re-encodes) whole chunks: tens of milliseconds per dab. Here a dab loads
the chunks it touches once into memory and marks them dirty; :meth:`ChunkCache.flush` writes
each dirty chunk whole (aligned, so zarr does no read-modify-write) — the widget flushes half a
second after the last stroke, before training, and on close. Plain slicing (the plane on
screen) reads zarr and overlays the cached chunks, so memory holds only touched chunks.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import zarr


class ChunkCache:
    """Array-like (Z, Y, X) view of ``array`` (a zarr array) with cached, dirty-tracked chunks.

    Attributes:
        array: the zarr array written on :meth:`flush`. shape, dtype, ndim: as ``array``'s.
    """

    def __init__(self, array: zarr.Array) -> None:
        self.array = array
        self.shape = tuple(int(s) for s in array.shape)
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)
        self.chunks = tuple(int(c) for c in array.chunks)
        self._cache: dict[tuple[int, ...], np.ndarray[Any, Any]] = {}
        self._dirty: set[tuple[int, ...]] = set()
        self._lock = threading.RLock()

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def dirty(self) -> int:
        """Chunks changed since the last flush."""
        return len(self._dirty)

    def _box(self, idx: tuple[int, ...]) -> tuple[slice, ...]:
        return tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, self.chunks, self.shape, strict=True))

    def _chunk(self, idx: tuple[int, ...]) -> np.ndarray[Any, Any]:
        hit = self._cache.get(idx)
        if hit is None:
            hit = np.array(self.array[self._box(idx)], dtype=self.dtype)
            self._cache[idx] = hit
        return hit

    @staticmethod
    def _is_fancy(key: Any) -> bool:
        return isinstance(key, tuple) and len(key) > 0 and all(isinstance(k, np.ndarray | list) for k in key)

    def _points(self, key: tuple[Any, ...]) -> tuple[np.ndarray[Any, Any], dict[tuple[int, ...], np.ndarray[Any, Any]]]:
        pts = np.stack([np.asarray(k, dtype=np.int64).reshape(-1) for k in key], axis=1)
        cidx = pts // np.asarray(self.chunks)
        groups: dict[tuple[int, ...], np.ndarray[Any, Any]] = {}
        if len(pts):
            uniq, inverse = np.unique(cidx, axis=0, return_inverse=True)
            for g, idx in enumerate(uniq):
                groups[tuple(int(i) for i in idx)] = np.nonzero(inverse.reshape(-1) == g)[0]
        return pts, groups

    def __getitem__(self, key: Any) -> Any:
        with self._lock:
            if self._is_fancy(key):
                pts, groups = self._points(key)
                out = np.zeros(len(pts), self.dtype)
                for idx, sel in groups.items():
                    local = pts[sel] - np.asarray([b.start for b in self._box(idx)])
                    out[sel] = self._chunk(idx)[tuple(local.T)]
                return out.reshape(np.asarray(key[0]).shape)
            return self._read_basic(key)

    def _read_basic(self, key: Any) -> Any:
        key = self._normalize(key)
        data = np.asarray(self.array[key])
        if not self._cache:
            return data
        # overlay cached chunks on the region read (only basic int/slice keys reach here)
        spans, keep = [], []
        for k, n in zip(key, self.shape, strict=True):
            if isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step != 1:
                    return self._overlay_slow(key, data)
                spans.append((start, stop))
                keep.append(True)
            else:
                i = int(k) + (n if int(k) < 0 else 0)
                spans.append((i, i + 1))
                keep.append(False)
        full = data.reshape([b - a for a, b in spans])
        for idx, chunk in self._cache.items():
            box = self._box(idx)
            inter = [(max(a, s.start), min(b, s.stop)) for (a, b), s in zip(spans, box, strict=True)]
            if any(lo >= hi for lo, hi in inter):
                continue
            dst = tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(inter, spans, strict=True))
            src = tuple(slice(lo - s.start, hi - s.start) for (lo, hi), s in zip(inter, box, strict=True))
            full[dst] = chunk[src]
        return full.reshape([b - a for (a, b), k in zip(spans, keep, strict=True) if k])

    def _overlay_slow(self, key: Any, data: np.ndarray[Any, Any]) -> Any:  # pragma: no cover - strided reads
        grid = np.ix_(*[np.arange(self.shape[d])[k] if isinstance(k, slice) else [int(k)] for d, k in enumerate(key)])
        coords = np.broadcast_arrays(*grid)
        values = self[tuple(c.reshape(-1) for c in coords)]
        return values.reshape(data.shape)

    def _normalize(self, key: Any) -> tuple[Any, ...]:
        """A basic key as one int or slice per axis."""
        key = key if isinstance(key, tuple) else (key,)
        if Ellipsis in key:
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (self.ndim - len(key) + 1) + key[i + 1:]
        return key + (slice(None),) * (self.ndim - len(key))

    def __setitem__(self, key: Any, value: Any) -> None:
        with self._lock:
            if not self._is_fancy(key):  # a basic region: as the points it holds
                key = self._normalize(key)
                axes = [np.arange(n)[k] if isinstance(k, slice) else np.array([int(k)])
                        for k, n in zip(key, self.shape, strict=True)]
                kept = [len(a) for a, k in zip(axes, key, strict=True) if isinstance(k, slice)]
                value = np.broadcast_to(np.asarray(value, self.dtype), kept).reshape(-1)
                key = tuple(g.reshape(-1) for g in np.meshgrid(*axes, indexing="ij"))
            pts, groups = self._points(key)
            vals = np.broadcast_to(np.asarray(value, self.dtype).reshape(-1), (len(pts),))
            for idx, sel in groups.items():
                local = pts[sel] - np.asarray([b.start for b in self._box(idx)])
                self._chunk(idx)[tuple(local.T)] = vals[sel]
                self._dirty.add(idx)

    def flush(self) -> int:
        """Write every dirty chunk (whole) to the zarr array; returns how many were written."""
        with self._lock:
            dirty = sorted(self._dirty)
            for idx in dirty:
                self.array[self._box(idx)] = self._cache[idx]
            self._dirty.clear()
            return len(dirty)
