"""QLoRA vs bf16 LoRA on a real-width dense model: weight memory after load, peak memory while
training, tokens/s and the loss, each variant a real ``host train`` run (in this process, one
after the other, with the CUDA peak counter reset in between).

Model: Qwen3-8B's layer widths (H=4096, I=12288, 32 query / 8 KV heads of 128; random weights)
cut to ``--layers`` decoder layers, with the benchmark tokenizer's vocabulary (4096) instead of
151 936 so that the decoder layers, not the embedding, dominate; LoRA r=16 on every linear layer of
the decoder; full ``--seq``-token rows.

Usage (GPU): python plugins/qlora/bench/bench_qlora.py [--layers 4] [--seq 2048] [--steps 30]
             [--variants lora-bf16,qlora-nf4,lora-int8]
Prints a Markdown table and writes plugins/qlora/bench/results/bench_qlora_<device>.json.
``--tiny`` runs the same code at toy size on CPU (a smoke test of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import time
from pathlib import Path

import yaml

RESULTS = Path(__file__).parent / "results"
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {
    "lora-bf16": {"adapter": "lora"},
    "qlora-nf4": {"adapter": "qlora", "load_in_4bit": True},
    "lora-int8": {"adapter": "lora", "load_in_8bit": True},
}


def build(work: Path, layers: int, tiny: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from host.testing import build_tokenizer, sample_texts, tiny_config

    tok = build_tokenizer(sample_texts(), work / "model", vocab_size=4096)
    dims = dict(hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8,
                head_dim=128, max_position_embeddings=4096)
    if tiny:
        dims = dict(hidden_size=128, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    cfg = tiny_config("qwen3", len(tok), num_hidden_layers=layers, tie_word_embeddings=False, **dims)
    cfg.layer_types = ["full_attention"] * layers  # tiny_config cut it to its own depth
    cfg.eos_token_id, cfg.pad_token_id = tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(work / "model")
    del model
    texts = sample_texts() * 8
    (work / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def config(work: Path, name: str, seq: int, steps: int, batch: int, gc_on: bool) -> Path:
    cfg = {
        "base_model": str(work / "model"),
        "plugins": ["qlora"],
        "datasets": [{"path": str(work / "data.jsonl"), "type": "completion"}],
        "dataset_prepared_path": str(work / "prepared"),
        "sequence_len": seq,
        "pad_to_sequence_len": True,
        **VARIANTS[name],
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_target_modules": LINEAR,
        "micro_batch_size": batch,
        "max_steps": steps,
        "learning_rate": 1e-3,
        "lr_scheduler": "constant",
        "warmup_steps": 0,
        "logging_steps": 1,
        "gradient_checkpointing": gc_on,
        "output_dir": str(work / f"out-{name}"),
        "seed": 0,
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def weights_gib(path: Path) -> float | None:
    """Accelerator memory held by the loaded model + LoRA before any step (None on CPU)."""
    import torch

    from host import model as model_mod
    from host.config import load_config

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    cfg, pm, _ = load_config(path)
    model = model_mod.build(cfg, pm)[0]
    if not getattr(model.get_base_model(), "is_quantized", False):
        model.to("cuda")  # an unquantised model stays on the CPU until the Trainer moves it
    torch.cuda.synchronize()
    gib = (torch.cuda.memory_allocated() - before) / 2**30
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return round(gib, 3)


def run(path: Path) -> dict:
    import torch

    from host.config import load_config
    from host.train import train

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cfg, pm, warnings = load_config(path)
    start = time.time()
    summary = train(cfg, pm, warnings)
    summary["wall_s"] = round(time.time() - start, 1)
    history = json.loads((Path(cfg.output_dir) / "run_summary.json").read_text())
    return {**summary, **{k: history[k] for k in ("first_train_loss", "final_train_loss")}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--variants", default="lora-bf16,qlora-nf4")
    ap.add_argument("--work", default="/tmp/bench_qlora")
    ap.add_argument("--tiny", action="store_true", help="toy size on CPU: checks the script, measures nothing")
    args = ap.parse_args()
    names = args.variants.split(",")
    for n in names:
        if n not in VARIANTS:
            raise SystemExit(f"unknown variant {n!r}: one of {', '.join(VARIANTS)}")
    import torch

    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    build(work, args.layers, args.tiny)
    rows = []
    for name in names:
        path = config(work, name, args.seq, args.steps, args.batch, args.gradient_checkpointing)
        w = weights_gib(path)
        s = run(path)
        rows.append({"variant": name, "weights_gib": w, "peak_gib": s["peak_memory_gib"],
                     "steady_tokens_per_s": s["steady_tokens_per_s"], "first_loss": s["first_train_loss"],
                     "final_loss": s["final_train_loss"], "steps": s["steps"], "wall_s": s["wall_s"]})
        print(json.dumps(rows[-1]), flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    base = rows[0]
    print(f"\n{device}; Qwen3-8B widths, {args.layers} layers, vocab 4096, seq {args.seq}, batch {args.batch}, "
          f"LoRA r=16 on all linear layers, {args.steps} steps, gradient checkpointing {args.gradient_checkpointing}\n")
    print("| variant | weights GiB | vs bf16 | peak GiB | vs bf16 | tokens/s | loss first -> last |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        def ratio(k):
            return f"{r[k] / base[k]:.2f}x" if r[k] and base[k] else "-"
        print(f"| {r['variant']} | {r['weights_gib']} | {ratio('weights_gib')} | {r['peak_gib']} | {ratio('peak_gib')} "
              f"| {r['steady_tokens_per_s']} | {r['first_loss']:.3f} -> {r['final_loss']:.3f} |")
    if not args.tiny:
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"bench_qlora_{device.replace(' ', '_')}.json"
        meta = {"device": device, "torch": torch.__version__, "args": vars(args),
                "date": time.strftime("%Y-%m-%d", time.gmtime())}
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
