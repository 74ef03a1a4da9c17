#!/usr/bin/env bash
# The GPU check, prepared to run as one command on a machine with one CUDA GPU (< 8 minutes):
#   1. exactness: blockwise == whole volume, fp32, exact mode, deterministic kernels (on the GPU);
#   2. throughput of segment() in fp32 / bf16 / fp16 at 512^3 and 1024^3 through the dask-cuda
#      cluster (cluster kind cuda), with the auto block size and the workers' GPU memory peak;
#   3. one table (bench/gpu_check.py prints it; a GPU_CHECK_JSON line repeats it for tools).
#
# Usage: bench/gpu_check.sh [extra bench/gpu_check.py options, e.g. --size 512]
# Environment: PYTHON (default: .venv/bin/python if present, else python3).
# Needs torch with CUDA, dask-cuda and this project's dependencies (docs/gpu.md: offline wheels).
# Exit status: 0 all passed, 1 a check failed, 2 no GPU / missing dependency, 124 over time.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"
"$PYTHON" - <<'PY' || exit 2
import sys
try:
    import torch
except ImportError:
    sys.exit("gpu_check: torch is not importable with this Python")
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device")
missing = []
for name in ("dask", "distributed", "zarr", "numcodecs", "dask_cuda", "pipeline"):
    try:
        __import__(name)
    except Exception as exc:
        missing.append(f"{name} ({type(exc).__name__}: {exc})")
if missing:
    sys.exit("gpu_check: missing " + "; ".join(missing) + " -- see docs/gpu.md")
print(f"gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
PY
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader 2>/dev/null || true
# 470 s hard limit; the helper starts no run after 400 s, so the table prints inside the limit
exec timeout --signal=INT --kill-after=20 470 "$PYTHON" bench/gpu_check.py --device cuda --size 512 1024 \
    --budget-s 400 "$@"
