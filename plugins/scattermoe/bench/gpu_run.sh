#!/usr/bin/env bash
# One GPU session: GPU tests (bf16 real shapes, int64 past 2**31, model-level bf16), then the block benchmark.
# Usage (repo root, PYTHONPATH set to host + this plugin): bash plugins/scattermoe/bench/gpu_run.sh [tests|bench|all] [bench args]
set -uo pipefail
OUT=${OUT:-/tmp/scattermoe_out}
mkdir -p "$OUT"
what=${1:-all}
shift || true
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"
if [ "$what" = all ] || [ "$what" = tests ]; then
  python3 -m pytest -q -p no:cacheprovider --import-mode=importlib plugins/scattermoe/tests -x --durations=15 \
    > "$OUT/pytest.log" 2>&1
  echo "pytest rc=$?"; tail -25 "$OUT/pytest.log"
fi
if [ "$what" = final ]; then  # issue 16, last call: block table, GPU tests, mxfp4 layer bench, end-to-end train
  python3 -m pip install -q --no-deps --no-build-isolation -e . -e plugins/scattermoe -e plugins/mxfp4 > /tmp/pip.log 2>&1 \
    || { echo "pip install -e failed"; tail -3 /tmp/pip.log; }
  timeout 80 python3 plugins/scattermoe/bench/bench_moe_block.py --iters 20 > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"; grep -A 24 "^device" "$OUT/bench.log" | cut -c1-140; grep failed "$OUT/bench.log" | cut -c1-200
  timeout 50 python3 -m pytest -q -p no:cacheprovider --import-mode=importlib \
    plugins/scattermoe/tests/test_scattermoe_gpu.py plugins/scattermoe/tests/test_scattermoe_models.py plugins/mxfp4/tests/test_mxfp4_gpu.py \
    -k "gpu or triton or int64 or real_shapes or dequant or selective or fused" > "$OUT/pytest.log" 2>&1
  echo "pytest rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/pytest.log" | tail -8
  timeout 35 python3 plugins/mxfp4/bench/bench_mxfp4.py --shapes Qwen3-30B-A3B --iters 3 --skip-load --skip-fused > "$OUT/mxfp4.log" 2>&1
  echo "mxfp4 rc=$?"; grep -E "^\| Qwen|^- " "$OUT/mxfp4.log" | cut -c1-150 | head -24
  timeout 60 python3 plugins/scattermoe/bench/bench_e2e_train.py --steps 10 --work /tmp/e2e > "$OUT/e2e.log" 2>&1
  echo "e2e rc=$?"; tail -6 "$OUT/e2e.log"
fi
if [ "$what" = rerun ]; then  # after kernel changes: GPU tests, GEMM breakdown, block bench
  timeout 170 python3 -m pytest -q -p no:cacheprovider -p host.testing --import-mode=importlib plugins/scattermoe/tests \
    -k "not forward_matches and not backward_dx and not full_finetune and not combine_forward" --durations=5 \
    > "$OUT/pytest.log" 2>&1
  echo "pytest rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/pytest.log" | tail -12
  timeout 60 python3 plugins/scattermoe/bench/bench_gemm.py > "$OUT/gemm.log" 2>&1
  echo "gemm rc=$?"; tail -22 "$OUT/gemm.log"
  timeout 280 python3 plugins/scattermoe/bench/bench_moe_block.py > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"; tail -8 "$OUT/bench.log"
fi
if [ "$what" = tune ]; then  # issue 16, first call: what the two benches include, then every tile of every launch
  timeout 110 python3 plugins/scattermoe/bench/diagnose_gap.py --shapes Qwen3-30B-A3B OLMoE-1B-7B > "$OUT/diag.log" 2>&1
  echo "diag rc=$?"
  timeout 300 python3 plugins/scattermoe/bench/tune_tiles.py > "$OUT/tune.log" 2>&1
  echo "tune rc=$?"
  grep -A 20 "^device" "$OUT/diag.log" | cut -c1-150
  grep -B2 -A 80 "^device" "$OUT/tune.log" | cut -c1-170 | grep -v "^TILE_TABLE\|^    (" | head -70
fi
if [ "$what" = probe ]; then  # issue 16, second call: new kernels on the GPU, the block table, host profile
  timeout 60 python3 -m pytest -q -p no:cacheprovider --import-mode=importlib plugins/scattermoe/tests/test_scattermoe_fused_tail.py \
    plugins/scattermoe/tests/test_scattermoe_gpu.py > "$OUT/pytest_probe.log" 2>&1
  echo "pytest rc=$?"; tail -3 "$OUT/pytest_probe.log"
  timeout 200 python3 plugins/scattermoe/bench/bench_moe_block.py > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"; grep -A 20 "^device" "$OUT/bench.log"; grep failed "$OUT/bench.log" | cut -c1-200
  timeout 50 python3 plugins/scattermoe/bench/diagnose_gap.py --shapes Qwen3-30B-A3B --impls scattermoe --cprofile --kernel-info \
    --iters 20 > "$OUT/diag2.log" 2>&1
  echo "diag rc=$?"; grep -A 12 "^----- compiled" "$OUT/diag2.log" | cut -c1-120; grep -A 8 "^device" "$OUT/diag2.log" | cut -c1-150
fi
if [ "$what" = bf16 ]; then
  python3 -m pytest -q -p no:cacheprovider --import-mode=importlib plugins/scattermoe/tests/test_scattermoe_models.py -k bf16 \
    > "$OUT/pytest_bf16.log" 2>&1
  echo "pytest rc=$?"; grep -E "passed|failed|Error" "$OUT/pytest_bf16.log" | tail -12
fi
if [ "$what" = profile ]; then
  python3 plugins/scattermoe/bench/profile_block.py "$@" > "$OUT/profile.log" 2>&1
  echo "profile rc=$?"; grep -E "=====|Name|s2s|outer|_kernel|aten::|Self CUDA" "$OUT/profile.log" | cut -c1-200 | head -80
fi
if [ "$what" = graph ]; then  # issue 16 follow-up, call 1: CUDA-graphed experts vs eager vs grouped_mm, host profile
  timeout 150 python3 -m pytest -q -p no:cacheprovider --import-mode=importlib plugins/scattermoe/tests/test_scattermoe_graphs.py \
    plugins/scattermoe/tests/test_scattermoe_gpu.py -x > "$OUT/pytest.log" 2>&1
  echo "pytest rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/pytest.log" | tail -8
  timeout 200 python3 plugins/scattermoe/bench/bench_moe_block.py --iters 20 --shapes Qwen3-30B-A3B Qwen3.5-35B-A3B OLMoE-1B-7B \
    --impls grouped_mm scattermoe scattermoe+graph > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"; grep failed "$OUT/bench.log" | cut -c1-300; grep -A 12 "^device" "$OUT/bench.log"
  SCATTERMOE_CUDA_GRAPH=1 timeout 60 python3 plugins/scattermoe/bench/diagnose_gap.py --impls scattermoe --cprofile --iters 10 \
    > "$OUT/diag.log" 2>&1
  echo "diag rc=$?"; grep -A 30 "by tottime" "$OUT/diag.log" | cut -c1-150 | head -34
fi
if [ "$what" = graph2 ]; then  # issue 16 follow-up, call 2: tests, block table (all shapes, peers), mxfp4 A, end-to-end
  timeout 80 python3 -m pytest -q -p no:cacheprovider --import-mode=importlib plugins/scattermoe/tests/test_scattermoe_graphs.py \
    plugins/scattermoe/tests/test_scattermoe_gpu.py plugins/scattermoe/tests/test_scattermoe_fused_tail.py > "$OUT/pytest.log" 2>&1
  echo "pytest rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/pytest.log" | tail -8
  timeout 180 python3 plugins/scattermoe/bench/bench_moe_block.py --iters 20 --impls grouped_mm scattermoe scattermoe+graph liger \
    > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"; grep failed "$OUT/bench.log" | cut -c1-300; grep -A 24 "^device" "$OUT/bench.log"
  timeout 100 python3 plugins/scattermoe/bench/bench_e2e_train.py --steps 10 --work /tmp/e2e > "$OUT/e2e.log" 2>&1
  echo "e2e rc=$?"; tail -9 "$OUT/e2e.log" | cut -c1-300
  timeout 50 python3 plugins/mxfp4/bench/bench_mxfp4.py --shapes Qwen3-30B-A3B,Qwen3.5-35B-A3B --iters 3 --skip-load --skip-fused \
    > "$OUT/mxfp4.log" 2>&1
  echo "mxfp4 rc=$?"; grep -E "^\| Qwen|ratio" "$OUT/mxfp4.log" | cut -c1-150 | head -16
fi
if [ "$what" = graph3 ]; then  # issue 16 follow-up, call 3: GPU tests of the new kernels, gpt-oss GLU before/after, block table
  timeout 60 python3 -m pytest -q -p no:cacheprovider --import-mode=importlib plugins/scattermoe/tests/test_scattermoe_graphs.py \
    plugins/scattermoe/tests/test_scattermoe_gpu.py plugins/scattermoe/tests/test_scattermoe_kernels.py \
    plugins/scattermoe/tests/test_scattermoe_models.py -k "graph or glu or gate or real_shapes or gpt_oss" \
    > "$OUT/pytest.log" 2>&1
  echo "pytest rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/pytest.log" | tail -8
  SCATTERMOE_FUSED_GATES=0 timeout 35 python3 plugins/scattermoe/bench/bench_moe_block.py --iters 20 --shapes gpt-oss-20b \
    --impls scattermoe --json "$OUT/bench_gptoss_torch_gate.json" > "$OUT/bench_gptoss_torch_gate.log" 2>&1
  echo "gpt-oss torch gate rc=$?"; grep -A 3 "^device" "$OUT/bench_gptoss_torch_gate.log"
  timeout 90 python3 plugins/scattermoe/bench/bench_moe_block.py --iters 20 --impls grouped_mm scattermoe scattermoe+graph \
    --shapes gpt-oss-20b Qwen3-30B-A3B Qwen3.5-35B-A3B > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"; grep failed "$OUT/bench.log" | cut -c1-300; grep -A 20 "^device" "$OUT/bench.log"
fi
if [ "$what" = profile2 ]; then  # issue 16 follow-up, call 4: per-kernel tables before/after (gpt-oss gate; Qwen3-30B graph)
  SCATTERMOE_FUSED_GATES=0 timeout 45 python3 plugins/scattermoe/bench/profile_block.py gpt-oss-20b > "$OUT/profile_gptoss_torch_gate.log" 2>&1
  echo "rc=$?"; grep -A 26 "=====" "$OUT/profile_gptoss_torch_gate.log" | cut -c1-110
  timeout 45 python3 plugins/scattermoe/bench/profile_block.py gpt-oss-20b Qwen3-30B-A3B > "$OUT/profile.log" 2>&1
  echo "rc=$?"; grep -A 26 "=====" "$OUT/profile.log" | cut -c1-110
  SCATTERMOE_CUDA_GRAPH=1 timeout 30 python3 plugins/scattermoe/bench/profile_block.py Qwen3-30B-A3B > "$OUT/profile_graph.log" 2>&1
  echo "rc=$?"; grep -A 26 "=====" "$OUT/profile_graph.log" | cut -c1-110
fi
if [ "$what" = tma1 ]; then  # issue 16 (TMA pass), call 1: GEMM launches per tile/operand path, GPU tests with TMA on/off
  for i in 0 1 2 3 4 5 6 7 8 9; do  # fill Triton's cache in parallel (one compile per variant)
    timeout 150 python3 plugins/scattermoe/bench/bench_gemm.py --part $i/10 --compile-only > "$OUT/compile$i.log" 2>&1 &
  done
  timeout 120 python3 -m pytest -q -p no:cacheprovider --import-mode=importlib plugins/scattermoe/tests/test_scattermoe_gpu.py \
    plugins/scattermoe/tests/test_scattermoe_kernels.py -k "real_shapes or tma or int64" > "$OUT/pytest.log" 2>&1
  echo "pytest rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/pytest.log" | tail -8
  wait; grep -h failed "$OUT"/compile*.log | cut -c1-300 | head -5; cat "$OUT"/compile*.log > "$OUT/compile.log"; rm -f "$OUT"/compile?.log
  timeout 200 python3 plugins/scattermoe/bench/bench_gemm.py --json "$OUT/bench_gemm.json" > "$OUT/gemm.log" 2>&1
  echo "gemm rc=$?"; grep -A 30 "best variant" "$OUT/gemm.log"; grep failed "$OUT/gemm.log" | cut -c1-200 | head
fi
if [ "$what" = tmafinal ]; then  # issue 16 (TMA pass), last call: block table with peers, GPU tests, e2e, GEMMs before/after
  timeout 200 python3 plugins/scattermoe/bench/bench_moe_block.py --iters 20 --impls grouped_mm scattermoe scattermoe+ptr liger \
    --json "$OUT/bench_moe_block.json" > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"; grep failed "$OUT/bench.log" | cut -c1-300; grep -A 24 "^device" "$OUT/bench.log"
  timeout 110 python3 -m pytest -q -p no:cacheprovider --import-mode=importlib plugins/scattermoe/tests/test_scattermoe_gpu.py \
    plugins/scattermoe/tests/test_scattermoe_fused_tail.py plugins/scattermoe/tests/test_scattermoe_graphs.py \
    plugins/scattermoe/tests/test_scattermoe_kernels.py::test_tma_descriptor_path_matches_reference \
    plugins/scattermoe/tests/test_scattermoe_kernels.py::test_int64_variant_is_bitwise_identical \
    plugins/scattermoe/tests/test_scattermoe_kernels.py::test_tile_rule_tma_choice > "$OUT/pytest.log" 2>&1
  echo "pytest rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/pytest.log" | tail -8
  timeout 90 python3 plugins/scattermoe/bench/bench_e2e_train.py --steps 10 --work /tmp/e2e > "$OUT/e2e.log" 2>&1
  echo "e2e rc=$?"; tail -9 "$OUT/e2e.log" | cut -c1-300
  timeout 40 python3 plugins/scattermoe/bench/bench_gemm.py --final --json "$OUT/bench_gemm.json" > "$OUT/gemm.log" 2>&1
  echo "gemm rc=$?"; grep -A 22 "best variant" "$OUT/gemm.log"; grep failed "$OUT/gemm.log" | cut -c1-200 | head -3
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
  python3 plugins/scattermoe/bench/bench_moe_block.py "$@" > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"; tail -40 "$OUT/bench.log"
fi
if [ "$what" = host1 ]; then  # issue 16 host path, call 1: where the eager step's host time goes
  timeout 40 python3 plugins/scattermoe/bench/host_overhead.py --json "$OUT/host_overhead.json" > "$OUT/host_overhead.log" 2>&1
  echo "host rc=$?"; grep -A 30 "^host time" "$OUT/host_overhead.log"; grep -iE "error|Traceback" "$OUT/host_overhead.log" | head -5
  timeout 50 python3 plugins/scattermoe/bench/diagnose_gap.py --shapes Qwen3-30B-A3B --impls scattermoe --cprofile --iters 20 \
    > "$OUT/diag.log" 2>&1
  echo "diag rc=$?"; grep -A 40 "by tottime" "$OUT/diag.log" | cut -c1-160 | head -44; grep -A 6 "^device" "$OUT/diag.log" | cut -c1-150
fi
if [ "$what" = host2 ]; then  # issue 16 host path, call 2: block table after / before (BEFORE=tree of the old code), GPU tests
  S="Qwen3-30B-A3B Qwen3.5-35B-A3B OLMoE-1B-7B"
  timeout 50 python3 plugins/scattermoe/bench/bench_moe_block.py --iters 20 --shapes $S --impls grouped_mm scattermoe \
    --json "$OUT/bench_after.json" > "$OUT/bench_after.log" 2>&1
  echo "bench after rc=$?"; grep -A 8 "^device" "$OUT/bench_after.log" | cut -c1-140
  (cd "$BEFORE" && PYTHONPATH=/tmp/site:$BEFORE:$BEFORE/plugins/scattermoe timeout 30 python3 plugins/scattermoe/bench/bench_moe_block.py \
    --iters 20 --shapes $S --impls scattermoe --json "$OUT/bench_before.json" > "$OUT/bench_before.log" 2>&1)
  echo "bench before rc=$?"; grep -A 5 "^device" "$OUT/bench_before.log" | cut -c1-140
  timeout 30 python3 -m pytest -q -p no:cacheprovider --import-mode=importlib plugins/scattermoe/tests/test_scattermoe_gpu.py \
    plugins/scattermoe/tests/test_scattermoe_graphs.py::test_graph_matches_eager_over_steps -k "qwen3 or int64 or graph" \
    > "$OUT/pytest.log" 2>&1
  echo "pytest rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/pytest.log" | tail -6
  timeout 12 python3 plugins/scattermoe/bench/host_overhead.py --json /tmp/host_after.json > "$OUT/host_after.log" 2>&1
  echo "host after rc=$?"; grep -A 16 "^host time" "$OUT/host_after.log"
  (cd "$BEFORE" && PYTHONPATH=/tmp/site:$BEFORE:$BEFORE/plugins/scattermoe timeout 12 python3 plugins/scattermoe/bench/host_overhead.py \
    --json /tmp/host_before.json > "$OUT/host_before.log" 2>&1)
  echo "host before rc=$?"; grep -A 16 "^host time" "$OUT/host_before.log"
fi
