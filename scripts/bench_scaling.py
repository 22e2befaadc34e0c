"""Scaling benchmark: tokens/s and peak memory per GPU for 1 GPU, 2-GPU DDP and 2-GPU FSDP2 on the
same model and global batch, with and without the scattermoe plugin. Each variant is a real
`host train` under torchrun in a fresh process; numbers come from its run_summary.json.

Model: reduced-depth, real-width Qwen3-MoE (random weights; H=2048, E=128, I=768, top-8, 2 layers),
LoRA r=16 on attention and expert parameters, sequence 2048, bf16, global batch 4 sequences.
Targets: DDP >= 1.9x one GPU's tokens/s; FSDP2 peak memory per GPU <= 0.6x one GPU's.

Usage (on a 2-GPU machine): python scripts/bench_scaling.py [--steps 12] [--layers 2] [--batch 4] [--variants 1gpu,ddp2,ddp2-static,...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

LAYER = "Qwen3MoeDecoderLayer"
VARIANTS = {"1gpu": (1, False), "ddp2": (2, False), "fsdp2x2": (2, True)}  # name -> (GPUs, FSDP2)
DEEPSPEED = {"zero2x2": "zero2.json", "zero3x2": "zero3.json"}  # 2 GPUs, examples/deepspeed/<json>
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


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
        "learning_rate": 1e-4,
        "bf16": True,
        "logging_steps": 4,  # each logged step synchronises on the loss
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
    t = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    (log_dir / f"{name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return {"name": name, "error": done.stderr.strip().splitlines()[-1][:200] if done.stderr.strip() else "failed"}
    summary = json.loads((work / "runs" / name / "run_summary.json").read_text())
    return {"name": name, "gpus": gpus, **summary, "process_s": round(time.time() - t, 1)}


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

    device = torch.cuda.get_device_name(0)
    results = []
    for tag, gpus, fsdp, mods in variants:
        cfg = variant_config(args.work, tag, gpus, fsdp, mods, args.steps, args.batch)
        results.append(run(args.work, tag, gpus, cfg, args.logs))
        print(json.dumps(results[-1]), flush=True)

    print(f"\n{device}, {time.strftime('%Y-%m-%d')}, Qwen3-MoE H=2048 E=128 I=768 k=8, {args.layers} layers, "
          f"seq 2048, global batch {args.batch}, LoRA r=16, bf16, {args.steps} steps")
    print(f"{'variant':<22} {'tokens/s':>9} {'vs 1 GPU':>9} {'peak GiB/GPU':>13} {'vs 1 GPU':>9} {'final loss':>10}")
    base = {}
    for r in results:
        if "error" in r:
            print(f"{r['name']:<22} ERROR {r['error']}")
            continue
        key = r["name"].split("-", 1)[1] if "-" in r["name"] else "plain"  # each plugin set against its own 1-GPU row
        base.setdefault(key, r)
        b = base[key]
        print(f"{r['name']:<22} {r['steady_tokens_per_s']:>9.0f} {r['steady_tokens_per_s'] / b['steady_tokens_per_s']:>8.2f}x "
              f"{r['peak_memory_gib']:>13.2f} {r['peak_memory_gib'] / b['peak_memory_gib']:>8.2f}x {r['final_train_loss']:>10.4f}")


if __name__ == "__main__":
    main()
