#!/usr/bin/env bash
# One GPU session for mxfp4 (repo root; PYTHONPATH = host + scattermoe + mxfp4): the GPU tests
# (A bitwise, B within bf16 tolerance vs scattermoe on the dequantized weights), then the benchmark.
set -uo pipefail
OUT=${OUT:-/tmp/mxfp4_out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout "${MXFP4_TEST_TIMEOUT:-100}" python3 -m pytest -q -p no:cacheprovider -p host.testing --import-mode=importlib \
  plugins/mxfp4/tests/test_mxfp4_gpu.py --tb=short > "$OUT/pytest_mxfp4.log" 2>&1
echo "mxfp4 pytest rc=$?"; grep -E "passed|failed|Error|assert" "$OUT/pytest_mxfp4.log" | tail -8
timeout "${MXFP4_BENCH_TIMEOUT:-300}" python3 plugins/mxfp4/bench/bench_mxfp4.py --isolate --iters 5 > "$OUT/bench_mxfp4.log" 2>&1
echo "mxfp4 bench rc=$?"; grep -E "^\||^- " "$OUT/bench_mxfp4.log" | tail -30
