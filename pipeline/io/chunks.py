"""Chunk-aligned writes straight to a local zarr v3 array's chunk files, from the calling thread.

``array[z0:z1] = slab`` hands every chunk to zarr's event loop: it checks each chunk against the
fill value (``np.array_equal`` with ``equal_nan``: several passes over the chunk), encodes it in
a thread of its own pool and writes it from there. For ingest, where several slab threads each
hold a chunk-aligned slab, that path cost twice the CPU of the encoding itself (a 64 MiB uint16
slab, 16 chunks of 128^3: 339 ms CPU through zarr, 175 ms here; docs/performance.md, ingest).

:class:`ChunkWriter` encodes with the array's own codecs (zarr's ``bytes`` codec, then its Blosc
codec's settings through numcodecs, which releases the GIL while compressing) and writes each
chunk file at the key zarr's metadata gives it, so the result is an ordinary zarr array that
zarr reads back. Edge chunks are padded with the fill value to the full chunk shape, as zarr
stores them. Every chunk is written, also one equal to the fill value (zarr's
``write_empty_chunks=True``). Arrays it cannot write this way (another store, other codecs,
sharding) fall back to zarr's own write: :attr:`ChunkWriter.direct` says which.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Literal

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec
from zarr.storage import LocalStore

_SHUFFLE = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE,
            "bitshuffle": numcodecs.Blosc.BITSHUFFLE}


class ChunkWriter:
    """Writes chunk-aligned regions of one zarr v3 array (3D, chunks ``C = array.chunks``).

    Thread-safe for regions that share no chunk (each call writes its own chunk files).
    """

    def __init__(self, array: zarr.Array) -> None:
        self.array = array
        self.chunks = tuple(int(c) for c in array.chunks)
        self.shape = tuple(int(s) for s in array.shape)
        self.fill = array.fill_value
        self._dtype = np.dtype(array.dtype)
        #: (compressor, folder of the array) when chunks are encoded and written here
        self._direct: tuple[numcodecs.Blosc, Path] | None = None
        codecs = tuple(getattr(array.metadata, "codecs", ()))
        store = array.store_path.store
        if (getattr(array.metadata, "zarr_format", 2) == 3 and len(codecs) == 2 and isinstance(codecs[0], BytesCodec)
                and isinstance(codecs[1], BloscCodec) and isinstance(store, LocalStore) and len(self.shape) == 3):
            blosc, endian = codecs[1], codecs[0].endian
            order: Literal["<", ">"] = ">" if endian is not None and endian.value == "big" else "<"
            if self._dtype.itemsize > 1:
                self._dtype = self._dtype.newbyteorder(order)
            compressor = numcodecs.Blosc(cname=blosc.cname.value, clevel=int(blosc.clevel),
                                         shuffle=_SHUFFLE[blosc.shuffle.value], blocksize=int(blosc.blocksize))
            self._direct = (compressor, Path(store.root) / array.store_path.path)

    @property
    def direct(self) -> bool:
        """True when chunks are encoded and written here, False when zarr writes them."""
        return self._direct is not None

    def write(self, start: tuple[int, int, int], data: np.ndarray[Any, Any]) -> None:
        """Write ``data`` (Z, Y, X) at ``start``, a chunk corner; its far faces end on chunk
        boundaries or on the array's end (so no chunk is written in part).

        Raises:
            ValueError: when the region is not chunk-aligned or does not fit in the array.
        """
        end = tuple(s + n for s, n in zip(start, data.shape, strict=True))
        for s, e, c, n in zip(start, end, self.chunks, self.shape, strict=True):
            if s % c or e > n or (e % c and e != n):
                raise ValueError(f"region {start}..{end} is not chunk-aligned for chunks {self.chunks} "
                                 f"of an array of shape {self.shape}")
        if self._direct is None:
            self.array[tuple(slice(s, e) for s, e in zip(start, end, strict=True))] = data
            return
        compressor, root = self._direct
        ranges = (range(s, e, c) for s, e, c in zip(start, end, self.chunks, strict=True))
        for corner in itertools.product(*ranges):
            part = data[tuple(slice(a - s, a - s + c) for a, s, c in zip(corner, start, self.chunks, strict=True))]
            if part.shape != self.chunks:  # an edge chunk: padded with the fill value, as zarr stores it
                full = np.full(self.chunks, self.fill, dtype=self._dtype)
                full[tuple(slice(0, n) for n in part.shape)] = part
                part = full
            key = self.array.metadata.encode_chunk_key(tuple(a // c for a, c in zip(corner, self.chunks, strict=True)))
            path = root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            encoded = compressor.encode(np.ascontiguousarray(part, dtype=self._dtype))  # GIL released
            with open(path, "wb") as f:
                f.write(encoded)
