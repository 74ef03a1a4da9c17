"""Pure building blocks: geometry (Box, AXES), tiling (Block, plan_blocks), errors, progress,
processes on this host (hosts), global normalisation and scores, and configuration: the
pydantic base (schema) and the run profiles (settings). Imports numpy, pydantic, PyYAML,
psutil and the standard library only (no torch, zarr, Dask or Prefect); settings also reads
the cluster spec (:mod:`pipeline.compute.cluster`) and the source suffixes
(:mod:`pipeline.io.sources`), which import none of those either.
"""
