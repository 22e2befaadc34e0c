#!/usr/bin/env bash
# One device run for the persistent-grid / half-tail pass (issue 16): per-launch GEMM timings (current rule vs the
# half-height tail tiles vs the persistent grid, and torch._grouped_mm without LoRA), the GPU kernel tests of the new
# launches, and the block step with each option on. Run from plugins/scattermoe with the plugin importable.
# Usage: bash bench/gpu_gemm_call.sh OUTDIR   (writes OUTDIR/gemm.log, bench_gemm.json, bench_moe_block.json)
set -u
D=${1:-${OUT:-/tmp/out}}
mkdir -p "$D"
export PYTHONUNBUFFERED=1
GEMM_SHAPES=${GEMM_SHAPES:-"Qwen3-30B-A3B gpt-oss-20b Mixtral-8x7B Qwen3.5-35B-A3B"}
BLOCK_SHAPES=${BLOCK_SHAPES:-"Qwen3-30B-A3B Mixtral-8x7B gpt-oss-20b OLMoE-1B-7B"}
LOG="$D/gemm.log"
T=/tmp/gemm-run; mkdir -p $T
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader | tee -a "$LOG"
t0=$(date +%s)
P=8  # fill Triton's cache in parallel (the compiles dominate a cold run)
for i in $(seq 0 $((P - 1))); do
  timeout ${COMPILE_S:-45} python3 bench/bench_gemm.py --persist --shapes $GEMM_SHAPES --part $i/$P --compile-only \
    >"$T/compile.$i" 2>&1 &
done
wait
echo "== compiles: $(($(date +%s) - t0)) s" | tee -a "$LOG"; grep -h -i "fail\|error" $T/compile.* | head -5 >>"$LOG"
timeout ${GEMM_S:-60} python3 bench/bench_gemm.py --persist --shapes $GEMM_SHAPES --json "$D/bench_gemm.json" >"$T/gemm" 2>&1
echo "== bench_gemm rc=$? at $(($(date +%s) - t0)) s" | tee -a "$LOG"; cat "$T/gemm" >>"$LOG"
timeout ${TEST_S:-60} python3 -m pytest -q -p no:cacheprovider --import-mode=importlib tests/test_scattermoe_gpu.py \
  -k "(persistent or half) and not persistent-half and (qwen3-30b or gpt-oss)" >"$T/pytest" 2>&1
echo "== pytest rc=$? at $(($(date +%s) - t0)) s" | tee -a "$LOG"; tail -15 "$T/pytest" >>"$LOG"
BLOCK_S=$(( ${TOTAL_S:-235} - ($(date +%s) - t0) ))  # what is left of the slot (rows print as they finish)
[ "$BLOCK_S" -ge 20 ] || BLOCK_S=1
timeout $BLOCK_S python3 bench/bench_moe_block.py --iters 20 --shapes $BLOCK_SHAPES \
  --impls grouped_mm scattermoe scattermoe+persist scattermoe+half --json "$D/bench_moe_block.json" >"$T/block" 2>&1
echo "== bench_moe_block rc=$? at $(($(date +%s) - t0)) s" | tee -a "$LOG"; cat "$T/block" >>"$LOG"
echo "== summary (gemm)"; tail -3 "$T/pytest"
sed -n '/per launch: best variant/,$p' "$T/gemm"
grep '^{' "$T/block" | python3 -c "
import json, sys
for l in sys.stdin:
    r = json.loads(l); e = r.get('err'); e = f'{e:.1e}' if e else '-'
    print(f\"{r['shape']:<16}{r['impl']:<20} ms {r['ms']:.2f} gpu {r['gpu']:.2f} host {r['host']:.2f} GiB {r['gib']:.2f} cold {r['cold_s']:.1f} err {e}\")"
