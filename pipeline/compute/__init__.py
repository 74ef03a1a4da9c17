"""Where blocks run: executors (serial, Dask), clusters (local, existing scheduler, SLURM, CUDA)."""
