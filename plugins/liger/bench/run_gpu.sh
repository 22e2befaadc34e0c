#!/usr/bin/env bash
# One device call: the training benchmark (with a torch.profiler window on the variants in PROFILE), then the
# real-width GPU correctness check. Needs host, plugins/liger (with liger-kernel) and plugins/scattermoe
# importable; run from the repo root. Logs and JSON go to $OUT. Budgets: BENCH_S for the benchmark (~90 s for
# the full variant list on an H200), CHECK_S for the check (~30-40 s per real-width case: build, save, three
# loads and one forward+backward each, Triton compiles).
set -uo pipefail
OUT=${OUT:-/tmp/liger-out}; mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
B=plugins/liger/bench
if [ -n "${VARIANTS:-}" ]; then
  timeout "${BENCH_S:-240}" python3 $B/bench_liger.py --out "$OUT" --variants "$VARIANTS" --profile "${PROFILE:-}" \
    ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | grep -E "^\{|^[a-z]|^  |^NVIDIA|^loss head|Error|error" | grep -v Warning
fi
if [ -n "${REAL:-}${TINY:-}" ]; then
  timeout "${CHECK_S:-300}" python3 $B/gpu_check.py --out "$OUT" --real "${REAL:-}" --tiny "${TINY:-}" 2>&1 \
    | grep -v Warning | tee "$OUT/gpu_check.log" | grep -vE "Loading weights|Writing model|^\{"
fi
