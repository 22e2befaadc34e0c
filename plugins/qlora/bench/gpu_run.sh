#!/usr/bin/env bash
# One GPU session for qlora (run from the repo root with host + qlora installed): the benchmark
# first (the number the issue asks for), then the plugin's GPU tests. Logs and JSON go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/qlora_out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout "${QLORA_BENCH_TIMEOUT:-90}" python3 plugins/qlora/bench/bench_qlora.py ${QLORA_BENCH_ARGS:-} > "$OUT/bench_qlora.log" 2>&1
echo "bench rc=$?"; grep -E "^\||^\{|^NVIDIA|wrote|Error|error" "$OUT/bench_qlora.log" | tail -20
cp plugins/qlora/bench/results/*.json "$OUT/" 2>/dev/null
timeout "${QLORA_TEST_TIMEOUT:-45}" python3 -m pytest -q -p no:cacheprovider --import-mode=importlib \
  plugins/qlora/tests/test_qlora_gpu.py --tb=short > "$OUT/pytest_qlora_gpu.log" 2>&1
echo "pytest rc=$?"; grep -E "passed|failed|Error|assert" "$OUT/pytest_qlora_gpu.log" | tail -8
