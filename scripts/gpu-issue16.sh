#!/usr/bin/env bash
# Issue 16's device call: the block table (this pass's before/after in one process, grouped_mm + PEFT beside it), the
# per-kernel profile, the GPU tests of the kernel plugins, then the end-to-end bench. Each step under its own limit,
# results first in the order they matter; a short table last. Run from the repo root with host and the plugins
# importable (device README: wheels in /tmp/site, scripts/gpu-entry-points.sh, PYTHONPATH with the plugin folders).
# Budget: on a fresh machine the block table takes ~200 s and every test file starts with cold Triton compiles (the
# 2026-12-06 call gave the three test steps 80/110/45 s and none printed a result): allow ~600 s in all, or run the
# tests alone (BLOCK_S=0 PROFILE_S=0 E2E_S=0) in a call of their own.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-issue16}; mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
B=plugins/scattermoe/bench
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/device.txt"
step() {  # name, seconds (0 skips the step), command...
  local name=$1 limit=$2; shift 2
  [ "$limit" = 0 ] && return
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$?" >> "$OUT/summary.txt"
}
step bench_moe_block "${BLOCK_S:-230}" python3 $B/bench_moe_block.py --iters 20 --impls grouped_mm scattermoe scattermoe+before \
  --json "$OUT/bench_moe_block.json"
step profile "${PROFILE_S:-30}" python3 $B/profile_block.py Qwen3-30B-A3B
suite() {  # name, seconds, pytest args...
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -m pytest -q -p no:cacheprovider --import-mode=importlib "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? $(grep -E '[0-9]+ (passed|failed)' "$OUT/$name.log" | tail -1)" >> "$OUT/summary.txt"
}
T=plugins/scattermoe/tests
suite tests_new "${NEW_S:-150}" $T/test_scattermoe_light_tail.py $T/test_scattermoe_relayout.py $T/test_scattermoe_routing.py \
  $T/test_scattermoe_gpu.py -k "cuda or gpu or light or relayout or routing"
suite tests_scattermoe "${SCATTERMOE_S:-180}" $T/test_scattermoe_gpu.py $T/test_scattermoe_graphs.py $T/test_scattermoe_merged.py
suite tests_mxfp4 "${MXFP4_S:-90}" plugins/mxfp4/tests/test_mxfp4_gpu.py
step e2e "${E2E_S:-90}" python3 $B/bench_e2e_train.py --steps 10 --work "$OUT/e2e"
cat "$OUT/device.txt"
grep -A 18 "^device" "$OUT/bench_moe_block.log" | cut -c1-128
grep -E "total|_s2s|outer|silu|combine|sort|copy|topk" "$OUT/profile.log" | head -14 | cut -c1-110
grep -A 4 "^run" "$OUT/e2e.log" | cut -c1-100; grep "^speed-up" "$OUT/e2e.log"
cat "$OUT/summary.txt"
