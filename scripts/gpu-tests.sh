#!/usr/bin/env bash
# One device call after the last landing: the GPU-only tests of the kernel plugins on main's HEAD, each under a time
# limit, then a one-line table. Run from the repo root with host and the plugins importable (see the device README:
# .whl installed into /tmp/site, scripts/gpu-entry-points.sh, PYTHONPATH with the plugin folders).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-tests}; mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
suite() {  # name, seconds, pytest args...
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -m pytest -q -p no:cacheprovider --import-mode=importlib "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? $(grep -E '[0-9]+ (passed|failed)' "$OUT/$name.log" | tail -1)" | tee -a "$OUT/summary.txt"
}
suite scattermoe "${SCATTERMOE_S:-110}" plugins/scattermoe/tests/test_scattermoe_gpu.py plugins/scattermoe/tests/test_scattermoe_graphs.py \
  plugins/scattermoe/tests/test_scattermoe_merged.py
suite mxfp4 "${MXFP4_S:-90}" plugins/mxfp4/tests/test_mxfp4_gpu.py
if [ -n "${BENCH:-}" ]; then  # BENCH=1: the issue-16 block table (every shape, grouped_mm + PEFT in the same run) and the mxfp4 bench
  timeout "${BLOCK_S:-150}" python3 plugins/scattermoe/bench/bench_moe_block.py --iters 20 --impls grouped_mm scattermoe \
    --json "$OUT/bench_moe_block.json" > "$OUT/bench_moe_block.log" 2>&1
  echo "bench_moe_block rc=$?" | tee -a "$OUT/summary.txt"
  timeout "${MXFP4_BENCH_S:-60}" python3 plugins/mxfp4/bench/bench_mxfp4.py --shapes Qwen3-30B-A3B,Qwen3.5-35B-A3B --iters 3 \
    --skip-load --skip-fused > "$OUT/bench_mxfp4.log" 2>&1
  echo "bench_mxfp4 rc=$?" | tee -a "$OUT/summary.txt"
  grep -A 12 "^device" "$OUT/bench_moe_block.log" | cut -c1-140
  grep -E "^\| Qwen|ratio" "$OUT/bench_mxfp4.log" | cut -c1-150 | head -12
fi
cat "$OUT/summary.txt"
