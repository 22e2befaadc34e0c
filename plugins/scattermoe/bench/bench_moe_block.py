"""Benchmark one MoE block, forward + backward, bf16, LoRA r=16 on the expert parameters.

(a) transformers ``grouped_mm`` experts + peft ``target_parameters`` (peft folds W + B·A per step)
(b) this plugin's ``scattermoe`` experts (Triton, LoRA consumed as factors), with the LoRA forward
    path its default threshold picks; both paths (fused / split) are timed and shown too

Same block, same weights, same routing; base weights and router frozen, the input requires grad
(as inside a network). Prints ms (median of steps each synchronised, so host launch overhead
shows; and "b2b", the mean of back-to-back steps, as in a training loop), peak GiB of the step (allocated on top of the weights),
speed-up, achieved TFLOP/s of the useful math vs the device's dense bf16 peak, and the relative
error of (b) vs (a) on the output and the LoRA gradients. The table is printed last.

Usage: python bench/bench_moe_block.py [--tokens 4096] [--rank 16] [--shapes Qwen3-30B-A3B ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
from torch import nn

SHAPES = {  # name: (family, E, H, I, top_k)
    "Qwen3-30B-A3B": ("qwen3", 128, 2048, 768, 8),
    "OLMoE-1B-7B": ("qwen3", 64, 2048, 1024, 8),
    "Mixtral-8x7B": ("qwen3", 8, 4096, 14336, 2),
    "Qwen3.5-35B-A3B": ("qwen3", 256, 2048, 512, 8),
    "gpt-oss-20b": ("gpt_oss", 32, 2880, 2880, 4),
}
TARGET_MS = {"Qwen3-30B-A3B": 1.5, "OLMoE-1B-7B": 1.6, "Mixtral-8x7B": 10.0}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H20": 148.0, "A100": 312.0, "B200": 2250.0, "L40S": 362.0}


def device_peak() -> float:
    name = torch.cuda.get_device_name()
    if "H100" in name and "PCIe" in name:
        return 756.0
    for key, val in PEAK_BF16_TFLOPS.items():
        if key in name:
            return val
    return float("nan")


def build_block(family, E, H, I, k, rank):
    from peft import LoraConfig, inject_adapter_in_model

    if family == "gpt_oss":
        from transformers import GptOssConfig
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

        cfg = GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k)
        block = GptOssMLP(cfg)
    else:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=k, norm_topk_prob=True)
        block = Qwen3MoeSparseMoeBlock(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.02 if "bias" not in name else 0.01))
    holder = nn.Module()
    holder.mlp = block.to("cuda", torch.bfloat16)
    lcfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                      init_lora_weights=False)
    inject_adapter_in_model(lcfg, holder)
    for name, p in holder.named_parameters():
        p.requires_grad_("lora_" in name)
    holder.to("cuda")
    return holder, cfg


def flops(E, H, I, k, T, rank):
    """Useful FLOPs of fwd + bwd with a frozen base: base fwd + dX, LoRA fwd + dX + dA + dB."""
    L = T * k
    base = 2 * L * (H * 2 * I + I * H)
    lora = 2 * L * rank * ((H + 2 * I) + (I + H))
    return 2 * base + 4 * lora


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--json", default=os.environ.get("OUT", ".") + "/bench_moe_block.json")
    args = ap.parse_args()

    from host_plugin_scattermoe import experts, lora

    experts.register()
    dev = torch.cuda.get_device_name()
    peak = device_peak()
    T, R = args.tokens, args.rank
    rows = []
    for name in args.shapes:
        family, E, H, I, k = SHAPES[name]
        torch.cuda.empty_cache()
        holder, cfg = build_block(family, E, H, I, k, R)
        lora.attach(holder)
        lparams = [p for n, p in holder.named_parameters() if p.requires_grad]
        torch.manual_seed(1)
        x = torch.randn(1, T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        gout = torch.randn(1, T, H, device="cuda", dtype=torch.bfloat16)

        def step():
            out = holder.mlp(x)
            out = out[0] if isinstance(out, tuple) else out
            out.backward(gout)
            return out

        res = {}
        from host_plugin_scattermoe import ops

        for impl in ("grouped_mm", "scattermoe-fused", "scattermoe-split"):
            cfg._experts_implementation = impl.split("-")[0]
            ops.SETTINGS["fused_lora"] = impl != "scattermoe-split"
            ops.SETTINGS["split_threshold"] = 1 << 62  # fused unless fused_lora is off
            for _ in range(3):  # warm-up (Triton autotune happens here)
                step()
            x.grad = None
            for p in lparams:
                p.grad = None
            torch.cuda.synchronize()
            out = step().detach().float()
            grads = [p.grad.detach().float().clone() for p in lparams] + [x.grad.detach().float().clone()]
            times = []
            for _ in range(args.iters):
                x.grad = None
                for p in lparams:
                    p.grad = None
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                step()
                e.record()
                torch.cuda.synchronize()
                times.append(s.elapsed_time(e))
            times.sort()
            # Back-to-back: the CPU enqueues the next step while the GPU runs (as in training), so
            # host-side launch overhead is hidden wherever the GPU is the bottleneck.
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(args.iters):
                step()
            e.record()
            torch.cuda.synchronize()
            t_b2b = s.elapsed_time(e) / args.iters
            x.grad = None
            for p in lparams:
                p.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peak_mem = (torch.cuda.max_memory_allocated() - base_mem) / 2**30
            res[impl] = (times[len(times) // 2], peak_mem, out, grads, t_b2b)
        ops.SETTINGS.update(fused_lora=True, split_threshold=20_000_000)
        auto = "scattermoe-split" if ops.use_split(E, H, 2 * I) else "scattermoe-fused"
        (ta, ma, oa, ga, ba), (tb, mb, ob, gb, bb) = res["grouped_mm"], res[auto]
        t_fused, t_split = res["scattermoe-fused"][0], res["scattermoe-split"][0]
        rel = lambda a, b: ((a - b).norm() / b.norm().clamp_min(1e-12)).item()  # noqa: E731
        err_out = rel(ob, oa)
        err_grad = max(rel(b, a) for a, b in zip(ga, gb))
        fl = flops(E, H, I, k, T, R)
        row = dict(
            shape=name, E=E, H=H, I=I, k=k, T=T, r=R,
            ms_a=ta, ms_b=tb, b2b_a=ba, b2b_b=bb, ms_fused=t_fused, ms_split=t_split, auto=auto.split("-")[1],
            speedup=ta / tb, gib_a=ma, gib_b=mb,
            tflops_b=fl / tb / 1e9, pct_peak=100 * fl / tb / 1e9 / peak,
            target_ms=TARGET_MS.get(name), err_out=err_out, err_grad=err_grad,
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
        del holder, x, gout, res
    with open(args.json, "w") as f:
        json.dump({"device": dev, "date": datetime.date.today().isoformat(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    print(f"\ndevice: {dev}  peak bf16 {peak:.0f} TFLOP/s  date {datetime.date.today()}  T={T} r={R} bf16 fwd+bwd")
    hdr = f"{'shape':<16}{'E,H,I,k':>20}{'(a) ms':>9}{'(b) ms':>9}{'b2b(a)':>8}{'b2b(b)':>8}{'fused':>7}{'split':>7}{'speedup':>8}{'(a) GiB':>9}{'(b) GiB':>9}{'TFLOP/s':>9}{'%peak':>7}{'target':>8}{'relerr':>9}"
    print(hdr)
    for r in rows:
        tgt = f"{r['target_ms']:.1f}" if r["target_ms"] else "-"
        print(
            f"{r['shape']:<16}{str((r['E'], r['H'], r['I'], r['k'])):>20}{r['ms_a']:>9.2f}{r['ms_b']:>9.2f}"
            f"{r['b2b_a']:>8.2f}{r['b2b_b']:>8.2f}"
            f"{r['ms_fused']:>7.2f}{r['ms_split']:>7.2f}"
            f"{r['speedup']:>7.1f}x{r['gib_a']:>9.2f}{r['gib_b']:>9.2f}{r['tflops_b']:>9.0f}{r['pct_peak']:>6.0f}%"
            f"{tgt:>8}{max(r['err_out'], r['err_grad']):>9.1e}"
        )


if __name__ == "__main__":
    sys.exit(main())
