#!/usr/bin/env bash
# One GPU session for mxfp4 (repo root; PYTHONPATH = host + scattermoe + mxfp4), most important first:
# 1. the dequantize tile sweep (kernel bandwidth before/after; its best tiles feed the bench),
# 2. the experts-layer bench at the issue-16 shapes (scattermoe bf16 and grouped_mm + PEFT in the same run),
# 3. the GPU tests (A bitwise and B within bf16 tolerance vs scattermoe on the dequantized weights),
# 4. with PROBE=1, the dot_scaled probe (can a decode-in-the-GEMM forward reach bf16 speed? informational).
# Each step has its own timeout (T_SWEEP, T_BENCH, T_TEST, T_PROBE seconds); logs and JSON under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/mxfp4_out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
B=plugins/mxfp4/bench
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ "${SWEEP:-1}" = 1 ]; then  # SWEEP=0: the library's DEQUANT_TILES as they are
  timeout "${T_SWEEP:-50}" python3 $B/sweep_dequant.py > "$OUT/sweep.log" 2>&1
  echo "sweep rc=$?"
fi
timeout "${T_BENCH:-160}" python3 $B/bench_mxfp4.py --shapes "${SHAPES:-Qwen3-30B-A3B,Qwen3.5-35B-A3B}" --iters "${ITERS:-50}" \
  --skip-load --skip-fused --dequant-tiles "$OUT/sweep_dequant.json" > "$OUT/bench.log" 2>&1
echo "bench rc=$?"
timeout "${T_TEST:-100}" python3 -m pytest -q -p no:cacheprovider --import-mode=importlib \
  plugins/mxfp4/tests/test_mxfp4_gpu.py --tb=short > "$OUT/pytest.log" 2>&1
echo "pytest rc=$?"; grep -E "passed|failed|Error|assert" "$OUT/pytest.log" | tail -6
if [ "${PROBE:-0}" = 1 ]; then
  timeout "${T_PROBE:-45}" python3 $B/probe_dot_scaled.py > "$OUT/probe.log" 2>&1
  echo "probe rc=$?"
fi
[ -f "$OUT/sweep.log" ] && { echo "== sweep"; grep -E "^\||^best|^fastest|copy" "$OUT/sweep.log" | grep -v "^| ---" | tail -45; }
echo "== bench"; grep -E "^\||^- |^device" "$OUT/bench.log" | grep -v "^| ---" | grep -v "bitwise=True" | tail -30
[ -f "$OUT/probe.log" ] && { echo "== probe"; grep -E "^\||variant" "$OUT/probe.log" | grep -v "^| ---" | tail -24; }
exit 0
