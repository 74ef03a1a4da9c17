"""Storage: reconstruction readers (sources), the OME-Zarr store (padded box reads, box writes),
safe outputs (atomic writes, locks) and model bundles."""
