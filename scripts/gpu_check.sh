#!/usr/bin/env bash
# The GPU check, in one call, for a fresh GPU machine without network (an image with Python 3.12,
# cupy-cuda13x 14.x, torch, h5py, ml_dtypes and mpi4py, but no MPI runtime and no pytest):
#
#   0. install the wheels brought along in .gpu_wheels/ (no network) and find mpirun;
#   1. the fused-kernel tests (tests/test_kernels.py), then the GPU test subset with
#      MINILLM_DEVICE=gpu (no -x: every failure is listed);
#   2. `mpirun -np 2 ... --parallel.dp=2` with both ranks sharing the one GPU (MPI staging through
#      pinned host buffers) against the serial GPU run: every logged loss and grad norm;
#   3. scripts/bench_gpu.py: the GPT-2-small-shaped step (12 layers, 768 wide, block 1024) in
#      float32, bfloat16 and float16, minillm next to PyTorch eager (tokens/s, MFU, peak memory).
#
# Everything ends in one table, $OUT/summary.md (OUT defaults to gpu_check_out/), printed last.
# Budget: under 6 minutes on one H100/H200 (each part has its own time limit).
#
# Before (on a machine with network), put the wheels the image lacks into the gitignored folder
# .gpu_wheels/, which the device tool carries along (`carry: [".gpu_wheels"]`):
#   pip download mpich pytest pytest-timeout --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_28_x86_64 -d .gpu_wheels      (MPICH 5 wheels need glibc >= 2.28)
#
# scripts/gpu_check.sh --dry-run runs the same steps on this CPU with the tests' fake CuPy and tiny
# sizes: it checks the script (installation, invocations, comparisons, table), not the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
: > "$OUT/gpu.txt"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OPENBLAS_NUM_THREADS=1
if [ $DRY = 1 ]; then
  PY=${PYTHON:-.venv/bin/python}
  export PYTHONPATH="$PWD/tests/fake_cupy:$PYTHONPATH" MINILLM_KERNELS=0
fi
SUMMARY="$OUT/summary.md"
T0=$(date +%s)

echo "== 0. setup"
if ls .gpu_wheels/*.whl >/dev/null 2>&1; then
  WHEELS=(--no-index --find-links .gpu_wheels mpich pytest pytest-timeout)
  $PY -m pip install -q "${WHEELS[@]}" 2>/dev/null \
    || $PY -m pip install -q --user --break-system-packages "${WHEELS[@]}" 2>&1 | tail -2
fi
export PATH="$(dirname "$($PY -c 'import sys; print(sys.executable)')"):$HOME/.local/bin:$PATH"
MPIRUN=$(command -v mpirun || true)
if [ $DRY = 0 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
fi
$PY -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__)" | tee -a "$OUT/gpu.txt"
TIMEOUT_ARG=$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout=90")

echo "== 1. tests on the GPU backend"
if [ $DRY = 1 ]; then
  SUBSET=(tests/test_gpu_fake.py -k "refuses or precedence or half_matmul")
  KERNEL_TESTS=(tests/test_kernels.py -k "gelu and float64")
else
  SUBSET=(tests/test_ops.py tests/test_autograd.py tests/test_nn.py tests/test_model.py tests/test_optim.py
          tests/test_amp.py tests/test_backend.py tests/test_checkpoint.py tests/test_train.py
          tests/test_data_parallel.py tests/test_zero.py tests/test_pipeline.py
          --deselect tests/test_pipeline.py::test_timelines_and_plot -m "not notebook and not cpu_only")
  KERNEL_TESTS=(tests/test_kernels.py)
fi
MINILLM_DEVICE=gpu timeout 120 $PY -m pytest -q -rfE -p no:cacheprovider $TIMEOUT_ARG "${KERNEL_TESTS[@]}" \
  > "$OUT/kernel_tests.log" 2>&1
tail -3 "$OUT/kernel_tests.log"
MINILLM_DEVICE=gpu timeout 200 $PY -m pytest -q -rfE -p no:cacheprovider $TIMEOUT_ARG "${SUBSET[@]}" \
  > "$OUT/tests.log" 2>&1
tail -3 "$OUT/tests.log"

echo "== 2. dp=2 on one GPU (2 ranks) vs the serial GPU run"
STEPS=20
[ $DRY = 1 ] && STEPS=3
COMMON=(configs/tiny.toml --train.device=gpu "--train.max_steps=$STEPS" --train.log_interval=1
        --train.sample_tokens=0 --train.eval_iters=1 --parallel.bucket_mb=0.01 --data.dir="$OUT/data")
rm -rf "$OUT/serial" "$OUT/dp2"
timeout 60 $PY -m minillm train "${COMMON[@]}" --train.out_dir="$OUT/serial" > "$OUT/serial.log" 2>&1
if [ -n "$MPIRUN" ]; then
  timeout 90 "$MPIRUN" -np 2 $PY -m mpi4py -m minillm train "${COMMON[@]}" --parallel.dp=2 \
    --train.out_dir="$OUT/dp2" > "$OUT/dp2.log" 2>&1
  grep "^rank" "$OUT/dp2.log"
fi
DP_RESULT=$($PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def curve(run):
    f = out / run / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []
serial, dp = curve("serial"), curve("dp2")
if not serial or not dp or [r["step"] for r in serial] != [r["step"] for r in dp]:
    print(f"FAILED: runs incomplete (serial {len(serial)} steps, dp=2 {len(dp)} steps; see dp2.log)")
else:
    worst = max(max(abs(a[k] - b[k]) / abs(b[k]) for k in ("loss", "grad_norm")) for a, b in zip(dp, serial))
    verdict = "ok" if worst <= 1e-5 else "FAILED (> 1e-5)"
    print(f"{verdict}: {len(dp)} logged steps, largest relative difference {worst:.1e}")
EOF
)
echo "$DP_RESULT"

echo "== 3. GPT-2-small-shaped step: minillm vs PyTorch eager"
BENCH_ARGS=(--out "$OUT/bench_gpu.json")
[ $DRY = 1 ] && BENCH_ARGS+=(--dry-run)
timeout 170 $PY scripts/bench_gpu.py "${BENCH_ARGS[@]}" > "$OUT/bench.log" 2>&1
tail -5 "$OUT/bench.log"

summarize() {  # "N passed, M failed" and the failing tests of a pytest log
  local log=$1
  local counts
  counts=$(grep -E "^[0-9]+ (passed|failed|error)|^=+ .*(passed|failed|error)" "$log" | tail -1 | tr -d '=')
  echo "${counts:-no result (timed out? see $log)}"
  grep -E "^(FAILED|ERROR) " "$log" | sed 's/^/    /'
}
{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%MZ)$([ $DRY = 1 ] && echo ' (dry run on the fake CuPy)')"
  echo
  echo '```'
  cat "$OUT/gpu.txt"
  echo "kernel tests:        $(summarize "$OUT/kernel_tests.log")"
  echo "GPU test subset:     $(summarize "$OUT/tests.log")"
  echo "dp=2 on one GPU:     ${DP_RESULT}"
  echo
  $PY -c "import json, sys; sys.path.insert(0, 'scripts'); from bench_gpu import format_table; \
print(format_table(json.load(open('$OUT/bench_gpu.json'))))" 2>/dev/null || echo "bench: no result (see $OUT/bench.log)"
  echo "total: $(( $(date +%s) - T0 )) s"
  echo '```'
} > "$SUMMARY"
echo
cat "$SUMMARY"
