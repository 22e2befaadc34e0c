"""End-to-end `host train` tokens/s: a 2-layer, real-width Qwen3-MoE (E=128, H=2048, I=768, k=8,
random weights), LoRA r=16 on attention and experts, bf16, with and without the scattermoe plugin (and with ``scattermoe_cuda_graph``).

Usage: python bench/bench_e2e_train.py [--steps 12] [--seq 1024] [--batch 4] [--runs A B ...] [--repeats 3]
(needs host + plugin installed)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# name: (plugins, extra config keys, environment). "scattermoe+before" turns off issue 16's second-session changes
# (the Triton routing sort, the tiled LoRA re-layout, the light tail) for a same-machine before/after.
RUNS = {
    "grouped_mm+peft": ([], {}, {}),
    "scattermoe": (["scattermoe"], {}, {}),
    "scattermoe+graph": (["scattermoe"], {"scattermoe_cuda_graph": True}, {}),
    "scattermoe+before": (["scattermoe"], {}, {"SCATTERMOE_TRITON_ROUTING": "0", "SCATTERMOE_TILED_RELAYOUT": "0",
                                               "SCATTERMOE_LIGHT_TAIL": "0", "SCATTERMOE_GLU_EPILOGUE": "0"}),
    # one switch off at a time (which change moves the step)
    "scattermoe-sort": (["scattermoe"], {}, {"SCATTERMOE_TRITON_ROUTING": "0"}),
    "scattermoe-relayout": (["scattermoe"], {}, {"SCATTERMOE_TILED_RELAYOUT": "0"}),
    "scattermoe-light": (["scattermoe"], {}, {"SCATTERMOE_LIGHT_TAIL": "0"}),
    "scattermoe+gluepi": (["scattermoe"], {}, {"SCATTERMOE_GLU_EPILOGUE": "1"}),
    "scattermoe-router": (["scattermoe"], {"scattermoe_fused_router": False}, {}),  # the model's own router
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--work", default=os.environ.get("OUT", "/tmp") + "/e2e")
    ap.add_argument("--runs", nargs="*", default=["grouped_mm+peft", "scattermoe", "scattermoe+graph"],
                    help=f"any of {', '.join(RUNS)}; name#2 repeats one")
    ap.add_argument("--warmup-steps", type=int, default=3,
                    help="an unreported scattermoe run first (0: none): in two 2026-12-06 calls the first scattermoe "
                         "run of the call read 8-25%% below the next ones (Triton's cold compiles, GPU clocks)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run the list this many times, every other pass in reverse order (A B, B A, A B, ...), and "
                         "report each run's mean: throughput drifts along a call (2026-12-07: the earlier run of a "
                         "pair read faster whichever setting it held), which the alternating order cancels to first "
                         "order")
    args = ap.parse_args()
    if args.repeats > 1:
        args.runs = [f"{r}#{i + 1}" if i else r for i in range(args.repeats)
                     for r in (args.runs if i % 2 == 0 else args.runs[::-1])]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    import torch
    import yaml

    from host.testing import build_tokenizer, sample_texts, write_jsonl

    model_dir = work / "qwen3moe-2l"
    texts = sample_texts()
    if not (model_dir / "config.json").exists():
        from transformers import AutoModelForCausalLM, Qwen3MoeConfig

        tok = build_tokenizer(texts, model_dir, vocab_size=2048)
        cfg = Qwen3MoeConfig(
            vocab_size=len(tok), hidden_size=2048, num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=4,
            head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        model.save_pretrained(model_dir)
        del model
    data = write_jsonl(work / "text.jsonl", [{"text": t} for t in texts * 8])
    results = {}
    warm = ["warmup"] if args.warmup_steps else []
    for name in warm + args.runs:  # "name#2": the same run again (interleave repeats to see the run-to-run spread)
        plugins, extra, env = RUNS["scattermoe" if name == "warmup" else name.split("#")[0]]
        out = work / f"out-{name}"
        cfg = {
            "base_model": str(model_dir), "plugins": plugins,
            "datasets": [{"path": str(data), "type": "completion"}], "sequence_len": args.seq,
            "pad_to_sequence_len": True, "adapter": "lora", "lora_r": 16, "lora_alpha": 32,
            "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            "lora_target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
            "micro_batch_size": args.batch, "max_steps": args.warmup_steps if name == "warmup" else args.steps,
            "learning_rate": 1e-4, "lr_scheduler": "constant",
            "logging_steps": 1, "output_dir": str(out), "bf16": True, "save_steps": 10**6,
        }
        cfg.update(extra)
        if not plugins:
            cfg["experts_implementation"] = "grouped_mm"
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        subprocess.run(["rm", "-rf", str(out)])
        rc = subprocess.run([sys.executable, "-m", "host", "train", str(path)], capture_output=True, text=True,
                            env={**os.environ, **env})
        if rc.returncode != 0:
            print(name, "FAILED", rc.stdout[-2000:], rc.stderr[-3000:])
            results[name] = None
            continue
        for line in rc.stderr.splitlines():  # what the plugins report on the way (e.g. the fused router taking over)
            if "scattermoe:" in line:
                print(f"  {name}: {line[-150:]}")
        if name == "warmup":
            continue
        summary = json.loads((out / "run_summary.json").read_text())
        results[name] = summary
        print(name, json.dumps({k: summary.get(k) for k in ("tokens_per_s", "steady_tokens_per_s", "first_train_loss", "final_train_loss", "steps")}))
    a, b = results.get("grouped_mm+peft"), results.get("scattermoe")
    key = "steady_tokens_per_s" if a and b and a.get("steady_tokens_per_s") and b.get("steady_tokens_per_s") else "tokens_per_s"
    print(f"\n{'run':<18}{'tokens/s':>12}{'steady tok/s':>14}{'first loss':>12}{'final loss':>12}")
    for name, s in results.items():
        if s:
            print(f"{name:<18}{s['tokens_per_s']:>12.0f}{s.get('steady_tokens_per_s') or 0:>14.0f}"
                  f"{s['first_train_loss']:>12.3f}{s['final_train_loss']:>12.3f}")
    for name in [r for r in args.runs if r != "grouped_mm+peft"]:
        b = results.get(name)
        if a and b:
            print(f"speed-up {name} ({key}) {b[key] / a[key]:.2f}x")
    if args.repeats > 1:
        by_run: dict = {}
        for name, r in results.items():
            if r and r.get(key):
                by_run.setdefault(name.split("#")[0], []).append(r[key])
        base = by_run.get("grouped_mm+peft")
        print(f"\nover {args.repeats} alternating passes ({key}): mean, min, max, speed-up of the means")
        for name, v in by_run.items():
            mean = sum(v) / len(v)
            sp = f"{mean / (sum(base) / len(base)):.2f}x" if base else "-"
            print(f"{name:<22}{mean:>12.0f}{min(v):>12.0f}{max(v):>12.0f}{sp:>8}")
    out = Path(os.environ.get("OUT", str(work))) / "bench_e2e_train.json"
    out.write_text(json.dumps({"bench": "bench_e2e_train.py", "runs": results}, indent=1))


if __name__ == "__main__":
    main()
