"""QLoRA under FSDP2 on 2 GPUs, next to QLoRA under DDP and bf16 LoRA under FSDP2: per-GPU peak
memory, tokens/s and the loss. Each variant is a real ``host train`` under torchrun (2 processes,
fresh each), numbers from its run_summary.json (peak: rank 0's CUDA peak; tokens/s: all ranks).

Dense model: Qwen3-8B's layer widths (H=4096, I=12288, 32 query / 8 KV heads of 128; random
weights) cut to ``--layers`` decoder layers, vocabulary 4096 (see bench_qlora.py); LoRA r=16 on every
linear layer; bf16; full ``--seq``-token rows, one per GPU per step.
``qlora-fsdp2-moe`` is the path of axolotl's qwen3.5 MoE QLoRA+FSDP examples on a small Qwen3-MoE
(H=2048, 32 experts of I=768, top-4, 2 layers): ``quantize_moe_experts: true``, ``offload_params``,
activation checkpointing; LoRA on attention only, as there.

Usage (2 GPUs): python plugins/qlora/bench/bench_qlora_fsdp.py [--layers 4] [--seq 2048] [--steps 12]
                [--variants qlora-fsdp2,qlora-ddp,lora-fsdp2,qlora-fsdp2-moe]
Prints a Markdown table, writes plugins/qlora/bench/results/bench_qlora_fsdp_<device>.json (and $OUT).
``--tiny`` runs qlora-ddp at toy size on 2 CPU processes (checks the script; FSDP needs GPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).parent
RESULTS = HERE / "results"
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {  # name -> (model, config keys)
    "qlora-fsdp2": ("dense", {"adapter": "qlora", "load_in_4bit": True, "fsdp": "Qwen3DecoderLayer"}),
    "qlora-ddp": ("dense", {"adapter": "qlora", "load_in_4bit": True}),
    "lora-fsdp2": ("dense", {"adapter": "lora", "fsdp": "Qwen3DecoderLayer"}),
    "qlora-fsdp2-moe": ("moe", {"adapter": "qlora", "load_in_4bit": True, "quantize_moe_experts": True,
                                "fsdp": "Qwen3MoeDecoderLayer", "offload_params": True, "gradient_checkpointing": True,
                                "lora_target_modules": LINEAR[:4]}),
}


def build_moe(path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from host.testing import build_tokenizer, sample_texts, tiny_config

    tok = build_tokenizer(sample_texts(), path, vocab_size=4096)
    cfg = tiny_config("qwen3_moe", len(tok), hidden_size=2048, num_hidden_layers=2, num_attention_heads=16,
                      num_key_value_heads=4, head_dim=128, num_experts=32, num_experts_per_tok=4,
                      moe_intermediate_size=768, intermediate_size=6144, max_position_embeddings=4096)
    cfg.eos_token_id, cfg.pad_token_id = tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path)


def variant_config(work: Path, name: str, seq: int, steps: int, tiny: bool) -> Path:
    model, keys = VARIANTS[name]
    keys = dict(keys)
    layer = keys.pop("fsdp", None)
    offload = keys.pop("offload_params", False)
    cfg = {
        "base_model": str(work / "model" if model == "dense" else work / "moe"),
        "plugins": ["qlora"],
        "datasets": [{"path": str(work / "data.jsonl"), "type": "completion"}],
        "dataset_prepared_path": str(work / f"prepared-{model}"),
        "sequence_len": seq,
        "pad_to_sequence_len": True,  # full rows: tokens/s measures the model
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_target_modules": LINEAR,
        "micro_batch_size": 1,
        "max_steps": steps,
        "learning_rate": 1e-3,
        "lr_scheduler": "constant",
        "bf16": not tiny,
        "logging_steps": 1,
        "save_strategy": "no",  # time training; the final save (adapter, gathered under FSDP) still runs
        "output_dir": str(work / "runs" / name),
        "seed": 0,
        **keys,
    }
    if layer:
        cfg["fsdp_version"] = 2
        cfg["fsdp_config"] = {"transformer_layer_cls_to_wrap": [layer], "offload_params": offload,
                              "state_dict_type": "FULL_STATE_DICT"}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def first_error(log: str) -> str:
    """The first exception line a rank printed (``RuntimeError: ...``), not torchrun's summary."""
    hits = re.findall(r"^(?:\[rank\d+\]: )?(\w*(?:Error|Exception): .+)$", log, flags=re.M)
    return (hits[0] if hits else "failed (see the log)")[:300]


def run(work: Path, name: str, cfg: Path, logs: Path, timeout: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=29581",
           "-m", "host", "train", str(cfg)]
    t = time.time()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        (logs / f"{name}.log").write_text(f"{exc.stdout or ''}{exc.stderr or ''}")
        return {"variant": name, "error": f"timed out after {timeout} s"}
    (logs / f"{name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return {"variant": name, "error": first_error(done.stdout + done.stderr)}
    s = json.loads((work / "runs" / name / "run_summary.json").read_text())
    keep = ("world_size", "peak_memory_gib", "steady_tokens_per_s", "tokens_per_s", "median_step_s",
            "first_train_loss", "final_train_loss", "steps")
    return {"variant": name, **{k: s.get(k) for k in keep}, "adapter_saved": (work / "runs" / name / "adapter_model.safetensors").exists(),
            "process_s": round(time.time() - t, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--variants", default="qlora-fsdp2,qlora-ddp,lora-fsdp2,qlora-fsdp2-moe")
    ap.add_argument("--timeout", type=int, default=90, help="seconds per variant")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_qlora_fsdp"))
    ap.add_argument("--logs", type=Path, default=Path(os.environ.get("OUT", "/tmp/bench_qlora_fsdp_logs")))
    ap.add_argument("--tiny", action="store_true", help="qlora-ddp at toy size on 2 CPU processes")
    args = ap.parse_args()
    names = ["qlora-ddp"] if args.tiny else args.variants.split(",")
    for n in names:
        if n not in VARIANTS:
            raise SystemExit(f"unknown variant {n!r}: one of {', '.join(VARIANTS)}")
    sys.path.insert(0, str(HERE))
    import torch
    from bench_qlora import build  # the dense Qwen3-8B-width model and the data

    args.work.mkdir(parents=True, exist_ok=True)
    args.logs.mkdir(parents=True, exist_ok=True)
    t = time.time()
    build(args.work, args.layers, args.tiny)
    if any(VARIANTS[n][0] == "moe" for n in names):
        build_moe(args.work / "moe")
    print(f"models built in {time.time() - t:.1f} s", flush=True)
    rows = []
    for name in names:
        cfg = variant_config(args.work, name, 64 if args.tiny else args.seq, args.steps, args.tiny)
        rows.append(run(args.work, name, cfg, args.logs, args.timeout))
        print(json.dumps(rows[-1]), flush=True)

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    head = (f"{device} x2, {time.strftime('%Y-%m-%d')}; dense: Qwen3-8B widths, {args.layers} layers, vocab 4096, "
            f"seq {args.seq}, 1 row per GPU per step, LoRA r=16 on all linear layers, bf16, {args.steps} steps")
    print(f"\n{head}\n")
    print("| variant | peak GiB/GPU | tokens/s (2 GPUs) | loss first -> last | adapter saved |")
    print("| --- | ---: | ---: | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | ERROR {r['error']} | | | |")
            continue
        print(f"| {r['variant']} | {r['peak_memory_gib']} | {r['steady_tokens_per_s']} | "
              f"{r['first_train_loss']:.3f} -> {r['final_train_loss']:.3f} | {r['adapter_saved']} |")
    if not args.tiny:
        meta = {"device": device, "gpus": 2, "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()},
                "setup": head}
        blob = json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n"
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"bench_qlora_fsdp_{device.replace(' ', '_')}.json"
        out.write_text(blob)
        (args.logs / out.name).write_text(blob)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
