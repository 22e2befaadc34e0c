"""GPU check: loss and gradients with the liger plugin vs the same weights without it (one process).

Each case builds the model through the host's real lifecycle (``host.model.build``: pre_model_load,
from_pretrained, peft, post_model_build), runs one forward+backward on a fixed batch and compares
the loss and every trainable gradient with the plain model's. Reported per case: relative loss
difference, and the worst per-parameter relative gradient difference ``||g - g_ref|| / ||g_ref||``,
in bf16 (the training dtype), plus both bf16 runs' gradient error against the plain model in fp32.
Pass: loss within 1e-3 relative of plain bf16, and liger's bf16 gradient error against fp32 (worst
tensor, and over all gradients) no larger than the plain bf16 model's own (+1e-3): two bf16 runs of
one model in different kernel orders already differ by more than 1e-3 per tensor, so that is the
meaningful bound for gradients. "plain" includes the case's other plugins (scattermoe owns the MoE
experts on both sides, so the difference is liger's); the fp32 reference is plain transformers.

Usage: python bench/gpu_check.py [--real a,b] [--tiny qwen3,...] [--out DIR]   (writes gpu_check.json)
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


SLIDE_FULL = ["sliding_attention", "full_attention"]
LORA_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
#: real-width cases: name -> (model_type, config overrides (2 layers, the real vocabulary), plugins both sides
#: share, liger keys, LoRA). Widths: Qwen3-30B-A3B (layer 0 dense via mlp_only_layers, so liger's SwiGLU and
#: scattermoe's experts both run), gpt-oss-20b, Gemma 4 31B (GeGLU, soft-capped loss), Gemma 4 26B-A4B
#: (scattermoe experts + dense GeGLU MLP beside them), Qwen3.5-35B-A3B (linear + full attention, shared expert).
REAL = {
    "qwen3_moe-30b-a3b": ("qwen3_moe", dict(vocab_size=151936, hidden_size=2048, num_hidden_layers=2,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                          num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144, mlp_only_layers=[0]),
                          ["scattermoe"], ["liger_rope", "liger_rms_norm", "liger_glu_activation", FLCE],
                          {"lora_target_modules": LORA_ATTN, "lora_target_parameters": ["mlp.experts.gate_up_proj",
                                                                                         "mlp.experts.down_proj"]}),
    "gpt_oss-20b": ("gpt_oss", dict(vocab_size=201088, num_hidden_layers=2, num_local_experts=32, num_experts_per_tok=4,
                    layer_types=SLIDE_FULL), [], ["liger_rope", "liger_rms_norm", FLCE],
                    {"lora_target_modules": LORA_ATTN, "lora_target_parameters": ["mlp.experts.gate_up_proj",
                                                                                   "mlp.experts.down_proj"]}),
    "gemma4-31b": ("gemma4_text", dict(vocab_size=262144, hidden_size=5376, intermediate_size=21504, num_hidden_layers=2,
                   num_attention_heads=32, num_key_value_heads=16, head_dim=256, global_head_dim=512,
                   sliding_window=1024, layer_types=SLIDE_FULL, hidden_size_per_layer_input=0, num_kv_shared_layers=0,
                   final_logit_softcapping=30.0), [], ["liger_rms_norm", "liger_glu_activation", FLCE],
                   {"lora_target_modules": LORA_ATTN + ["gate_proj", "up_proj", "down_proj"]}),
    "gemma4-26b-a4b": ("gemma4_text", dict(vocab_size=262144, hidden_size=2816, intermediate_size=2112,
                       num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                       global_head_dim=512, sliding_window=1024, layer_types=SLIDE_FULL, hidden_size_per_layer_input=0,
                       num_kv_shared_layers=0, final_logit_softcapping=30.0, enable_moe_block=True, num_experts=128,
                       top_k_experts=8, moe_intermediate_size=704), ["scattermoe"],
                       ["liger_rms_norm", "liger_glu_activation", FLCE],
                       {"lora_target_modules": LORA_ATTN, "lora_target_parameters": ["experts.gate_up_proj",
                                                                                      "experts.down_proj"]}),
    "qwen3_5_moe-35b-a3b": ("qwen3_5_moe_text", dict(vocab_size=248320, num_hidden_layers=2,
                            layer_types=["linear_attention", "full_attention"]), ["scattermoe"],
                            ["liger_rms_norm", "liger_glu_activation", FLCE],
                            {"lora_target_modules": LORA_ATTN, "lora_target_parameters": ["mlp.experts.gate_up_proj",
                                                                                           "mlp.experts.down_proj"]}),
}


def build_real(name: str, root: Path, tok) -> Path:
    """A random bf16 model of the case's real width (2 layers), built on the GPU and saved."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, dims, *_ = REAL[name]
    path = root / name
    cfg = AutoConfig.for_model(model_type, **{k: v for k, v in dims.items()})
    cfg.eos_token_id, cfg.pad_token_id = tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return path


def build_dir(model_type: str, root: Path, tok, **dims) -> Path:
    from host.testing import build_model

    path = root / f"{model_type}-tiny"
    if (path / "config.json").exists():
        return path
    if model_type == "gemma4_text":  # host.testing.tiny_config cannot shrink Gemma 4: build from the constructor
        from transformers import AutoModelForCausalLM, Gemma4TextConfig

        cfg = Gemma4TextConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, global_head_dim=32, sliding_window=8,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"], hidden_size_per_layer_input=0,
            num_kv_shared_layers=0, max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id, final_logit_softcapping=30.0)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
        tok.save_pretrained(path)
        return path
    build_model(model_type, path, tok)
    return path


def run_case(path: Path, plugins: list[str], keys: dict, dtype: torch.dtype, batch: dict, lora: dict | None):
    from host.config import validate
    from host.model import build
    from host.plugins import build_plugin_manager

    data = {"base_model": str(path), "plugins": plugins, "bf16": dtype == torch.bfloat16, **(lora or {}), **keys}
    pm = build_plugin_manager(plugins)
    cfg = validate(data, pm)
    torch.manual_seed(0)  # peft draws lora_A from the global generator: the same A in every run
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
    """(loss rel, worst per-tensor grad rel, its name, all-gradients rel: ||g - g_ref|| / ||g_ref|| over every tensor)"""
    (lg, gg), (lr, gr) = got, ref
    assert gg.keys() == gr.keys() and gr, (len(gg), len(gr), sorted(set(gg) ^ set(gr))[:4])
    worst = max(gr, key=lambda n: rel(gg[n], gr[n]))
    diff = sum(float((gg[n] - gr[n]).norm()) ** 2 for n in gr) ** 0.5
    total = sum(float(gr[n].norm()) ** 2 for n in gr) ** 0.5
    return abs(lg - lr) / abs(lr), rel(gg[worst], gr[worst]), worst, diff / max(total, 1e-30)


def check(path: Path, ref_plugins: list[str], keys: dict, batch: dict, lora_cfg: dict | None, fp32: bool) -> dict:
    """fp32 plain, bf16 plain (ref_plugins), bf16 with liger on top: loss and gradient errors. With ``fp32``
    (cases without other plugins) also liger in fp32 against plain fp32, where 1e-3 is a meaningful bound."""
    ref32 = run_case(path, [], {}, torch.float32, batch, lora_cfg)
    extra = {}
    if fp32:
        l32, g32, w32, all32 = compare(run_case(path, ["liger"], keys, torch.float32, batch, lora_cfg), ref32)
        extra = {"fp32_loss_rel": l32, "fp32_grad_rel": g32, "fp32_worst_param": w32, "fp32_all_grads_rel": all32,
                 "fp32_ok": l32 <= 1e-3 and all32 <= 1e-3}
    ref16 = run_case(path, ref_plugins, {}, torch.bfloat16, batch, lora_cfg)
    got16 = run_case(path, [*ref_plugins, "liger"], keys, torch.bfloat16, batch, lora_cfg)
    l16, g16, w16, all16 = compare(got16, ref16)
    lplain, plain_noise, _, plain_all = compare(ref16, ref32)
    lliger, liger_noise, _, liger_all = compare(got16, ref32)
    # the loss: within 1e-3 of plain bf16, or closer to fp32 than plain bf16 is (Gemma 4's soft-capped bf16
    # logits put plain bf16 ~1.7e-3 from fp32; liger's fused loss soft-caps in fp32)
    ok = ((l16 <= 1e-3 or lliger <= lplain) and liger_noise <= plain_noise + 1e-3 and liger_all <= plain_all + 1e-3
          and extra.get("fp32_ok", True))
    return {"bf16_loss_rel": l16, "bf16_grad_rel_vs_plain_bf16": g16, "bf16_all_grads_rel_vs_plain_bf16": all16,
            "plain_bf16_grad_err_vs_fp32": plain_noise, "liger_bf16_grad_err_vs_fp32": liger_noise,
            "plain_bf16_all_grads_err_vs_fp32": plain_all, "liger_bf16_all_grads_err_vs_fp32": liger_all,
            "liger_bf16_loss_err_vs_fp32": lliger, "plain_bf16_loss_err_vs_fp32": lplain, "worst_param": w16, "ok": ok,
            **extra}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")))
    ap.add_argument("--real", default=",".join(REAL), help="real-width cases (comma list; empty: none)")
    ap.add_argument("--tiny", default="", help="tiny families, all supported keys on (e.g. qwen3,gemma4_text)")
    ap.add_argument("--seq", type=int, default=1024)
    args = ap.parse_args()
    from host.testing import build_tokenizer, sample_texts
    from host_plugin_liger.families import FAMILIES, supported_keys

    root = Path(tempfile.mkdtemp())
    tok = build_tokenizer(sample_texts()[:200], root / "tok", vocab_size=512)
    out_path = args.out / "gpu_check.json"
    rows = []
    cases = [(n, "real") for n in args.real.split(",") if n] + [(t, "tiny") for t in args.tiny.split(",") if t]
    for name, width in cases:
        t0 = time.time()
        try:
            if width == "real":
                model_type, dims, ref_plugins, key_names, lora_keys = REAL[name]
                path = build_real(name, root, tok)
                lora_cfg = {"adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, **lora_keys}
                seq = args.seq
            else:
                model_type, ref_plugins, lora_cfg, seq = name, [], None, 64
                key_names = [k for k in KEYS if k in supported_keys(FAMILIES[name])]
                path = build_dir(name, root, tok)
            keys = dict.fromkeys(key_names, True)
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(0, 512, (2, seq), generator=g)
            labels = ids.clone()
            labels[0, : seq // 4] = -100
            row = {"case": name, "model_type": model_type, "width": width, "seq": seq, "plugins": ref_plugins,
                   "keys": sorted(keys), "lora": bool(lora_cfg)}
            row.update(check(path, ref_plugins, keys, {"input_ids": ids, "labels": labels}, lora_cfg,
                             fp32=not ref_plugins and width == "real"))
        except Exception as exc:  # report and continue: one broken family must not hide the others
            import traceback

            traceback.print_exc()
            row = {"case": name, "model_type": name, "width": width, "ok": False,
                   "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        out_path.write_text(json.dumps({"device": torch.cuda.get_device_name(0), "rows": rows}, indent=1))
    print(f"\n{torch.cuda.get_device_name(0)}: bf16, batch 2 x seq {args.seq} (real) / 64 (tiny), one forward+backward")
    print(f"{'case':<22}{'plugins':<18}{'loss rel':>9}{'grad rel':>9}{'all grads':>10}{'loss16/32 plain':>16}"
          f"{'liger':>8}{'grads16/32 plain':>17}{'liger':>8}{'fp32 loss':>10}{'fp32 grads':>11}  ok")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:<22} ERROR {r['error']}")
            continue
        f32 = (f"{r['fp32_loss_rel']:>10.1e}{r['fp32_all_grads_rel']:>11.1e}" if "fp32_loss_rel" in r else f"{'-':>10}{'-':>11}")
        print(f"{r['case']:<22}{'+'.join(r['plugins'] + ['liger']):<18}{r['bf16_loss_rel']:>9.1e}"
              f"{r['bf16_grad_rel_vs_plain_bf16']:>9.1e}{r['bf16_all_grads_rel_vs_plain_bf16']:>10.1e}"
              f"{r['plain_bf16_loss_err_vs_fp32']:>16.1e}{r['liger_bf16_loss_err_vs_fp32']:>8.1e}"
              f"{r['plain_bf16_all_grads_err_vs_fp32']:>17.1e}{r['liger_bf16_all_grads_err_vs_fp32']:>8.1e}{f32}  {r['ok']}")


if __name__ == "__main__":
    main()
