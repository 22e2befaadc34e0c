"""Scaling benchmark: tokens/s and peak memory per GPU for 1 GPU, 2-GPU DDP and 2-GPU FSDP2 on the
same model and global batch, with and without the scattermoe plugin. Each variant is a real
`host train` under torchrun in a fresh process; numbers come from its run_summary.json.

Model: reduced-depth, real-width Qwen3-MoE (random weights; H=2048, E=128, I=768, top-8, 2 layers),
LoRA r=16 on attention and expert parameters, sequence 2048, bf16, global batch 4 sequences.
Targets: DDP >= 1.9x one GPU's tokens/s; FSDP2 peak memory per GPU <= 0.6x one GPU's.

Each run is also checked (column ``checks``, and ``checks`` in the JSON): the logged train losses are finite and
the last is below the first; with 2 GPUs, the first and last logged loss agree with the same plugin set's 1-GPU run
within ``LOSS_RTOL`` (same global batch, same data order, same seed); the adapter was saved, holding the same
tensor names as the 1-GPU run's. Peak memory is rank 0's.

Usage (on a 2-GPU machine): python scripts/bench_scaling.py [--steps 12] [--layers 2] [--batch 4] [--variants 1gpu,ddp2,ddp2-static,...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

LAYER = "Qwen3MoeDecoderLayer"
# name -> (GPUs, FSDP2); fsdp2x1: FSDP2's sharding machinery with one rank (a check that fits a one-GPU machine)
VARIANTS = {"1gpu": (1, False), "ddp2": (2, False), "fsdp2x2": (2, True), "fsdp2x1": (1, True)}
DEEPSPEED = {"zero2x2": "zero2.json", "zero3x2": "zero3.json"}  # 2 GPUs, examples/deepspeed/<json>
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
LOSS_RTOL = 1e-2  # bf16, different reduction order across ranks


def parse_variant(tag: str) -> tuple[str, int, bool, set[str]]:
    """``1gpu|ddp2|fsdp2x2`` with optional ``-scattermoe`` / ``-liger`` / ``-static``, or ``zero2x2|zero3x2``
    (DeepSpeed) -> (tag, GPUs, FSDP2, modifiers)."""
    name, *mods = tag.split("-")
    if name in DEEPSPEED and not mods:
        return tag, 2, False, set()
    if name not in VARIANTS or not set(mods) <= {"scattermoe", "liger", "static"}:
        sys.exit(f"unknown variant {tag!r}: one of {', '.join(VARIANTS)}, optionally with -scattermoe, -liger, -static")
    gpus, fsdp = VARIANTS[name]
    if fsdp and "static" in mods:
        sys.exit(f"variant {tag!r}: -static sets a DDP option, which the host refuses together with FSDP")
    return tag, gpus, fsdp, set(mods)


def build_model(path: Path, layers: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from host.testing import build_tokenizer, sample_texts, tiny_config

    if (path / "config.json").exists():
        return
    tok = build_tokenizer(sample_texts(), path, vocab_size=4096)
    cfg = tiny_config(
        "qwen3_moe", len(tok), hidden_size=2048, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        moe_intermediate_size=768, intermediate_size=6144, max_position_embeddings=4096,
    )
    cfg.eos_token_id, cfg.pad_token_id = tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path)


def write_data(path: Path) -> None:
    from host.testing import sample_texts

    texts = sample_texts() * 20
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def variant_config(work: Path, name: str, gpus: int, fsdp: bool, mods: set[str], steps: int, batch: int = 4) -> Path:
    cfg = {
        "base_model": str(work / "model"),
        "plugins": sorted(mods & {"scattermoe", "liger"}),
        "datasets": [{"path": str(work / "data.jsonl"), "type": "completion"}],
        "dataset_prepared_path": str(work / "prepared"),
        "sequence_len": 2048,
        "pad_to_sequence_len": True,  # every sample is a full 2048-token row: tokens/s measures the model
        "adapter": "lora",
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "lora_target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        "micro_batch_size": batch // gpus,
        "max_steps": steps,
        "learning_rate": 1e-3,  # a loss decrease within a few steps (the checks); speed does not depend on it
        "lr_scheduler": "constant",
        "bf16": True,
        "logging_steps": max(1, steps // 4),  # four logged losses (each logged step synchronises on the loss)
        "output_dir": str(work / "runs" / name),
        "save_strategy": "no",  # time training, not checkpoint writes
        "seed": 0,
    }
    if name in DEEPSPEED:
        cfg["deepspeed"] = str(EXAMPLES / "deepspeed" / DEEPSPEED[name])
    if "liger" in mods:  # liger's kernels for this family (its SwiGLU has no dense MLP here: experts are scattermoe's)
        cfg.update(liger_rms_norm=True, liger_rope=True, liger_fused_linear_cross_entropy=True)
    if "static" in mods:  # every LoRA parameter gets a gradient each step: skip DDP's per-step unused-parameter search
        cfg["ddp_find_unused_parameters"] = False
    if fsdp:
        cfg["fsdp_config"] = {"transformer_layer_cls_to_wrap": [LAYER], "state_dict_type": "SHARDED_STATE_DICT"}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run(work: Path, name: str, gpus: int, cfg: Path, log_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={gpus}", "--master-port=29577",
           "-m", "host", "train", str(cfg)]
    shutil.rmtree(work / "runs" / name, ignore_errors=True)  # a fresh run (host refuses to overwrite one)
    t = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    (log_dir / f"{name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["failed"]
        return {"name": name, "error": next((x for x in lines if x.startswith("Error:")), lines[-1])[:300]}
    summary = json.loads((work / "runs" / name / "run_summary.json").read_text())
    return {"name": name, "gpus": gpus, **summary, "process_s": round(time.time() - t, 1),
            "losses": [summary["first_train_loss"], summary["final_train_loss"]],  # full precision (logs round)
            "logged": logged_losses(log_dir / f"{name}.log"),
            "adapter": adapter_tensors(work / "runs" / name)}


def logged_losses(log: Path) -> list[float]:
    """The train losses the Trainer logged (its ``{'loss': ...}`` lines), in order."""
    import ast
    import re

    out = []
    for line in log.read_text().splitlines():
        m = re.search(r"\{'loss': .*?\}", line)
        if m:
            try:
                out.append(float(ast.literal_eval(m.group(0))["loss"]))
            except (ValueError, SyntaxError, KeyError):
                pass
    return out


def adapter_tensors(out_dir: Path) -> list[str]:
    """Tensor names in the saved adapter (empty if none was saved)."""
    path = out_dir / "adapter_model.safetensors"
    if not path.is_file():
        return []
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return sorted(f.keys())


def checks(r: dict, base: dict) -> list[str]:
    """What is wrong with run ``r`` (against ``base``, the same plugin set on one GPU); empty when all is well."""
    import math

    bad = []
    losses = r.get("losses") or []
    if not all(isinstance(x, float) and math.isfinite(x) for x in [*losses, *r.get("logged", [])]) or len(losses) < 2:
        bad.append(f"losses {losses} (logged {r.get('logged')})")
    elif not losses[-1] < losses[0]:
        bad.append(f"loss not decreasing {losses[0]:.4f} -> {losses[-1]:.4f}")
    if not r.get("adapter"):
        bad.append("no adapter saved")
    if base is not r:
        if r.get("adapter") != base.get("adapter"):
            bad.append("adapter tensors differ from 1 GPU's")
        for i in (0, -1):
            a, b = (losses or [math.nan])[i], (base.get("losses") or [math.nan])[i]
            if not abs(a - b) <= LOSS_RTOL * abs(b):
                bad.append(f"loss[{i}] {a:.4f} vs 1 GPU {b:.4f}")
    return bad


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="global batch (sequences per step)")
    ap.add_argument("--variants", default="1gpu,ddp2,fsdp2x2,1gpu-scattermoe,ddp2-scattermoe,fsdp2x2-scattermoe",
                    help="comma-separated; suffix -scattermoe / -liger adds the plugin, -static sets ddp_find_unused_parameters: "
                    "false; zero2x2/zero3x2 run DeepSpeed ZeRO-2/3 on 2 GPUs with examples/deepspeed/*.json")
    ap.add_argument("--work", type=Path, default=Path("/tmp/host-scaling"))
    ap.add_argument("--logs", type=Path, default=Path(os.environ.get("OUT", "/tmp/host-scaling-logs")))
    args = ap.parse_args()
    variants = [parse_variant(tag) for tag in args.variants.split(",")]  # before any GPU work
    args.work.mkdir(parents=True, exist_ok=True)
    args.logs.mkdir(parents=True, exist_ok=True)
    build_model(args.work / "model", args.layers)
    write_data(args.work / "data.jsonl")

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"  # CPU: a dry run of the checks
    results = []
    for tag, gpus, fsdp, mods in variants:
        cfg = variant_config(args.work, tag, gpus, fsdp, mods, args.steps, args.batch)
        results.append(run(args.work, tag, gpus, cfg, args.logs))
        print(json.dumps(results[-1]), flush=True)

    print(f"\n{device}, {time.strftime('%Y-%m-%d')}, Qwen3-MoE H=2048 E=128 I=768 k=8, {args.layers} layers, "
          f"seq 2048, global batch {args.batch}, LoRA r=16, bf16, {args.steps} steps")
    print(f"{'variant':<26} {'tokens/s':>9} {'vs 1 GPU':>9} {'peak GiB/GPU':>13} {'vs 1 GPU':>9} {'first loss':>10} "
          f"{'final loss':>10}  checks")
    base = {}
    for r in results:
        if "error" in r:
            print(f"{r['name']:<26} ERROR {r['error']}")
            continue
        key = r["name"].split("-", 1)[1] if "-" in r["name"] else "plain"  # each plugin set against its own 1-GPU row
        base.setdefault(key, r)
        b = base[key]
        r["checks"] = checks(r, b)
        losses = r.get("losses") or [float("nan")]
        peak, peak_b = r["peak_memory_gib"] or float("nan"), b["peak_memory_gib"] or float("nan")  # None on CPU
        print(f"{r['name']:<26} {r['steady_tokens_per_s']:>9.0f} {r['steady_tokens_per_s'] / b['steady_tokens_per_s']:>8.2f}x "
              f"{peak:>13.2f} {peak / peak_b:>8.2f}x {losses[0] or float('nan'):>10.4f} "
              f"{losses[-1] or float('nan'):>10.4f}  {'; '.join(r['checks']) or 'ok'}")
    doc = {"device": device, "date": time.strftime("%Y-%m-%d"), "layers": args.layers, "batch": args.batch,
           "steps": args.steps, "runs": results}
    (args.logs / "bench_scaling.json").write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
