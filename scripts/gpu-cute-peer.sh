#!/usr/bin/env bash
# Issue 16: quack-kernels' CuTe-DSL grouped GEMM against the plugin's Triton launches (bench/cute_peer.py).
# nvidia-cutlass-dsl's CUDA-13 library wheel (92 MB) is over a device call's 64 MiB transfer limit, so it travels
# unpacked and recompressed (xz with the x86 filter: 50 MiB) in .cute1/cu13.tar.xz, the other wheels (cutlass-dsl,
# its base and core libraries, quack-kernels, apache-tvm-ffi, torch-c-dlpack-ext) in .cute2/ (both ignored through
# .git/info/exclude). With the tree that is 62.7 MiB, so the host wheels (.whl) can't come too: install them to
# /tmp/site in an earlier call, then carry .cute1 and .cute2 in the next call on the same warm machine (its /tmp
# stays; an ignored folder of the checkout that the call does not carry does not).
# To make them (here, 4 min of xz on one core): pip download --no-deps --only-binary=:all: --python-version 3.12
#   --platform manylinux_2_28_x86_64 -d .cute2 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
#   nvidia-cutlass-dsl-libs-core==4.8.1 quack-kernels==0.6.5 'apache-tvm-ffi<0.2' torch-c-dlpack-ext;
#   the same for nvidia-cutlass-dsl-libs-cu13==4.8.1 into a scratch folder, unzip it, drop its lib/stubs, and
#   tar cf - . | xz -T1 --x86 --lzma2=preset=9e,dict=192MiB > .cute1/cu13.tar.xz
# Run from the repo root after the host wheels are installed to /tmp/site (device README).
set -uo pipefail
RESULTS=${OUT:-/tmp/gpu-cute}; mkdir -p "$RESULTS"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .cute2/*.whl || exit 3
xz -dc .cute1/cu13.tar.xz | tar x -C /tmp/site || exit 4
export PYTHONPATH=/tmp/site/nvidia_cutlass_dsl/dsl_packages:/tmp/site:$PWD:$PWD/plugins/scattermoe:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout "${CUTE_S:-420}" python3 plugins/scattermoe/bench/cute_peer.py ${CUTE_ARGS:-} --json "$RESULTS/cute_peer.json" \
  > "$RESULTS/cute_peer.log" 2>&1
echo "cute_peer rc=$?"
grep -E "failed|Error|error" "$RESULTS/cute_peer.log" | head -8 | cut -c1-300
sed -n '/per launch ms/,$p' "$RESULTS/cute_peer.log"
