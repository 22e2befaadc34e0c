#!/usr/bin/env bash
# Issue 16 host path: before/after in one device call. Run from a checkout root holding two trees, .gpu/base-hostpath
# (before) and .gpu/hostpath (after), and the wheels in .whl (see BRIEF / device README). Writes at most 8 files to $OUT:
# host_{before,after}.log (bench/host_overhead.py), bench_{before,after}.{log,json} (bench_moe_block.py, three
# many-expert shapes, scattermoe only), pytest.log (GPU tests of the after tree), cprofile.log (diagnose_gap --cprofile).
set -uo pipefail
OUT=${OUT:-/tmp/host_gpu}; mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > /tmp/pip.log 2>&1 || { echo "pip failed"; tail -3 /tmp/pip.log; }
root=$PWD
in_tree() {  # tree, then the command
  local tree=$1; shift
  (cd "$root/.gpu/$tree" && bash scripts/gpu-entry-points.sh /tmp/site > /dev/null \
    && PYTHONPATH=/tmp/site:$PWD:$PWD/plugins/scattermoe:$PWD/plugins/mxfp4 "$@")
}
SHAPES="Qwen3-30B-A3B Qwen3.5-35B-A3B OLMoE-1B-7B"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for t in base-hostpath hostpath; do
  tag=$([ $t = hostpath ] && echo after || echo before)
  in_tree $t timeout ${HOST_S:-100} python3 plugins/scattermoe/bench/host_overhead.py --json /tmp/host_$tag.json \
    > "$OUT/host_$tag.log" 2>&1; echo "host_overhead $tag rc=$?"
done
for t in base-hostpath hostpath; do
  tag=$([ $t = hostpath ] && echo after || echo before)
  in_tree $t timeout ${BENCH_S:-120} python3 plugins/scattermoe/bench/bench_moe_block.py --iters 20 --shapes $SHAPES \
    --impls scattermoe --json "$OUT/bench_$tag.json" > "$OUT/bench_$tag.log" 2>&1; echo "bench $tag rc=$?"
done
in_tree hostpath timeout ${TEST_S:-150} python3 -m pytest -q -p no:cacheprovider --import-mode=importlib \
  plugins/scattermoe/tests/test_scattermoe_gpu.py plugins/scattermoe/tests/test_scattermoe_graphs.py \
  plugins/scattermoe/tests/test_scattermoe_merged.py > "$OUT/pytest.log" 2>&1; echo "pytest rc=$?"
in_tree hostpath env OUT=/tmp timeout ${PROF_S:-60} python3 plugins/scattermoe/bench/diagnose_gap.py --shapes Qwen3-30B-A3B \
  --impls scattermoe --iters 20 --cprofile > "$OUT/cprofile.log" 2>&1; echo "cprofile rc=$?"
grep -E "passed|failed|FAILED|Error" "$OUT/pytest.log" | tail -8
for tag in before after; do echo "== host $tag"; tail -16 "$OUT/host_$tag.log"; done
for tag in before after; do echo "== bench $tag"; grep -A 5 "^shape" "$OUT/bench_$tag.log" | cut -c1-130; done
