"""Axis-aligned boxes in voxel units.

A :class:`Box` is half-open: it covers ``offset[i] <= p[i] < offset[i] + shape[i]`` along each
axis, in (z, y, x) order for volumes. Boxes are frozen, slotted and hashable; every check
raises :class:`~pipeline.core.errors.GeometryError` (never ``assert``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pipeline.core.errors import GeometryError

#: Names of the volume axes, in array order (OME-Zarr ``axes``, zarr ``dimension_names``).
AXES: tuple[str, str, str] = ("z", "y", "x")


def _as_tuple(values: Iterable[int], name: str) -> tuple[int, ...]:
    out = tuple(int(v) for v in values)
    for v, raw in zip(out, values, strict=False):
        if v != raw:
            raise GeometryError(f"{name} must hold integers, got {raw!r}")
    return out


@dataclass(frozen=True, slots=True)
class Box:
    """Half-open box ``[offset, offset + shape)``.

    Args:
        offset: first voxel, one int per axis (may be negative for padded reads).
        shape: extent per axis, each ``>= 0``.
    """

    offset: tuple[int, ...]
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        offset = _as_tuple(self.offset, "offset")
        shape = _as_tuple(self.shape, "shape")
        if len(offset) != len(shape):
            raise GeometryError(f"offset {offset} and shape {shape} differ in dimensions")
        if any(s < 0 for s in shape):
            raise GeometryError(f"shape {shape} has a negative extent")
        object.__setattr__(self, "offset", offset)
        object.__setattr__(self, "shape", shape)

    @classmethod
    def from_shape(cls, shape: Sequence[int]) -> Box:
        """The box ``[0, shape)``."""
        return cls((0,) * len(shape), tuple(shape))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def end(self) -> tuple[int, ...]:
        """One past the last voxel, per axis."""
        return tuple(o + s for o, s in zip(self.offset, self.shape, strict=True))

    @property
    def size(self) -> int:
        """Number of voxels."""
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def empty(self) -> bool:
        return self.size == 0

    def _check_ndim(self, other: Box) -> None:
        if other.ndim != self.ndim:
            raise GeometryError(f"{self} and {other} differ in dimensions")

    def grow(self, amount: int | Sequence[int]) -> Box:
        """Grow by ``amount`` voxels on both sides of each axis (negative shrinks)."""
        amounts = (amount,) * self.ndim if isinstance(amount, int) else tuple(amount)
        if len(amounts) != self.ndim:
            raise GeometryError(f"grow amount {amounts} does not match {self.ndim} dimensions")
        shape = tuple(s + 2 * a for s, a in zip(self.shape, amounts, strict=True))
        if any(s < 0 for s in shape):
            raise GeometryError(f"cannot shrink {self} by {amounts}")
        return Box(tuple(o - a for o, a in zip(self.offset, amounts, strict=True)), shape)

    def shift(self, delta: Sequence[int]) -> Box:
        """Translate by ``delta``."""
        if len(delta) != self.ndim:
            raise GeometryError(f"shift {tuple(delta)} does not match {self.ndim} dimensions")
        return Box(tuple(o + d for o, d in zip(self.offset, delta, strict=True)), self.shape)

    def intersect(self, other: Box) -> Box:
        """The common part of two boxes (shape 0 along an axis where they do not meet)."""
        self._check_ndim(other)
        lo = tuple(max(a, b) for a, b in zip(self.offset, other.offset, strict=True))
        hi = tuple(min(a, b) for a, b in zip(self.end, other.end, strict=True))
        return Box(lo, tuple(max(0, h - low) for low, h in zip(lo, hi, strict=True)))

    def contains(self, other: Box) -> bool:
        """True if ``other`` lies inside this box (an empty box is inside any box)."""
        self._check_ndim(other)
        if other.empty:
            return True
        return all(
            so <= oo and oe <= se
            for so, se, oo, oe in zip(self.offset, self.end, other.offset, other.end, strict=True)
        )

    def relative_to(self, outer: Box) -> Box:
        """This box in the coordinates of ``outer`` (``outer.offset`` becomes 0)."""
        self._check_ndim(outer)
        return Box(tuple(a - b for a, b in zip(self.offset, outer.offset, strict=True)), self.shape)

    def to_slices(self) -> tuple[slice, ...]:
        """Slices for numpy/zarr indexing; the box must not start below 0."""
        if any(o < 0 for o in self.offset):
            raise GeometryError(f"{self} starts below 0 and cannot index an array")
        return tuple(slice(o, e) for o, e in zip(self.offset, self.end, strict=True))

    def __str__(self) -> str:
        spans = ", ".join(f"{o}:{e}" for o, e in zip(self.offset, self.end, strict=True))
        return f"[{spans}]"
