#!/usr/bin/env bash
# One GPU call (2 GPUs): install deepspeed from its sdist (no ops built ahead; the ZeRO-2/3 paths used
# here need none) and run the scaling bench's ZeRO-2 and ZeRO-3 variants. Run from the repo root, with
# the wheels of scripts' deps already on PYTHONPATH; $1 is the folder holding deepspeed-*.tar.gz.
set -uo pipefail
DS_BUILD_OPS=0 timeout 120 python3 -m pip install -q --no-deps --no-build-isolation "$1"/deepspeed-*.tar.gz || exit 1
python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)"
timeout "${BENCH_TIMEOUT:-400}" python3 scripts/bench_scaling.py --layers 8 --batch 16 --steps "${STEPS:-12}" \
  --variants zero2x2,zero3x2 --logs "${OUT:-/tmp}/scaling-logs"
