"""The per-block ledger of a segmentation: done-markers and per-block results.

The ledger lives inside the output's zarr hierarchy as two arrays over the block grid
``(GZ, GY, GX)``, one chunk per block, so each block writes only its own chunk files:

- ``ledger/done``  uint8: 0 = not done, 1 = computed, 2 = skipped (constant / masked out);
- ``ledger/stats`` float64 ``(GZ, GY, GX, F)``: the block's :class:`BlockRecord` fields.

A block writes its output chunks first, then its stats, then its done-marker; a block whose
marker is set is finished. The group attribute ``studios.ledger`` records what the ledger
was made with (model fingerprint, scan, block shape); a rerun with different settings is
refused instead of mixing results.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from pipeline.core.errors import LedgerMismatchError
from pipeline.core.tiling import Block

DONE, SKIPPED = 1, 2
BASE_FIELDS = ("voxels", "read_s", "normalize_s", "forward_s", "write_s", "skipped")
CONF_BINS = 10


def field_names(classes: int) -> tuple[str, ...]:
    """Names of the stats vector for ``classes`` classes."""
    per_class = [f"{kind}_{k + 1}" for kind in ("count", "isum", "isum2") for k in range(classes)]
    conf = [f"conf_{i}" for i in range(CONF_BINS)]
    return (*BASE_FIELDS, *per_class, *conf, "entropy_sum")


@dataclass(frozen=True, slots=True)
class BlockRecord:
    """What one block reports (everything is a number, stored in ``ledger/stats``).

    Attributes:
        values: field name -> value, see :func:`field_names`.
    """

    block_id: str
    index: tuple[int, ...]
    values: Mapping[str, float]

    def vector(self, names: Sequence[str]) -> np.ndarray[Any, np.dtype[np.float64]]:
        return np.array([float(self.values.get(n, 0.0)) for n in names], dtype=np.float64)


class Ledger:
    """Done-markers and per-block records in ``group['ledger']``."""

    def __init__(self, group: zarr.Group) -> None:
        self.group = group
        ledger = group["ledger"]
        if not isinstance(ledger, zarr.Group):
            raise LedgerMismatchError(f"{group.store}: 'ledger' is not a group; pass --overwrite to start again")
        self.done_array = ledger["done"]
        self.stats_array = ledger["stats"]
        self.names: tuple[str, ...] = tuple(ledger.attrs["fields"])  # type: ignore[arg-type]

    @classmethod
    def create(cls, group: zarr.Group, grid: Sequence[int], names: Sequence[str]) -> Ledger:
        ledger = group.create_group("ledger")
        ledger.attrs["fields"] = list(names)
        ledger.create_array("done", shape=tuple(grid), chunks=(1,) * len(grid), dtype="uint8", fill_value=0)
        ledger.create_array(
            "stats", shape=(*grid, len(names)), chunks=(*(1,) * len(grid), len(names)), dtype="float64", fill_value=0.0
        )
        return cls(group)

    def mark(self, record: BlockRecord, *, skipped: bool = False) -> None:
        """Write the block's stats, then its done-marker (the marker is last)."""
        idx = tuple(slice(i, i + 1) for i in record.index)
        self.stats_array[idx] = record.vector(self.names).reshape(*(1,) * len(record.index), -1)
        self.done_array[idx] = np.full((1,) * len(record.index), SKIPPED if skipped else DONE, dtype=np.uint8)

    def done_mask(self) -> np.ndarray[Any, np.dtype[np.uint8]]:
        """(GZ, GY, GX) uint8 markers; unreadable (half-written) markers count as not done."""
        try:
            return np.asarray(self.done_array[...])
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

    def totals(self) -> dict[str, float]:
        """Field sums over all finished blocks."""
        stats = np.asarray(self.stats_array[...]).reshape(-1, len(self.names))
        done = self.done_mask().reshape(-1) > 0
        sums = stats[done].sum(axis=0) if done.any() else np.zeros(len(self.names))
        return {n: float(v) for n, v in zip(self.names, sums, strict=True)}

    def records(self) -> Iterator[tuple[tuple[int, ...], dict[str, float]]]:
        stats = np.asarray(self.stats_array[...])
        mask = self.done_mask()
        for index in zip(*np.nonzero(mask), strict=True):
            yield tuple(int(i) for i in index), dict(zip(self.names, stats[index], strict=True))


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
