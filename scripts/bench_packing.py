"""Sample-packing benchmark: non-pad (useful) tokens/s with and without `sample_packing` on chat data
whose lengths are long-tailed, through the real host training path (config validation, data
preparation, packing, HF Trainer) in one process, one `host.train.train` call per variant.

Model: real-width Qwen3-MoE (Qwen3-30B-A3B widths: H=2048, E=128, I=768, top-8; random weights) cut
to --layers layers, LoRA r=16 on attention and experts, bf16, sdpa, the `scattermoe` plugin.
Data: synthetic conversations (user + assistant turns of stdlib docstring text), rendered with the
`chat_template` type; token lengths lognormal (median ~300, sigma --sigma), capped at sequence_len 4096.
Variants (same data, same number of optimizer steps):
  padded-max   --packed-batch rows, each padded to sequence_len (pad_to_sequence_len: true): the packed shape
  padded-dyn   --batch rows, padded to the longest row of the batch (the host's default collator)
  packed       sample_packing: true, --packed-batch bins of sequence_len
Numbers are each run's run_summary.json: steady_tokens_per_s counts non-pad tokens only (the Trainer's
include_num_input_tokens_seen="non_padding") over a device-synchronised window of the second half.

Usage (one GPU): python scripts/bench_packing.py [--layers 2] [--steps 16] [--batch 8] [--packed-batch 2]
Writes bench_packing.json to --out (default $OUT or scripts/results); the README's run is
scripts/results/h200-2026-11-30-packing.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import time
from pathlib import Path

import yaml

SEQ = 4096


def isolation_check(tok) -> float:
    """Max |logit change| of the other documents in a packed row when one document is changed (tiny
    fp32 model, sdpa, this machine's transformers): 0 up to rounding when documents are isolated."""
    import torch
    from transformers import AutoModelForCausalLM

    from host.packing import packed_collator, prepare_model
    from host.testing import tiny_config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3_moe", len(tok)), attn_implementation="sdpa").to(device).eval()
    prepare_model(model)
    docs = [list(range(10 + 7 * i, 10 + 7 * i + n)) for i, n in enumerate((23, 17, 31))]
    row = {"input_ids": sum(docs, []), "labels": sum(docs, []), "position_ids": [p for d in docs for p in range(len(d))]}
    changed = dict(row, input_ids=list(row["input_ids"]))
    a, b = len(docs[0]), len(docs[0]) + len(docs[1])
    changed["input_ids"][a:b] = [t + 50 for t in changed["input_ids"][a:b]]
    collate = packed_collator(tok)
    with torch.no_grad():
        x = model(**{k: v.to(device) for k, v in collate([row]).items()}).logits[0]
        y = model(**{k: v.to(device) for k, v in collate([changed]).items()}).logits[0]
    keep = torch.ones(x.shape[0], dtype=torch.bool, device=device)
    keep[a:b] = False
    return (x[keep] - y[keep]).abs().max().item()


def build_model(path: Path, layers: int, smoke: bool = False):
    import torch
    from transformers import AutoModelForCausalLM

    from host.testing import build_tokenizer, sample_texts, tiny_config

    tok = build_tokenizer(sample_texts(), path, vocab_size=4096)
    if (path / "config.json").exists():
        return tok
    real = {} if smoke else dict(  # Qwen3-30B-A3B widths
        hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144,
    )
    cfg = tiny_config("qwen3_moe", len(tok), num_hidden_layers=layers, max_position_embeddings=SEQ, **real)
    cfg.eos_token_id, cfg.pad_token_id = tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path)
    return tok


def write_chat_data(path: Path, tok, n: int, median: int, sigma: float, seed: int) -> list[int]:
    """Conversations whose rendered token lengths follow lognormal(median, sigma), capped below SEQ."""
    from host.testing import sample_texts

    words = " ".join(sample_texts()).split()
    per_word = len(tok(" ".join(words[:2000]), add_special_tokens=False)["input_ids"]) / 2000
    rng = random.Random(seed)
    rows, targets = [], []
    for _ in range(n):
        target = min(int(SEQ * 0.8), max(16, int(rng.lognormvariate(0, sigma) * median)))
        targets.append(target)
        n_words = max(4, int(target / per_word))
        start = rng.randrange(0, len(words) - n_words)
        text = words[start : start + n_words]
        cut = max(2, len(text) // 3)  # a third prompt, two thirds answer
        rows.append({"messages": [{"role": "user", "content": " ".join(text[:cut])},
                                  {"role": "assistant", "content": " ".join(text[cut:])}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return targets


def config(work: Path, name: str, steps: int, batch: int, packed: bool, pad_max: bool) -> Path:
    cfg = {
        "base_model": str(work / "model"),
        "plugins": ["scattermoe"],
        "datasets": [{"path": str(work / "chat.jsonl"), "type": "chat_template"}],
        "dataset_prepared_path": str(work / "prepared"),
        "sequence_len": SEQ,
        "excess_length_strategy": "truncate",
        "sample_packing": packed,
        "pad_to_sequence_len": pad_max,
        "attn_implementation": "sdpa",
        "adapter": "lora",
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "lora_target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        "micro_batch_size": batch,
        "max_steps": steps,
        "learning_rate": 1e-4,
        "lr_scheduler": "constant",
        "bf16": True,
        "logging_steps": 4,
        "save_steps": 100000,
        "output_dir": str(work / "runs" / name),
        "seed": 0,
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_variant(cfg_path: Path) -> dict:
    import torch

    from host.config import load_config
    from host.train import train

    cfg, pm, warnings = load_config(cfg_path)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t = time.time()
    summary = train(cfg, pm, warnings)
    summary["process_s"] = round(time.time() - t, 1)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return summary


def _at_median(r: dict) -> float:
    """Useful tokens/s at the median step time: insensitive to the few steps that wait for a Triton
    autotune or compile of a new shape (dynamic padding meets a new shape often in a short run)."""
    return r["tokens"] / r["steps"] / r["median_step_s"] if r.get("median_step_s") else 0.0


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _dynamic_fill(lengths: list[int], batch: int, trials: int = 20) -> float:
    """Non-pad fraction of random batches of ``batch`` rows, each padded to its longest row."""
    rng, used, slots = random.Random(0), 0, 0
    for _ in range(trials):
        order = rng.sample(lengths, len(lengths))
        for i in range(0, len(order) - batch + 1, batch):
            chunk = order[i : i + batch]
            used, slots = used + sum(chunk), slots + max(chunk) * batch
    return used / slots


def main() -> None:
    import logging

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8, help="micro_batch_size (rows) of the padded variants")
    ap.add_argument("--packed-batch", type=int, default=2, help="micro_batch_size (bins) of the packed variant")
    ap.add_argument("--conversations", type=int, default=800)
    ap.add_argument("--median", type=int, default=300)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--variants", default="padded-max,padded-dyn,packed")
    ap.add_argument("--smoke", action="store_true", help="tiny widths, for a CPU check of the script")
    ap.add_argument("--work", type=Path, default=Path("/tmp/host-packing-bench"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or Path(__file__).parent / "results"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("host.packing").setLevel(logging.INFO)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    t0 = time.time()
    tok = build_model(args.work / "model", args.layers, args.smoke)
    leak = isolation_check(tok)
    print(f"isolation check: max change of other documents' logits {leak:.2e}", flush=True)
    write_chat_data(args.work / "chat.jsonl", tok, args.conversations, args.median, args.sigma, seed=0)
    print(f"model + data: {time.time() - t0:.1f} s", flush=True)

    specs = {
        "padded-max": (args.packed_batch, False, True),  # the packed run's shape: [batch, 4096]
        "padded-dyn": (args.batch, False, False),
        "packed": (args.packed_batch, True, False),
    }
    results = []
    for name in args.variants.split(","):
        batch, packed, pad_max = specs[name]
        try:
            summary = run_variant(config(args.work, name, args.steps, batch, packed, pad_max))
        except Exception as exc:  # one failed variant (e.g. out of memory) must not lose the others
            summary = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        results.append({"name": name, "micro_batch_size": batch, **summary})
        print(json.dumps(results[-1]), flush=True)

    from datasets import load_from_disk  # token lengths as the run saw them (the prepared cache)

    prepared = next((args.work / "prepared").glob("*/data"))
    lengths = [len(x) for x in load_from_disk(str(prepared))["input_ids"]]
    q = statistics.quantiles(lengths, n=100)
    ok = [r for r in results if "error" not in r]
    for r in ok:
        if r["name"] == "padded-dyn":  # expected over random batches of the prepared lengths (not measured)
            r["non_pad_fraction"] = round(_dynamic_fill(lengths, r["micro_batch_size"]), 4)
        else:
            r["non_pad_fraction"] = round(r["tokens"] / (r["steps"] * r["micro_batch_size"] * SEQ), 4)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    widths = "tiny widths (smoke)" if args.smoke else "H=2048 E=128 I=768 k=8"
    head = (f"{device}, {time.strftime('%Y-%m-%d')}, Qwen3-MoE {widths}, {args.layers} layers, LoRA r=16, "
            f"bf16, sdpa, scattermoe, sequence_len {SEQ}, {args.steps} steps; {len(lengths)} conversations, tokens "
            f"median {statistics.median(lengths):.0f}, p90 {q[89]:.0f}, p99 {q[98]:.0f}, max {max(lengths)}")
    (args.out / "bench_packing.json").write_text(json.dumps({"header": head, "isolation_max_abs": leak, "lengths": {
        "median": statistics.median(lengths), "p90": q[89], "p99": q[98], "max": max(lengths), "n": len(lengths)},
        "results": results}, indent=1) + "\n")

    print("\n" + head)
    print(f"{'variant':<11} {'batch':>9} {'non-pad fraction':>17} {'useful tokens/s':>16} {'vs padded-max':>14} "
          f"{'vs padded-dyn':>14} {'at median step':>15} {'peak GiB':>9} {'final loss':>10}")
    by = {r["name"]: r for r in ok}
    for r in results:
        if "error" in r:
            print(f"{r['name']:<11} ERROR {r['error']}")
            continue
        rel = [f"{r['steady_tokens_per_s'] / by[b]['steady_tokens_per_s']:.2f}x" if b in by else "-"
               for b in ("padded-max", "padded-dyn")]
        unit = "bins" if r["name"] == "packed" else "rows"
        print(f"{r['name']:<11} {r['micro_batch_size']:>4} {unit:<4} {r['non_pad_fraction']:>17.3f} "
              f"{r['steady_tokens_per_s'] or 0:>16.0f} {rel[0]:>14} {rel[1]:>14} {_at_median(r):>15.0f} "
              f"{r['peak_memory_gib'] or 0:>9.2f} "
              f"{_num(r['final_train_loss']):>10}")
    print("useful tokens/s: non-pad tokens over the second half (device-synchronised); at median step: the same at "
          "the median step time. padded-dyn's non-pad fraction is the expectation over random batches of these lengths.")
    print(f"isolation check (tiny fp32 model, sdpa): other documents' logits changed by at most {leak:.2e}")

if __name__ == "__main__":
    main()
