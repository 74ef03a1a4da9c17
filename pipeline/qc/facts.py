"""What QC takes from the block ledger (no voxel is read again): totals and per-block confidence."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.segment.ledger import CONF_BINS, DONE, SKIPPED, BlockStats, Ledger

F64 = np.ndarray[Any, np.dtype[np.float64]]


@dataclass(frozen=True)
class LedgerFacts:
    """The ledger, summed and per block.

    Attributes:
        done: (GZ, GY, GX) uint8 markers (0 missing, 1 computed, 2 skipped).
        totals: stats summed over finished blocks.
        block_conf: (GZ, GY, GX, CONF_BINS) float64 confidence histograms, 0 where not computed.
    """

    done: np.ndarray[Any, np.dtype[np.uint8]]
    totals: BlockStats
    block_conf: F64

    @property
    def counts(self) -> F64:
        """(K,) voxels per class."""
        return self.totals.counts

    @property
    def block_seconds(self) -> dict[str, float]:
        return self.totals.stage_seconds

    @property
    def n_done(self) -> int:
        return int((self.done > 0).sum())

    @property
    def n_computed(self) -> int:
        return int((self.done == DONE).sum())

    @property
    def n_skipped(self) -> int:
        return int((self.done == SKIPPED).sum())


def ledger_facts(ledger: Ledger) -> LedgerFacts:
    """Read the ledger once: done markers, totals, per-block confidence."""
    return LedgerFacts(done=ledger.done_mask(), totals=ledger.totals(), block_conf=ledger.confidence_grid())


def below(hist: np.ndarray[Any, Any], threshold: float) -> F64:
    """Counts under ``threshold`` from 10-bin histograms (..., 10); linear within the cut bin."""
    pos = threshold * CONF_BINS
    full = int(math.floor(pos + 1e-9))
    below = hist[..., :full].sum(axis=-1)
    part = pos - full
    if full < CONF_BINS and part > 1e-9:
        below = below + part * hist[..., full]
    return np.asarray(below, dtype=np.float64)


#: (CONF_BINS,) centres of the confidence bins.
CENTRES = (np.arange(CONF_BINS) + 0.5) / CONF_BINS
