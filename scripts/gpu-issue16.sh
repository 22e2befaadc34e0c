#!/usr/bin/env bash
# Issue 16's device call: the GPU tests of the kernel plugins (in parallel, which also warms Triton's cache), the block
# table (before/after in one process, grouped_mm + PEFT beside it), the per-kernel profile, then the end-to-end bench.
# Each step under its own limit; a short table last. Run from the repo root with host and the plugins
# importable (device README: wheels in /tmp/site, scripts/gpu-entry-points.sh, PYTHONPATH with the plugin folders).
# TRACE_S: trace_step.py (each kernel's host launch against its GPU start, TRACE_SHAPE, TRACE_IMPLS).
# WSGEMM_S: bench_gemm.py --ws (the warp-specialised tile per launch, WSGEMM_SHAPES).
# Budget: on a fresh machine the block table takes ~200 s and every test file starts with cold Triton compiles (the
# test files run in parallel under TESTS_S each); 0 skips a step.
# A call returns at most 8 files: the logs go to $OUT/logs and come back as logs.tgz.
set -uo pipefail
# scripts/gpu-issue16.env (untracked, optional): settings that replace the ones the call was started with.
[ -f scripts/gpu-issue16.env ] && . scripts/gpu-issue16.env
RESULTS=${OUT:-/tmp/gpu-issue16}; OUT=$RESULTS/logs; mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
B=plugins/scattermoe/bench
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/device.txt"
step() {  # name, seconds (0 skips the step), command...
  local name=$1 limit=$2; shift 2
  [ "$limit" = 0 ] && return
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$?" >> "$OUT/summary.txt"
}
suite() {  # name, seconds, pytest args...: runs in the background (one process per test file, see below)
  local name=$1 limit=$2; shift 2
  ( timeout "$limit" env ${TESTS_ENV:-} python3 -m pytest -q -p no:cacheprovider --import-mode=importlib "$@" > "$OUT/$name.log" 2>&1
    echo "$name rc=$? $(grep -E '[0-9]+ (passed|failed|skipped)' "$OUT/$name.log" | tail -1)" >> "$OUT/summary.txt" ) &
}
# Extra diagnostics (DIAG="cmd1;cmd2", each a shell command run in the background beside the tests).
if [ -n "${DIAG:-}" ]; then
  n=0; IFS=';' read -ra cmds <<< "$DIAG"
  for c in "${cmds[@]}"; do n=$((n + 1)); ( timeout "${DIAG_S:-240}" bash -c "$c" > "$OUT/diag$n.log" 2>&1; echo "diag$n rc=$?" >> "$OUT/summary.txt" ) & done
fi
# Every test file of the two kernel plugins (on a GPU they run the compiled kernels), one process each, all at once:
# a cold start is Triton compiles (CPU-bound, one core per process), so they overlap on the machine's 16 cores.
# SHARDS=n splits each file's tests over n processes (a long file's cold compiles then spread over cores, and a CUDA
# error that poisons a process's context only fails its own shard).
if [ "${TESTS_S:-240}" != 0 ]; then
  for f in ${TEST_FILES:-plugins/scattermoe/tests/test_*.py plugins/mxfp4/tests/test_*.py}; do
    if [ "${SHARDS:-1}" -gt 1 ]; then
      python3 -m pytest -q -p no:cacheprovider --import-mode=importlib --collect-only "$f" 2>/dev/null | grep '::' > "$OUT/ids"
      for i in $(seq 0 $((SHARDS - 1))); do
        mapfile -t ids < <(awk -v n="$SHARDS" -v i="$i" 'NR % n == i' "$OUT/ids")
        [ ${#ids[@]} -gt 0 ] && suite "$(basename "$f" .py).$i" "${TESTS_S:-240}" "${ids[@]}"
      done
    else
      suite "$(basename "$f" .py)" "${TESTS_S:-240}" "$f"
    fi
  done
fi
wait
# PATHS_S: bench_gemm.py --paths (LoRA fused/split/none, persistent grids, gather-first TMA per launch, PATHS_SHAPES),
# its compiles first in 8 parallel processes
if [ "${PATHS_S:-0}" != 0 ]; then
  for i in 0 1 2 3 4 5 6 7; do
    timeout "$PATHS_S" python3 $B/bench_gemm.py --paths --shapes ${PATHS_SHAPES:-Qwen3-30B-A3B} --part $i/8 --compile-only \
      > "$OUT/paths_compile$i.log" 2>&1 &
  done
  wait
fi
step bench_gemm_paths "${PATHS_S:-0}" python3 $B/bench_gemm.py --paths --shapes ${PATHS_SHAPES:-Qwen3-30B-A3B} \
  --json "$OUT/bench_gemm_paths.json"
step bench_moe_block "${BLOCK_S:-230}" python3 $B/bench_moe_block.py --iters 20 ${BLOCK_SHAPES:+--shapes $BLOCK_SHAPES} \
  --impls ${BLOCK_IMPLS:-grouped_mm scattermoe scattermoe+before} --json "$OUT/bench_moe_block.json"
step bench_moe_block2 "${BLOCK2_S:-0}" python3 $B/bench_moe_block.py --iters 20 --shapes ${BLOCK2_SHAPES:-gpt-oss-20b} \
  --impls ${BLOCK2_IMPLS:-scattermoe scattermoe+unmerged} --json "$OUT/bench_moe_block2.json"
step trace "${TRACE_S:-0}" python3 $B/trace_step.py --shape ${TRACE_SHAPE:-Qwen3-30B-A3B} \
  --impls ${TRACE_IMPLS:-scattermoe scattermoe+graph} --out "$OUT"
step profile "${PROFILE_S:-30}" python3 $B/profile_block.py Qwen3-30B-A3B
step host_overhead "${HOST_S:-0}" python3 $B/host_overhead.py --json "$OUT/host_overhead.json"
step cprofile "${HOST_S:-0}" python3 $B/diagnose_gap.py --impls scattermoe --iters 20 --cprofile
step e2e "${E2E_S:-90}" python3 $B/bench_e2e_train.py --steps 10 --work /tmp/e2e \
  --runs ${E2E_RUNS:-grouped_mm+peft scattermoe scattermoe+graph} --repeats ${E2E_REPEATS:-1}
step bench_mxfp4 "${MXBENCH_S:-0}" python3 plugins/mxfp4/bench/bench_mxfp4.py ${MXBENCH_ARGS:---skip-fused --skip-load} \
  --shapes ${MXBENCH_SHAPES:-Qwen3-30B-A3B,Qwen3.5-35B-A3B}
step probe_dot_scaled "${PROBE_S:-0}" python3 plugins/mxfp4/bench/probe_dot_scaled.py
step bench_gemm_glu "${GEMM_S:-0}" python3 $B/bench_gemm.py --glu --shapes Qwen3-30B-A3B Qwen3.5-35B-A3B OLMoE-1B-7B \
  --json "$OUT/bench_gemm_glu.json"
step bench_gemm_ws "${WSGEMM_S:-0}" python3 $B/bench_gemm.py --ws --shapes ${WSGEMM_SHAPES:-Qwen3-30B-A3B Qwen3.5-35B-A3B} \
  --json "$OUT/bench_gemm_ws.json"
cat "$OUT/device.txt"
grep -A 12 "^device" "$OUT/trace.log" 2>/dev/null
sed -n '/per launch: best variant/,$p' "$OUT/bench_gemm_paths.log" 2>/dev/null
grep -A 40 "^device" "$OUT/bench_moe_block.log" | cut -c1-128
grep -A 12 "^device" "$OUT/bench_moe_block2.log" | cut -c1-128
grep -A 5 "up projection (rule tiles)" "$OUT/bench_gemm_glu.log"
grep -E "(down fwd|up dX) +(rule|ws)" "$OUT/bench_gemm_ws.log" 2>/dev/null | cut -c1-80
grep -E "total|_s2s|outer|silu|combine|sort|copy|topk" "$OUT/profile.log" | head -14 | cut -c1-110
sed -n '/^run /,/^$/p' "$OUT/e2e.log" 2>/dev/null | grep -v "^speed-up" | cut -c1-100
grep "^speed-up" "$OUT/e2e.log" 2>/dev/null | awk '!seen[$0]++'; grep -A 8 "alternating passes" "$OUT/e2e.log" 2>/dev/null
grep -E "^\| (Qwen|gpt).*(scattermoe bf16|auto|grouped|B \(fused)" "$OUT/bench_mxfp4.log" 2>/dev/null | cut -c1-110
grep -E "^\| Qwen" "$OUT/probe_dot_scaled.log" 2>/dev/null | grep -E "bf16|decode" | cut -c1-110
cat "$OUT/summary.txt"; grep -hE "^(FAILED|ERROR)" "$OUT"/test_*.log | cut -c1-220 | head -30
tar -czf "$RESULTS/logs.tgz" -C "$RESULTS" logs && rm -rf "$OUT"
