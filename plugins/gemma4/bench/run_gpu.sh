#!/usr/bin/env bash
# The plugin's whole GPU session in one call (budget: one cold start). Run from the repo root on the
# device machine after the wheel install line of the helper brief. Writes logs under $OUT.
set -u
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=/tmp/site:$PWD:$PWD/plugins/gemma4:$PWD/plugins/gemma4/bench
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpus.txt
NG=$(nvidia-smi -L | wc -l)
if [ "$NG" -ge 2 ]; then
  timeout 100 torchrun --nproc-per-node 2 plugins/gemma4/bench/fsdp2_shared_kv.py --out $OUT > $OUT/fsdp2.log 2>&1
  echo "fsdp2 rc=$?"; tail -6 $OUT/fsdp2.log
fi
CUDA_VISIBLE_DEVICES=0 timeout 150 python3 plugins/gemma4/bench/bench_gemma4.py --out $OUT > $OUT/bench.log 2>&1
echo "bench rc=$?"
(pip install -q --no-deps --no-build-isolation -e . -e plugins/gemma4 > $OUT/pip.log 2>&1 || true)
CUDA_VISIBLE_DEVICES=0 timeout 80 python3 -m pytest -q -p no:cacheprovider --import-mode=importlib plugins/gemma4/tests -q -k "not flex_attention" > $OUT/pytest.log 2>&1
echo "pytest rc=$?"; tail -4 $OUT/pytest.log
grep -A 40 "^## Gemma 4 plugin" $OUT/bench.log
grep -A 6 "^## FSDP2" $OUT/fsdp2.log
