#!/usr/bin/env bash
# The GPU check, in one call (run it on a machine with an NVIDIA GPU and CuPy installed):
#   1. the test suite on the GPU backend (MINILLM_DEVICE=gpu), minus notebooks and mpirun jobs;
#   2. a GPT-2-small-shaped training step (12 layers, 768 wide, block 1024) in fp32 and fp16,
#      minillm on CuPy next to PyTorch eager, printed as a table last.
# Budget: under 8 minutes on one H100/H200. Results go to $OUT (or ./gpu_check_out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__)" | tee -a "$OUT/gpu.txt"

echo "== 1. tests on the GPU backend"
MINILLM_DEVICE=gpu timeout 240 $PY -m pytest -q -x -p no:cacheprovider -m "not notebook and not mpi and not cpu_only" \
  --timeout 120 tests 2>&1 | tee "$OUT/tests.log" | tail -25

echo "== 2. GPT-2-small-shaped benchmark"
timeout 300 $PY scripts/bench_gpu.py --out "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench.log"
