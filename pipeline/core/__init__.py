"""Pure building blocks: geometry (Box), tiling (Block, plan_blocks), errors, progress,
configuration parsing, global normalisation and scores. Imports numpy and the standard
library only (no torch, zarr, Dask or Prefect).
"""
