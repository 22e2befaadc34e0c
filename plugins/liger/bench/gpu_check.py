"""GPU check: loss and gradients with the liger plugin vs the same weights without it (one process).

Each case builds the model through the host's real lifecycle (``host.model.build``: pre_model_load,
from_pretrained, peft, post_model_build), runs one forward+backward on a fixed batch and compares
the loss and every trainable gradient with the plain model's. Reported per case: relative loss
difference, and the worst per-parameter relative gradient difference ``||g - g_ref|| / ||g_ref||``,
in bf16 (the training dtype), plus both bf16 runs' gradient error against the plain model in fp32.
Pass: loss within 1e-3 relative of plain bf16, and liger's bf16 gradient error against fp32 no larger
than the plain bf16 model's own (+1e-3): two bf16 runs of one model in different kernel orders
already differ by ~1e-3, so that is the meaningful bound for gradients.

Usage: python bench/gpu_check.py [--out DIR]   (writes gpu_check.json)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path

import torch

FLCE = "liger_fused_linear_cross_entropy"
KEYS = {"liger_rope": True, "liger_rms_norm": True, "liger_glu_activation": True, FLCE: True}


def build_dir(model_type: str, root: Path, tok, **dims) -> Path:
    from host.testing import build_model

    path = root / f"{model_type}-{'real' if dims else 'tiny'}"
    if (path / "config.json").exists():
        return path
    if model_type == "gemma4_text":  # host.testing.tiny_config cannot shrink Gemma 4: build from the constructor
        from transformers import AutoModelForCausalLM, Gemma4TextConfig

        cfg = Gemma4TextConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, global_head_dim=32, sliding_window=8,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"], hidden_size_per_layer_input=0,
            num_kv_shared_layers=0, max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
        tok.save_pretrained(path)
        return path
    if not dims:
        build_model(model_type, path, tok)
        return path
    from transformers import AutoModelForCausalLM

    from host.testing import tiny_config

    cfg = tiny_config(model_type, len(tok), **dims)
    cfg.eos_token_id, cfg.pad_token_id = tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    with torch.device("cuda"):  # real width: build on the GPU in bf16 (a CPU fp32 build takes minutes)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    del model
    return path


def run_case(path: Path, plugins: list[str], keys: dict, dtype: torch.dtype, batch: dict, lora: dict | None):
    from host.config import validate
    from host.model import build
    from host.plugins import build_plugin_manager

    data = {"base_model": str(path), "plugins": plugins, "bf16": dtype == torch.bfloat16, **(lora or {}), **keys}
    pm = build_plugin_manager(plugins)
    cfg = validate(data, pm)
    model, _, _ = build(cfg, pm)
    model.to("cuda").train()
    for n, p in model.named_parameters():
        if "lora_B" in n:  # zero-initialised: give LoRA a visible update so its gradients mean something
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator(device=p.device).manual_seed(len(n)))
    out = model(**{k: v.cuda() for k, v in batch.items()})
    out.loss.backward()
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    loss = out.loss.float().item()
    from host_plugin_liger import patching

    patching.restore()
    del model, out
    gc.collect()
    torch.cuda.empty_cache()
    return loss, grads


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def compare(got, ref):
    (lg, gg), (lr, gr) = got, ref
    assert gg.keys() == gr.keys() and gr, (len(gg), len(gr))
    worst = max(gr, key=lambda n: rel(gg[n], gr[n]))
    return abs(lg - lr) / abs(lr), rel(gg[worst], gr[worst]), worst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")))
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--families", default="qwen3,qwen3_moe,gpt_oss,gemma4_text,qwen3_5_moe_text,llama,mixtral,gemma3_text")
    args = ap.parse_args()
    from host.testing import build_tokenizer, sample_texts
    from host_plugin_liger.families import FAMILIES, supported_keys

    root = Path(tempfile.mkdtemp())
    tok = build_tokenizer(sample_texts()[:200], root / "tok", vocab_size=512)
    cases = [(t, {}, None) for t in args.families.split(",")]
    lora = {"adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            "lora_target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}
    cases.append(("qwen3", {}, {**lora, "lora_target_modules": ["q_proj", "v_proj", "lm_head"],
                                "lora_target_parameters": None}))  # LoRA on lm_head
    if not args.skip_real:
        real = dict(hidden_size=2048, num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                    num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, vocab_size=151936)
        cases.append(("qwen3_moe", real, lora))
    rows = []
    for model_type, dims, lora_cfg in cases:
        family = FAMILIES[model_type]
        keys = {k: v for k, v in KEYS.items() if k in supported_keys(family)}
        if dims:  # real width: the bench's combination (liger's MoE experts are not what scattermoe users run)
            keys.pop("liger_glu_activation", None)
        t0 = time.time()
        try:
            path = build_dir(model_type, root, tok, **dims)
            vocab = dims.get("vocab_size", 512)
            g = torch.Generator().manual_seed(0)
            seq = 1024 if dims else 64
            ids = torch.randint(0, min(vocab, 512), (2, seq), generator=g)
            labels = ids.clone()
            labels[0, : seq // 4] = -100
            batch = {"input_ids": ids, "labels": labels}
            ref32 = run_case(path, [], {}, torch.float32, batch, lora_cfg)
            ref16 = run_case(path, [], {}, torch.bfloat16, batch, lora_cfg)
            got16 = run_case(path, ["liger"], keys, torch.bfloat16, batch, lora_cfg)
            l16, g16, w16 = compare(got16, ref16)
            _, plain_noise, _ = compare(ref16, ref32)
            lliger, liger_noise, _ = compare(got16, ref32)
            ok = l16 <= 1e-3 and liger_noise <= plain_noise + 1e-3
            rows.append({"model_type": model_type, "width": "real" if dims else "tiny",
                         "lora": "lm_head" if lora_cfg and "lm_head" in lora_cfg["lora_target_modules"] else bool(lora_cfg),
                         "keys": sorted(keys), "bf16_loss_rel": l16, "bf16_grad_rel_vs_plain_bf16": g16,
                         "plain_bf16_grad_err_vs_fp32": plain_noise, "liger_bf16_grad_err_vs_fp32": liger_noise,
                         "liger_bf16_loss_err_vs_fp32": lliger, "worst_param": w16, "ok": ok,
                         "seconds": round(time.time() - t0, 1)})
        except Exception as exc:  # report and continue: one broken family must not hide the others
            rows.append({"model_type": model_type, "width": "real" if dims else "tiny", "ok": False,
                         "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        print(json.dumps(rows[-1]), flush=True)
    (args.out / "gpu_check.json").write_text(json.dumps({"device": torch.cuda.get_device_name(0), "rows": rows}, indent=1))
    print(f"\n{'model':<18}{'width':<6}{'lora':<9}{'loss rel':>10}{'grad rel':>10}{'plain16 vs fp32':>17}"
          f"{'liger16 vs fp32':>17}  ok")
    for r in rows:
        if "error" in r:
            print(f"{r['model_type']:<18}{r['width']:<6} ERROR {r['error']}")
            continue
        print(f"{r['model_type']:<18}{r['width']:<6}{str(r['lora']):<9}{r['bf16_loss_rel']:>10.1e}"
              f"{r['bf16_grad_rel_vs_plain_bf16']:>10.1e}{r['plain_bf16_grad_err_vs_fp32']:>17.1e}"
              f"{r['liger_bf16_grad_err_vs_fp32']:>17.1e}  {r['ok']}")

if __name__ == "__main__":
    main()
