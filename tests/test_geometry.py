"""Box and block planning: properties that must hold for every volume and block shape."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.errors import GeometryError
from pipeline.core.geometry import Box
from pipeline.core.tiling import Block, check_alignment, plan_blocks

dims = st.tuples(*(st.integers(1, 23),) * 3)
halos = st.integers(0, 6)


@given(volume=dims, block=dims, halo=halos)
@settings(max_examples=150, deadline=None)
def test_write_boxes_partition_the_volume(volume, block, halo):
    blocks = plan_blocks(volume, block, halo)
    cover = np.zeros(volume, dtype=np.int32)
    for b in blocks:
        cover[b.write.to_slices()] += 1
    assert (cover == 1).all()


@given(volume=dims, block=dims, halo=halos)
@settings(max_examples=150, deadline=None)
def test_read_boxes_contain_write_boxes_with_exact_halo(volume, block, halo):
    vol = Box.from_shape(volume)
    for b in plan_blocks(volume, block, halo):
        assert b.read.contains(b.write)
        assert b.read == b.write.grow(halo)
        assert vol.contains(b.write)
        src = b.source(vol)
        pad = b.padding(vol)
        assert tuple(s + p0 + p1 for s, (p0, p1) in zip(src.shape, pad, strict=True)) == b.read.shape
        # padding happens only at true volume borders
        for axis, (p0, p1) in enumerate(pad):
            if p0:
                assert src.offset[axis] == 0
            if p1:
                assert src.end[axis] == volume[axis]


@given(volume=dims, block=dims, halo=halos)
@settings(max_examples=100, deadline=None)
def test_block_ids_unique_and_stable(volume, block, halo):
    first = [b.id for b in plan_blocks(volume, block, halo)]
    again = [b.id for b in plan_blocks(volume, block, halo + 1)]
    assert len(set(first)) == len(first)
    assert first == again  # ids come from the grid, not from the halo or order of execution


def test_box_operations():
    a = Box((0, 0, 0), (4, 5, 6))
    b = Box((2, 3, 4), (4, 4, 4))
    assert a.intersect(b) == Box((2, 3, 4), (2, 2, 2))
    assert a.grow(1) == Box((-1, -1, -1), (6, 7, 8))
    assert a.grow(1).grow(-1) == a
    assert a.contains(Box((1, 1, 1), (1, 1, 1)))
    assert not a.contains(b)
    assert a.to_slices() == (slice(0, 4), slice(0, 5), slice(0, 6))
    assert a.size == 120 and hash(a) == hash(Box((0, 0, 0), (4, 5, 6)))
    assert Box((0, 0), (3, 3)).intersect(Box((5, 5), (1, 1))).empty
    with pytest.raises(AttributeError):
        a.offset = (1, 1, 1)  # type: ignore[misc]


@pytest.mark.parametrize(
    "call",
    [
        lambda: Box((0, 0), (1, -1)),
        lambda: Box((0, 0, 0), (1, 1)),
        lambda: Box((0, 0, 0), (2, 2, 2)).grow(-2),
        lambda: Box((-1, 0, 0), (2, 2, 2)).to_slices(),
        lambda: plan_blocks((10, 10, 10), (0, 5, 5), 1),
        lambda: plan_blocks((10, 10, 10), (5, 5), 1),
        lambda: plan_blocks((10, 10, 10), (5, 5, 5), -1),
        lambda: plan_blocks((0, 10, 10), (5, 5, 5), 1),
    ],
)
def test_bad_geometry_raises(call):
    with pytest.raises(GeometryError):
        call()


def test_misaligned_blocks_are_a_clear_error():
    with pytest.raises(GeometryError, match="multiple of 64"):
        plan_blocks((300, 300, 300), (96, 96, 96), 4, chunk_shape=(64, 64, 64))
    check_alignment((128, 128, 128), (64, 64, 64), (300, 300, 300))
    check_alignment((400, 400, 400), (64, 64, 64), (300, 300, 300))  # one block per axis


def test_block_is_frozen_and_hashable():
    b = plan_blocks((8, 8, 8), (4, 4, 4), 1)[3]
    assert isinstance(b, Block) and b.id == "0-1-1"
    assert len({b, b}) == 1
