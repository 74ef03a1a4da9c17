"""ChunkWriter: chunk files written from the calling thread are an ordinary zarr array."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.io.chunks import ChunkWriter
from pipeline.io.store import create_array, create_group

SHAPE = (21, 30, 17)  # no axis a multiple of the chunk edge 8: edge chunks on every face
CHUNKS = (8, 8, 8)


def _data(dtype: str, rng: np.random.Generator) -> np.ndarray:
    if dtype == "float32":
        return rng.normal(0.0, 1.0, SHAPE).astype(np.float32)
    return rng.integers(0, np.iinfo(dtype).max, SHAPE, endpoint=True).astype(dtype)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "float32"])
def test_slabs_read_back_as_written_and_as_zarr_writes_them(tmp_path: Path, dtype: str) -> None:
    rng = np.random.default_rng(3)
    data = _data(dtype, rng)
    group = create_group(tmp_path / "a.zarr")
    direct = create_array(group, "0", shape=SHAPE, dtype=dtype, chunks=CHUNKS)
    plain = create_array(group, "1", shape=SHAPE, dtype=dtype, chunks=CHUNKS)
    writer = ChunkWriter(direct)
    assert writer.direct
    for z0 in reversed(range(0, SHAPE[0], CHUNKS[0])):  # any order: no chunk depends on another
        writer.write((z0, 0, 0), data[z0 : z0 + CHUNKS[0]])
        plain[z0 : z0 + CHUNKS[0]] = data[z0 : z0 + CHUNKS[0]]
    reopened = zarr.open_array(tmp_path / "a.zarr" / "0", mode="r")
    np.testing.assert_array_equal(reopened[...], data)
    np.testing.assert_array_equal(reopened[...], plain[...])
    # the same chunk files as zarr's own write, each decoding to the same chunk
    files = sorted(p.relative_to(tmp_path / "a.zarr" / "0") for p in (tmp_path / "a.zarr" / "0").rglob("c/**/*")
                   if p.is_file())
    assert len(files) == 3 * 4 * 3
    assert files == sorted(p.relative_to(tmp_path / "a.zarr" / "1") for p in (tmp_path / "a.zarr" / "1").rglob("c/**/*")
                           if p.is_file())


def test_a_region_inside_the_array_and_a_chunk_equal_to_the_fill_value(tmp_path: Path) -> None:
    array = create_array(create_group(tmp_path / "b.zarr"), "0", shape=SHAPE, dtype="uint16", chunks=CHUNKS)
    writer = ChunkWriter(array)
    block = np.zeros((8, 16, 8), np.uint16)
    block[:, 8:] = 7
    writer.write((8, 8, 8), block)
    np.testing.assert_array_equal(array[8:16, 8:24, 8:16], block)
    assert array[...].sum() == 7 * 8 * 8 * 8
    assert (tmp_path / "b.zarr" / "0" / "c" / "1" / "1" / "1").is_file()  # written although all 0


def test_misaligned_regions_are_refused(tmp_path: Path) -> None:
    array = create_array(create_group(tmp_path / "c.zarr"), "0", shape=SHAPE, dtype="uint8", chunks=CHUNKS)
    writer = ChunkWriter(array)
    with pytest.raises(ValueError, match="not chunk-aligned"):
        writer.write((4, 0, 0), np.zeros((8, 30, 17), np.uint8))
    with pytest.raises(ValueError, match="not chunk-aligned"):
        writer.write((0, 0, 0), np.zeros((5, 30, 17), np.uint8))  # ends inside a chunk, not at the end
    with pytest.raises(ValueError, match="not chunk-aligned"):
        writer.write((16, 0, 0), np.zeros((8, 30, 17), np.uint8))  # runs past the end
    assert not any((tmp_path / "c.zarr" / "0").rglob("c/**/*"))


def test_a_sharded_array_falls_back_to_zarr(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    data = _data("uint16", rng)
    array = create_array(create_group(tmp_path / "d.zarr"), "0", shape=SHAPE, dtype="uint16", chunks=CHUNKS,
                         shards=(8, 16, 16))
    writer = ChunkWriter(array)
    assert not writer.direct
    for z0 in range(0, SHAPE[0], CHUNKS[0]):
        writer.write((z0, 0, 0), data[z0 : z0 + CHUNKS[0]])
    np.testing.assert_array_equal(array[...], data)
