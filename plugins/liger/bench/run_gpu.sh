#!/usr/bin/env bash
# One device call: the GPU correctness check, then the training benchmark. Needs host, plugins/liger (with
# liger-kernel) and plugins/scattermoe installed; run from the repo root. Logs and JSON go to $OUT. Each check
# case compiles (and for liger's MoE experts autotunes) its kernels once: the first case took 18 s on an H200,
# so the whole list needs minutes (CHECK_S); the benchmark took ~90 s (BENCH_S).
set -uo pipefail
OUT=${OUT:-/tmp/liger-out}; mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
timeout "${CHECK_S:-300}" python3 plugins/liger/bench/gpu_check.py --out "$OUT" 2>&1 | grep -v Warning | tee "$OUT/gpu_check.log" | grep -vE "Loading weights|Writing model"
timeout "${BENCH_S:-240}" python3 plugins/liger/bench/bench_liger.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | grep -E "^\{|^[a-z]|^NVIDIA|^loss head|Error|error" | grep -v Warning
