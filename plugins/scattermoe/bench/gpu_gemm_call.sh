#!/usr/bin/env bash
# One device call for the persistent-grid pass (issue 16): per-launch GEMM timings (current rule vs the persistent
# grid, and torch._grouped_mm without LoRA), the block step with the persistent grid off/on, and the GPU kernel tests.
# Run from plugins/scattermoe with the plugin importable; logs and JSON into $OUT. Usage: bash bench/gpu_gemm_call.sh
set -u
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1
GEMM_SHAPES=${GEMM_SHAPES:-"Qwen3-30B-A3B gpt-oss-20b Mixtral-8x7B Qwen3.5-35B-A3B"}
BLOCK_SHAPES=${BLOCK_SHAPES:-"Qwen3-30B-A3B gpt-oss-20b Mixtral-8x7B"}
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader | tee "$OUT/gpu.txt"
t0=$(date +%s)
P=8  # fill Triton's cache in parallel (the compiles dominate a cold run)
for i in $(seq 0 $((P - 1))); do
  timeout 90 python3 bench/bench_gemm.py --persist --shapes $GEMM_SHAPES --part $i/$P --compile-only >"$OUT/compile.$i" 2>&1 &
done
wait
cat "$OUT"/compile.* >"$OUT/compile.log"; rm -f "$OUT"/compile.[0-9]*
echo "compiles: $(($(date +%s) - t0)) s"
timeout 100 python3 bench/bench_gemm.py --persist --shapes $GEMM_SHAPES --json "$OUT/bench_gemm.json" >"$OUT/bench_gemm.log" 2>&1
echo "bench_gemm rc=$? at $(($(date +%s) - t0)) s"
timeout 110 python3 -m pytest -q -p no:cacheprovider --import-mode=importlib tests/test_scattermoe_gpu.py \
  -k "(persistent or half) and (qwen3-30b or gpt-oss)" >"$OUT/pytest.log" 2>&1
echo "pytest rc=$? at $(($(date +%s) - t0)) s"
timeout 200 python3 bench/bench_moe_block.py --iters 20 --shapes $BLOCK_SHAPES \
  --impls grouped_mm scattermoe scattermoe+persist scattermoe+half --json "$OUT/bench_moe_block.json" >"$OUT/bench_moe_block.log" 2>&1
echo "bench_moe_block rc=$? at $(($(date +%s) - t0)) s"
tail -3 "$OUT/pytest.log"
sed -n '/per launch: best variant/,$p' "$OUT/bench_gemm.log"
grep -v '^{' "$OUT/bench_moe_block.log" | tail -14
