"""Ingest: a reconstruction in any supported format -> a studios OME-Zarr scan."""

from pipeline.core.stage import callable_stage
from pipeline.ingest.run import IngestResult, ingest, ingest_array

__all__ = ["IngestResult", "ingest", "ingest_array"]

callable_stage(__name__, ingest)
