#!/usr/bin/env bash
# Issue 16: does a newer Triton (3.9) run Hopper warp specialisation, and what does it do to the block's GEMMs?
# The device image has Triton 3.6, whose Hopper warp-specialisation pass hangs every launch (eighth session,
# bench/probe_ws.py). Triton 3.9's wheel is 286 MB, over a device call's 64 MiB. It travels as .triton39/triton39.tar.xz
# (50 MiB, ignored through .git/info/exclude): the wheel unzipped; libtriton.so stripped of debug info (500 → 235 MB);
# the AMD backend, CUPTI, proton, instrumentation, ptxas-blackwell, cuobjdump and nvdisasm dropped (ptxas 12.9 kept);
# then `tar cf - . | xz -T2 -9 --x86 --lzma2=preset=9e,dict=192MiB`. It unpacks into /tmp/t39, ahead of the image's
# Triton on PYTHONPATH for the steps below only. Run from the repo root after the device README's wheel install
# (PYTHONPATH with /tmp/site and the plugin folders), carrying .whl and .triton39.
# Steps (seconds each, 0 skips): PROBE39_S probe_ws.py; WSG39_S probe_ws_grouped.py (WSG_SHAPES) under 3.9, WSG36_S
# under 3.6 (its persistent variants: WSG36_VARIANTS); GEMM39_S bench_gemm.py --ws (GEMM39_SHAPES);
# BLOCK39_S bench_moe_block.py under 3.9 (BLOCK39_SHAPES, BLOCK39_IMPLS); BLOCK36_S the same under the image's 3.6.
set -uo pipefail
[ -f scripts/gpu-triton39.env ] && . scripts/gpu-triton39.env
RESULTS=${OUT:-/tmp/gpu-triton39}; OUT=$RESULTS/logs; mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
B=plugins/scattermoe/bench
if [ ! -d /tmp/t39/triton/backends/amd ]; then rm -rf /tmp/t39; fi
if [ ! -d /tmp/t39/triton ]; then
  mkdir -p /tmp/t39 && { xz -dc .triton39/triton39.tar.xz | tar x -C /tmp/t39 && tar xJf .triton39/amd.tar.xz -C /tmp/t39; } || exit 4
fi
P39=/tmp/t39:$PYTHONPATH
# Triton 3.9 takes ptxas-blackwell (CUDA 13.4, 52 MB, not carried) for sm_90 and newer: point it at the 12.9 ptxas
export TRITON_PTXAS_BLACKWELL_PATH=/tmp/t39/triton/backends/nvidia/bin/ptxas
step() {  # name, seconds (0 skips), command...
  local name=$1 limit=$2; shift 2
  [ "$limit" = 0 ] && return
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$?" >> "$OUT/summary.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
PYTHONPATH=$P39 python3 -c "import triton, torch; print('triton', triton.__version__, triton.__file__, 'torch', torch.__version__)"
step probe39 "${PROBE39_S:-150}" env PYTHONPATH=$P39 python3 $B/probe_ws.py --timeout 40 --json "$OUT/probe39.json"
step wsg39 "${WSG39_S:-180}" env PYTHONPATH=$P39 python3 $B/probe_ws_grouped.py --shapes ${WSG_SHAPES:-Qwen3-30B-A3B} \
  --json "$OUT/wsg39.json"
step wsg36 "${WSG36_S:-0}" python3 $B/probe_ws_grouped.py --shapes ${WSG_SHAPES:-Qwen3-30B-A3B} \
  --variants ${WSG36_VARIANTS:-persist} --json "$OUT/wsg36.json"
step gemm39 "${GEMM39_S:-0}" env PYTHONPATH=$P39 SCATTERMOE_WS=1 python3 $B/bench_gemm.py --ws \
  --shapes ${GEMM39_SHAPES:-Qwen3-30B-A3B} --json "$OUT/gemm39.json"
step block39 "${BLOCK39_S:-0}" env PYTHONPATH=$P39 python3 $B/bench_moe_block.py --iters 20 \
  --shapes ${BLOCK39_SHAPES:-Qwen3-30B-A3B} --impls ${BLOCK39_IMPLS:-scattermoe scattermoe+ws} --json "$OUT/block39.json"
step block36 "${BLOCK36_S:-0}" python3 $B/bench_moe_block.py --iters 20 \
  --shapes ${BLOCK36_SHAPES:-Qwen3-30B-A3B} --impls ${BLOCK36_IMPLS:-scattermoe} --json "$OUT/block36.json"
cat "$OUT/summary.txt"
tail -25 "$OUT/probe39.log" 2>/dev/null | cut -c1-200
grep -iE "error" "$OUT/wsg39.log" 2>/dev/null | head -5 | cut -c1-250
sed -n '/^shape/,$p' "$OUT/wsg39.log" 2>/dev/null
sed -n '/^shape/,$p' "$OUT/wsg36.log" 2>/dev/null
grep -iE "error|hang|Traceback" "$OUT/gemm39.log" 2>/dev/null | head -5 | cut -c1-250
tail -22 "$OUT/gemm39.log" 2>/dev/null | cut -c1-150
grep -iE "failed|Error" "$OUT/block39.log" 2>/dev/null | head -5 | cut -c1-250
grep -A 8 "^device" "$OUT/block39.log" 2>/dev/null | cut -c1-128
grep -A 8 "^device" "$OUT/block36.log" 2>/dev/null | cut -c1-128
tar -czf "$RESULTS/logs.tgz" -C "$RESULTS" logs && rm -rf "$OUT"
