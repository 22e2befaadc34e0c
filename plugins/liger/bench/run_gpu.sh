#!/usr/bin/env bash
# One device call: GPU correctness check, then the training benchmark. Run from the repo root of a copy
# with liger-kernel's wheel in $WHL (see README "GPU"). Logs and JSON go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/liger-out}; mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
timeout "${CHECK_S:-90}" python3 plugins/liger/bench/gpu_check.py --out "$OUT" 2>&1 | grep -v Warning | tee "$OUT/gpu_check.log" | grep -vE "Loading weights|Writing model"
timeout "${BENCH_S:-170}" python3 plugins/liger/bench/bench_liger.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | grep -E "^\{|^[a-z]|^NVIDIA|^loss head|Error|error" | grep -v Warning
