#!/usr/bin/env bash
# One device call on 2 GPUs (nvidia-h200-x2): (1) on GPU 0, the training benchmark's host-sync experiments:
# plain vs scattermoe + liger with the plugin's sync-free fused loss, with liger-kernel's own syncs back
# (-syncs), with the Trainer's per-step syncs off as well (-nosync), and scattermoe's CUDA graphs under
# reentrant checkpointing (-graph); the sync listing and profile of the fused variant; (2) DDP and FSDP2 with
# liger (scripts/bench_scaling.py, each run checked against 1 GPU). Needs host, plugins/liger (with
# liger-kernel) and plugins/scattermoe importable; run from the repo root. Results go to $RES; $OUT gets at
# most 8 files (the device tool's limit; names without '+'): the logs, JSONs, sync listings and a tarball of all.
set -uo pipefail
OUT=${OUT:-/tmp/liger-out}; RES=${RES:-/tmp/liger-res}; mkdir -p "$OUT" "$RES/bench" "$RES/scaling"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$RES/device.txt"
lscpu | grep -E "^Model name|^CPU\(s\)" | tee -a "$RES/device.txt"
B=plugins/liger/bench
V=${VARIANTS:-plain,scattermoe+liger,scattermoe+liger-syncs,scattermoe+liger-nosync,scattermoe+liger-graph}
[ "$V" = none ] || CUDA_VISIBLE_DEVICES=0 timeout "${BENCH_S:-130}" python3 $B/bench_liger.py --out "$RES/bench" --variants "$V" --steps 10 \
  --no-loss-head --profile scattermoe+liger --syncs scattermoe+liger,scattermoe+liger-syncs 2>&1 \
  | tee "$RES/bench.log" | grep -E "^\{|^[a-z]|^  |^NVIDIA|Error|error" | grep -v Warning | cut -c1-400
timeout "${SCALING_S:-150}" python3 scripts/bench_scaling.py --layers 2 --batch 4 --steps 8 --logs "$RES/scaling" \
  --variants "${SCALING:-1gpu-scattermoe-liger,ddp2-scattermoe-liger,fsdp2x2-scattermoe-liger}" 2>&1 \
  | tee "$RES/scaling.log" | grep -vE "Warning|^\{" | tail -8
cp "$RES/device.txt" "$RES/bench.log" "$RES/scaling.log" "$OUT/"
cp "$RES/bench/bench_liger.json" "$RES/scaling/bench_scaling.json" "$OUT/" 2>/dev/null
for f in "$RES"/bench/syncs_*.txt; do [ -f "$f" ] && cp "$f" "$OUT/$(basename "$f" | tr '+' '_')"; done
tar czf "$OUT/all.tgz" -C "$RES" .
ls -la "$OUT"
