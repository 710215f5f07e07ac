#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one run: every test marked `gpu` with the Triton kernels compiled
# (TRITON_INTERPRET=0: the int8 tile, the LSH rows without an allowed key, the CUDA integer matmul, the GPU
# dropout resume), then the attention benchmark. Copy what it prints into RESULTS.md with the GPU named.
# Usage: bash benchmarks/gpu_check.sh   (after `make install`; PY=... picks another interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
TRITON_INTERPRET=0 "$PY" -m pytest -m gpu -q -rs tests/
"$PY" benchmarks/attention.py
