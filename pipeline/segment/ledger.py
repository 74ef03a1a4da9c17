"""The per-block ledger of a segmentation: done-markers and per-block statistics.

The ledger lives inside the output's zarr hierarchy as two arrays over the block grid
``(GZ, GY, GX)``, one chunk per block, so each block writes only its own chunk files:

- ``ledger/done``  uint8: 0 = not done, 1 = computed, 2 = skipped (constant / masked out);
- ``ledger/stats`` float64 ``(GZ, GY, GX, F)``: the block's :class:`BlockStats` as one row
  (:meth:`BlockStats.to_row`; ``F = 6 + 3 K + CONF_BINS + 1``).

A block writes its output chunks first, then its stats, then its done-marker; a block whose
marker is set is finished. The group attribute ``studios.ledger`` records what the ledger
was made with (model fingerprint, scan, block shape); a rerun with different settings is
refused instead of mixing results. The row layout is versioned (``ledger.attrs["layout"]``):
an output written with another layout is refused with :class:`LedgerMismatchError`.

This module is the only one that knows how a row is laid out; the driver's summary and QC
read :class:`BlockStats`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from pipeline.core.errors import LedgerMismatchError
from pipeline.core.tiling import Block

DONE, SKIPPED = 1, 2
CONF_BINS = 10
LAYOUT = "studios-block-stats/2"
_STAGES = ("read", "normalize", "forward", "write")

F64 = np.ndarray[Any, np.dtype[np.float64]]


def _zeros(n: int) -> F64:
    out = np.zeros(n, dtype=np.float64)
    out.flags.writeable = False
    return out


def _frozen(values: Any, n: int, name: str) -> F64:
    out = np.array(values, dtype=np.float64).reshape(-1)
    if out.shape != (n,):
        raise ValueError(f"BlockStats.{name} must have {n} values, got {out.shape[0]}")
    out.flags.writeable = False
    return out


@dataclass(frozen=True, slots=True, eq=False)
class BlockStats:
    """What one block reports, summed over its write box (or over many blocks: :meth:`__add__`).

    Attributes:
        classes: K.
        voxels: write-box voxels.
        read_s, normalize_s, forward_s, write_s: seconds per stage (normalize_s: the
            post-processing after the forward pass; normalisation is fused into it).
        skipped: 1 for a block skipped as constant or masked out (a count when summed).
        counts, isum, isum2: (K,) float64 voxels per class, sums of raw intensity and of its square.
        confidence: (CONF_BINS,) float64 histogram of the max class probability over [0, 1].
        entropy_sum: sum over voxels of the class entropy (nats).
    """

    classes: int
    voxels: float = 0.0
    read_s: float = 0.0
    normalize_s: float = 0.0
    forward_s: float = 0.0
    write_s: float = 0.0
    skipped: float = 0.0
    counts: F64 = dataclasses.field(default_factory=lambda: _zeros(0))
    isum: F64 = dataclasses.field(default_factory=lambda: _zeros(0))
    isum2: F64 = dataclasses.field(default_factory=lambda: _zeros(0))
    confidence: F64 = dataclasses.field(default_factory=lambda: _zeros(CONF_BINS))
    entropy_sum: float = 0.0

    def __post_init__(self) -> None:
        k = int(self.classes)
        for name in ("counts", "isum", "isum2"):
            value = getattr(self, name)
            object.__setattr__(self, name, _zeros(k) if len(value) == 0 and k else _frozen(value, k, name))
        object.__setattr__(self, "confidence", _frozen(self.confidence, CONF_BINS, "confidence"))

    @staticmethod
    def width(classes: int) -> int:
        """F, the length of a ledger row for ``classes`` classes."""
        return 6 + 3 * classes + CONF_BINS + 1

    @property
    def stage_seconds(self) -> dict[str, float]:
        """``{"read_s", "normalize_s", "forward_s", "write_s"}`` seconds."""
        return {f"{s}_s": float(getattr(self, f"{s}_s")) for s in _STAGES}

    def to_row(self) -> F64:
        """(F,) float64: voxels, 4 stage seconds, skipped, counts, isum, isum2, confidence, entropy."""
        head = [self.voxels, self.read_s, self.normalize_s, self.forward_s, self.write_s, self.skipped]
        return np.concatenate([np.array(head, dtype=np.float64), self.counts, self.isum, self.isum2,
                               self.confidence, np.array([self.entropy_sum], dtype=np.float64)])

    @classmethod
    def from_row(cls, row: Any, classes: int) -> BlockStats:
        """Inverse of :meth:`to_row`; ``row`` is (F,) numbers."""
        r = np.asarray(row, dtype=np.float64).reshape(-1)
        k = int(classes)
        if r.shape != (cls.width(k),):
            raise ValueError(f"a ledger row for {k} classes has {cls.width(k)} values, got {r.shape[0]}")
        c0 = 6
        return cls(
            classes=k, voxels=float(r[0]), read_s=float(r[1]), normalize_s=float(r[2]), forward_s=float(r[3]),
            write_s=float(r[4]), skipped=float(r[5]), counts=r[c0:c0 + k], isum=r[c0 + k:c0 + 2 * k],
            isum2=r[c0 + 2 * k:c0 + 3 * k], confidence=r[c0 + 3 * k:c0 + 3 * k + CONF_BINS], entropy_sum=float(r[-1]),
        )

    def __add__(self, other: BlockStats) -> BlockStats:
        if other.classes != self.classes:
            raise ValueError(f"cannot add stats of {self.classes} and {other.classes} classes")
        return BlockStats.from_row(self.to_row() + other.to_row(), self.classes)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockStats):
            return NotImplemented
        return self.classes == other.classes and bool(np.array_equal(self.to_row(), other.to_row()))

    __hash__ = None  # type: ignore[assignment]


class Ledger:
    """Done-markers and per-block :class:`BlockStats` in ``group['ledger']``."""

    def __init__(self, group: zarr.Group) -> None:
        self.group = group
        where = f"{group.store}"
        ledger = group["ledger"]
        if not isinstance(ledger, zarr.Group):
            raise LedgerMismatchError(f"{where}: 'ledger' is not a group; pass --overwrite to start again")
        done, stats = ledger["done"], ledger["stats"]
        if not isinstance(done, zarr.Array) or not isinstance(stats, zarr.Array):
            raise LedgerMismatchError(f"{where}: the ledger arrays are damaged; pass --overwrite to start again")
        classes = ledger.attrs.get("classes")
        self.done_array: zarr.Array = done
        self.stats_array: zarr.Array = stats
        self.classes: int = classes if isinstance(classes, int) else 0
        self._layout_error: str | None = None
        if ledger.attrs.get("layout") != LAYOUT or not isinstance(classes, int) \
                or stats.shape[-1] != BlockStats.width(classes):
            self._layout_error = (
                f"{where}: the block ledger was written by another studios version (layout "
                f"{ledger.attrs.get('layout', 'unversioned')!r}, expected {LAYOUT!r}); pass --overwrite to start again"
            )

    def check_layout(self) -> None:
        """Raise :class:`LedgerMismatchError` unless the stats rows have this version's layout.

        The done-markers (:meth:`done_mask`, :meth:`pending`) are readable whatever the layout.
        """
        if self._layout_error is not None:
            raise LedgerMismatchError(self._layout_error)

    @classmethod
    def create(cls, group: zarr.Group, grid: Sequence[int], classes: int) -> Ledger:
        """Create ``group['ledger']`` for a block grid ``(GZ, GY, GX)`` and ``classes`` classes."""
        ledger = group.create_group("ledger")
        ledger.attrs.update({"layout": LAYOUT, "classes": int(classes)})
        width = BlockStats.width(classes)
        ledger.create_array("done", shape=tuple(grid), chunks=(1,) * len(grid), dtype="uint8", fill_value=0)
        ledger.create_array("stats", shape=(*grid, width), chunks=(*(1,) * len(grid), width), dtype="float64",
                            fill_value=0.0)
        return cls(group)

    def mark(self, block: Block, stats: BlockStats) -> None:
        """Write the block's stats, then its done-marker (the marker is last).

        The marker is :data:`SKIPPED` when ``stats.skipped`` is set, else :data:`DONE`.
        """
        self.check_layout()
        if stats.classes != self.classes:
            raise ValueError(f"block {block.id}: stats of {stats.classes} classes in a {self.classes}-class ledger")
        ones = (1,) * len(block.index)
        idx = tuple(slice(i, i + 1) for i in block.index)
        self.stats_array[idx] = stats.to_row().reshape(*ones, -1)
        self.done_array[idx] = np.full(ones, SKIPPED if stats.skipped else DONE, dtype=np.uint8)

    def done_mask(self) -> np.ndarray[Any, np.dtype[np.uint8]]:
        """(GZ, GY, GX) uint8 markers; unreadable (half-written) markers count as not done."""
        try:
            return np.asarray(self.done_array[...], dtype=np.uint8)
        except Exception:
            out = np.zeros(self.done_array.shape, dtype=np.uint8)
            for index in np.ndindex(*out.shape):
                try:
                    out[index] = self.done_array[index]
                except Exception:
                    out[index] = 0
            return out

    def pending(self, blocks: Sequence[Block]) -> list[Block]:
        mask = self.done_mask()
        return [b for b in blocks if not mask[b.index]]

    def _rows(self) -> F64:
        self.check_layout()
        return np.asarray(self.stats_array[...], dtype=np.float64)

    def totals(self) -> BlockStats:
        """Sum of the stats of all finished blocks."""
        rows = self._rows().reshape(-1, BlockStats.width(self.classes))
        done = self.done_mask().reshape(-1) > 0
        return BlockStats.from_row(rows[done].sum(axis=0), self.classes)

    def records(self) -> Iterator[tuple[tuple[int, ...], BlockStats]]:
        """(grid index, stats) of every finished block, in C order."""
        rows = self._rows()
        mask = self.done_mask()
        for index in zip(*np.nonzero(mask), strict=True):
            ix = tuple(int(i) for i in index)
            yield ix, BlockStats.from_row(rows[ix], self.classes)

    def confidence_grid(self, *, computed_only: bool = True) -> F64:
        """(GZ, GY, GX, CONF_BINS) float64 confidence histograms per block (0 where not computed)."""
        k = self.classes
        start = 6 + 3 * k
        conf = self._rows()[..., start:start + CONF_BINS]
        keep = self.done_mask() == DONE if computed_only else self.done_mask() > 0
        return np.where(keep[..., None], conf, 0.0)


def check_manifest(found: Mapping[str, Any] | None, wanted: Mapping[str, Any], where: str) -> None:
    """Raise :class:`LedgerMismatchError` if a resumable output was made differently."""
    if found is None:
        return
    diffs = [k for k in wanted if found.get(k) != wanted[k]]
    if diffs:
        details = ", ".join(f"{k}: {found.get(k)!r} -> {wanted[k]!r}" for k in diffs)
        raise LedgerMismatchError(
            f"{where}: an unfinished run made it with other settings ({details}); "
            "pass --overwrite to start again or rerun with the original settings"
        )
