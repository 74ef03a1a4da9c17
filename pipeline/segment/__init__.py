"""Blockwise segmentation: plan -> dispatch -> worker -> read -> predict -> trim -> write -> ledger."""

from pipeline.core.stage import callable_stage
from pipeline.segment.run import SegmentResult, segment, serial

__all__ = ["SegmentResult", "segment", "serial"]

callable_stage(__name__, segment)
