"""GPU benchmark of the mxfp4 plugin (one run; prints a markdown table last, writes JSON to $OUT).

1. Experts layer fwd+bwd, T=4096 tokens, LoRA r=16 on gate_up_proj and down_proj, at the
   Qwen3-30B-A3B (E=128, H=2048, I=768, k=8), Qwen3.5-35B-A3B (E=256, H=2048, I=512, k=8) and
   gpt-oss-20b (E=32, H=2880, I=2880, k=4, transposed + bias + clamped GLU) shapes, balanced and
   skewed routing, for: transformers grouped_mm + PEFT (bf16 weights), scattermoe bf16, mxfp4
   strategy A (selective dequant), mxfp4 strategy B (fused dequant in the K loop).
   Also checks, at the real shapes and in bf16: A == scattermoe bf16 on the dequantized weights
   (bitwise), B vs that reference (relative error, uniform-scale factor).
2. A gpt-oss-20b-shaped checkpoint (random weights, written in the gpt-oss MXFP4 layout by
   ``checkpoint.write_random_gpt_oss_checkpoint``; depth reduced with --layers) loaded through the
   plugin's hooks onto the GPU: peak memory of the load and of one LoRA training step (T=4096).

Usage: python plugins/mxfp4/bench/bench_mxfp4.py [--iters 10] [--layers 4] [--skip-load]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback

import torch

GiB = 2**30
DEV = "cuda" if torch.cuda.is_available() else "cpu"
T_TOKENS = 4096
SHAPES = {
    "Qwen3-30B-A3B": dict(family="qwen3_moe", E=128, H=2048, I=768, k=8),
    "Qwen3.5-35B-A3B": dict(family="qwen3_moe", E=256, H=2048, I=512, k=8),
    "gpt-oss-20b": dict(family="gpt_oss", E=32, H=2880, I=2880, k=4),
}
TINY = {  # --tiny: a CPU smoke run of the whole script (TRITON_INTERPRET=1)
    "Qwen3-30B-A3B": dict(family="qwen3_moe", E=8, H=64, I=32, k=2),
    "gpt-oss-20b": dict(family="gpt_oss", E=4, H=64, I=64, k=2),
}
DTYPE = torch.bfloat16 if torch.cuda.is_available() else torch.float32
TRAIN_STRATEGY = os.environ.get("MXFP4_BENCH_TRAIN_STRATEGY", "selective")  # fixed, so the step is comparable


def make_experts(family, E, H, I, k):
    if family == "gpt_oss":
        from transformers import GptOssConfig
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

        cfg = GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k)
        cls = GptOssExperts
    else:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

        cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=k)
        cls = Qwen3MoeExperts
    cfg._experts_implementation = "grouped_mm"
    with torch.device(DEV):
        ex = cls(cfg)
    g = torch.Generator(device=DEV).manual_seed(0)
    for n, p in ex.named_parameters():
        p.data = (torch.randn(p.shape, generator=g, device=DEV) * 0.02).to(DTYPE)
        p.requires_grad_(False)
    return ex


class Block(torch.nn.Module):
    def __init__(self, experts):
        super().__init__()
        self.experts = experts


def add_lora(block, r=16):
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(
        LoraConfig(r=r, lora_alpha=2 * r, target_parameters=["experts.gate_up_proj", "experts.down_proj"]), block
    )
    g = torch.Generator(device=DEV).manual_seed(1)
    for n, p in block.named_parameters():
        if "lora_" in n:
            p.data = (torch.randn(p.shape, generator=g, device=DEV) * 0.02).to(DTYPE)
            p.requires_grad_(True)
    return block


def routing(T, E, k, kind, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    if kind == "balanced":
        idx = torch.rand(T, E, generator=g, device=DEV).topk(k, dim=-1).indices
    else:  # skewed: Zipf-like expert popularity, p_e ~ (e+1)^-1.2
        p = (torch.arange(E, device=DEV, dtype=torch.float32) + 1) ** -1.2
        idx = torch.multinomial(p.expand(T, E).contiguous(), k, replacement=False, generator=g)
    w = torch.softmax(torch.randn(T, k, generator=g, device=DEV), -1).to(DTYPE)
    return idx, w


def bench(fn, iters):
    for _ in range(3):
        fn()
    if DEV == "cpu":
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters * 1e3, 0.0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2], torch.cuda.max_memory_allocated() / GiB


def step_fn(block, x0, idx, w, dy):
    def run():
        x = x0.detach().requires_grad_(True)
        out = block.experts(x, idx, w)
        out.backward(dy)
        for p in block.parameters():
            p.grad = None
    return run


SKIP_FUSED = False  # --skip-fused: no strategy B rows (B's autotune compiles dominate a short GPU session)


def layer_bench(name, spec, iters, results, checks):
    from host_plugin_scattermoe import experts as sm_experts
    from host_plugin_scattermoe import lora as sm_lora

    from host_plugin_mxfp4 import experts as fp4_experts
    from host_plugin_mxfp4 import loading

    E, H, I, k = spec["E"], spec["H"], spec["I"], spec["k"]
    T = T_TOKENS
    sm_experts.register()
    ex = make_experts(**spec)
    bf16_bytes = sum(getattr(ex, n).numel() * 2 for n in loading.EXPERT_PARAMS)
    block = add_lora(Block(ex))
    g = torch.Generator(device=DEV).manual_seed(2)
    x0 = torch.randn(T, H, generator=g, device=DEV).to(DTYPE)
    dy = torch.randn(T, H, generator=g, device=DEV).to(DTYPE)
    routes = {kind: routing(T, E, k, kind) for kind in ("balanced", "skewed")}
    for kind, (idx, w) in routes.items():
        results.append(dict(shape=name, routing=kind, method="grouped_mm+PEFT bf16", active=int(idx.unique().numel()),
                            **dict(zip(("ms", "peak_gib"), bench(step_fn(block, x0, idx, w, dy), iters)))))
        print(results[-1], flush=True)
    ex.config._experts_implementation = "scattermoe"
    sm_lora.attach(block)
    for kind, (idx, w) in routes.items():
        try:
            results.append(dict(shape=name, routing=kind, method="scattermoe bf16",
                                **dict(zip(("ms", "peak_gib"), bench(step_fn(block, x0, idx, w, dy), iters)))))
        except Exception:
            traceback.print_exc()
            results.append(dict(shape=name, routing=kind, method="scattermoe bf16", ms=None, peak_gib=None))
        print(results[-1], flush=True)
    # quantize in place (bf16 experts are freed); LoRA stays
    loading.quantize_module(ex, "mxfp4")
    fp4_bytes = sum(loading.get_weights(ex, n).nbytes for n in loading.EXPERT_PARAMS)
    checks.append(dict(shape=name, check="expert weight memory", bf16_gib=bf16_bytes / GiB, mxfp4_gib=fp4_bytes / GiB,
                       ratio=bf16_bytes / fp4_bytes))
    fp4_experts.install(block)
    fp4_experts.SETTINGS["strategy"] = "auto"  # the default, measured first (what a training step runs)
    for kind, (idx, w) in routes.items():
        try:
            before = dict(fp4_experts.STATS)
            ms, peak = bench(step_fn(block, x0, idx, w, dy), iters)
            results.append(dict(shape=name, routing=kind, method="mxfp4 auto", ms=ms, peak_gib=peak,
                                picked=sorted(s for s, n in fp4_experts.STATS.items() if n > before[s])))
        except Exception:
            traceback.print_exc()
        print(results[-1], flush=True)
    strategies = (("selective", "mxfp4 A (selective)"),) + (() if SKIP_FUSED else (("fused", "mxfp4 B (fused)"),))
    for strat, label in strategies:
        fp4_experts.SETTINGS["strategy"] = strat
        for kind, (idx, w) in routes.items():
            try:
                ms, peak = bench(step_fn(block, x0, idx, w, dy), iters)
                results.append(dict(shape=name, routing=kind, method=label, ms=ms, peak_gib=peak))
            except Exception as exc:
                traceback.print_exc()
                results.append(dict(shape=name, routing=kind, method=label, ms=None, peak_gib=None, note=type(exc).__name__))
                torch.cuda.empty_cache()
            print(results[-1], flush=True)
        try:
            correctness(name, spec, block, ex, x0, dy, routes, checks, strategies=(strat,))
        except Exception:
            traceback.print_exc()
            checks.append(dict(shape=name, check=f"{strat} correctness failed", error=traceback.format_exc(limit=2)[-300:]))
    fp4_experts.SETTINGS["strategy"] = "auto"
    del block, ex
    torch.cuda.empty_cache()


def correctness(name, spec, block, ex, x0, dy, routes, checks, strategies=("selective", "fused")):
    from host_plugin_scattermoe import lora as sm_lora

    from host_plugin_mxfp4 import experts as fp4_experts
    from host_plugin_mxfp4 import loading

    E, k = spec["E"], spec["k"]
    # correctness at the real shape: scattermoe bf16 on the dequantized weights is the reference
    idx, w = routes["balanced"]
    outs = {}
    from peft.tuners.lora.layer import ParamWrapper

    wrappers = {m.parameter_name: m for m in block.modules() if isinstance(m, ParamWrapper)}

    def lora_grads():
        out = {}
        for pname, wr in wrappers.items():
            ga, gb = wr.lora_A["default"].weight.grad, wr.lora_B["default"].weight.grad
            out[f"dA_{pname}"] = ga.float().view(E, -1, ga.shape[-1])
            out[f"dB_{pname}"] = gb.float().view(gb.shape[0], -1, E).permute(2, 0, 1)
        return out

    for strat in strategies:
        fp4_experts.SETTINGS["strategy"] = strat
        x = x0.detach().requires_grad_(True)
        out = block.experts(x, idx, w)
        out.backward(dy)
        outs[strat] = {"out": out.detach().float(), "dX": x.grad.float(), **lora_grads()}
        for p in block.parameters():
            p.grad = None
    dense = make_experts(**spec)
    for n in loading.quantized_names(ex):
        wdq = loading.get_weights(ex, n).dequantize(DTYPE, k_major=loading.is_transposed(ex))
        getattr(dense, n).data = wdq.transpose(1, 2) if loading.is_transposed(ex) else wdq
    dense.config._experts_implementation = "scattermoe"
    for n in ("gate_up_proj_bias", "down_proj_bias"):
        if hasattr(ex, n):
            getattr(dense, n).data = getattr(ex, n).data.clone()
    x = x0.detach().requires_grad_(True)
    # same LoRA factors: run scattermoe's experts forward with the module's factors
    from host_plugin_scattermoe import ops
    from host_plugin_scattermoe.routing import sort_tokens

    lor = sm_lora.expert_lora(block.experts)
    for (n, (A, B, s)) in lor.items():
        lor[n] = (A.detach().requires_grad_(True), B.detach().requires_grad_(True), s)
    sei, ssi, offs = sort_tokens(idx, E)
    tr = bool(getattr(dense, "is_transposed", False))
    W1 = dense.gate_up_proj if tr else dense.gate_up_proj.transpose(1, 2)
    W2 = dense.down_proj if tr else dense.down_proj.transpose(1, 2)
    b1 = getattr(dense, "gate_up_proj_bias", None) if getattr(dense, "has_bias", False) else None
    b2 = getattr(dense, "down_proj_bias", None) if getattr(dense, "has_bias", False) else None
    from host_plugin_scattermoe import fused
    from host_plugin_scattermoe.experts import apply_gate, merged_kwargs

    merged = merged_kwargs(dense, x, b1, b2)
    if merged is not None:  # scattermoe's experts forward takes its merged node (and light tail)
        ref = ops.glu_experts(x, W1, W2, k, sei, ssi, offs, lor["gate_up_proj"], lor["down_proj"], w, **merged)
    else:
        A1, B1, s1 = lor["gate_up_proj"]
        A2, B2, s2 = lor["down_proj"]
        h = ops.scattered_experts(x, W1, k, sei, ssi, offs, A1, B1, s1, b1, False, True)
        if fused.applies(dense, b2):  # scattermoe's experts forward takes its fused tail
            ref = fused.glu_down_combine(h, W2, k, sei, ssi, offs, A2, B2, s2, w)
        else:  # the activation as scattermoe's experts forward runs it (its fused gate kernels where they apply)
            h = apply_gate(dense, h)
            y = ops.scattered_experts(h, W2, 1, sei, ssi, offs, A2, B2, s2, b2, True, False)
            ref = ops.combine(y, w.to(y.dtype))
    ref.backward(dy)
    ref_vals = {"out": ref.detach().float(), "dX": x.grad.float()}
    for pname, (A, B, _) in lor.items():
        ref_vals[f"dA_{pname}"] = A.grad.float()
        ref_vals[f"dB_{pname}"] = B.grad.float()
    del dense
    for strat, got in outs.items():
        for key, r in ref_vals.items():
            o2 = got[key]
            rel = ((o2 - r).norm() / r.norm()).item()
            a = float((o2.double().flatten() @ r.double().flatten()) / (r.double().flatten() @ r.double().flatten()))
            checks.append(dict(shape=name, check=f"{strat} {key} vs scattermoe-on-dequantized", rel_err=rel,
                               scale_factor=a, bitwise=bool(torch.equal(o2, r))))
            print(checks[-1], flush=True)


def load_bench(layers, out_dir, checks):
    if DEV != "cuda":
        return
    from transformers import AutoModelForCausalLM, GptOssConfig

    from host_plugin_mxfp4 import experts as fp4_experts
    from host_plugin_mxfp4 import loading
    from host_plugin_mxfp4.checkpoint import write_random_gpt_oss_checkpoint

    # gpt-oss-20b: 24 layers, 32 experts of H=I=2880, top-4 (GptOssConfig's defaults are the 120b's 128 experts)
    cfg = GptOssConfig(num_hidden_layers=layers, num_local_experts=32, num_experts_per_tok=4)
    cfg.layer_types = cfg.layer_types[:layers]
    path = os.path.join(out_dir, "gptoss20b_shaped")
    t0 = time.time()
    write_random_gpt_oss_checkpoint(cfg, path)
    t_write = time.time() - t0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.time()
    loading.begin("mxfp4")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda")
    plan = loading.end()
    loading.finalize(model)
    torch.cuda.synchronize()
    load_peak = (torch.cuda.max_memory_allocated() - base) / GiB
    resident = (torch.cuda.memory_allocated() - base) / GiB
    fp4 = sum(loading.get_weights(m, n).nbytes for m in model.modules() if loading.is_quantized(m) for n in loading.quantized_names(m))
    E, H, I = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    bf16_experts = layers * E * (H * 2 * I + I * H) * 2
    checks.append(dict(check=f"gpt-oss-20b-shaped load ({layers} of 24 layers)", load_s=time.time() - t0, write_s=t_write,
                       peak_gib=load_peak, resident_gib=resident, experts_fp4_gib=fp4 / GiB,
                       experts_bf16_would_be_gib=bf16_experts / GiB, loaded_packed=plan.prequantized,
                       quantized_at_load=plan.quantized, hp_expert_bytes=loading.high_precision_expert_bytes(model)))
    print(checks[-1], flush=True)
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                             target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    model.config.use_cache = False
    fp4_experts.install(model)
    fp4_experts.SETTINGS["strategy"] = TRAIN_STRATEGY
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (1, 4096), device=DEV)
    torch.cuda.reset_peak_memory_stats()
    for step in range(2):  # step 0 includes autotune/auto timing
        t0 = time.time()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        dt = time.time() - t0
    checks.append(dict(check=f"gpt-oss-20b-shaped train step ({layers} layers, T=4096, LoRA r=16, {TRAIN_STRATEGY})",
                       step_s=dt, peak_gib=(torch.cuda.max_memory_allocated() - base) / GiB, loss=float(loss)))
    print(checks[-1], flush=True)
    del model, opt
    torch.cuda.empty_cache()


def quantize_on_load_bench(layers, checks):
    """A Qwen3-30B-A3B-shaped bf16 checkpoint (``layers`` deep, fused expert keys, random weights)
    loaded onto the GPU with quantize-on-load: peak memory vs the bf16 experts it never holds at once."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from host_plugin_mxfp4 import loading

    cfg = Qwen3MoeConfig(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                         num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                         intermediate_size=6144, vocab_size=32000)
    path = "/tmp/qwen3_30b_shaped"
    os.makedirs(path, exist_ok=True)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg)
    index, shard = {}, {}
    g = torch.Generator(device="cuda").manual_seed(0)
    names = list(meta.state_dict().items())
    for i, (n, t) in enumerate(names):
        shard[n] = (torch.randn(t.shape, generator=g, device="cuda") * 0.02).to(torch.bfloat16).cpu()
        if ".experts." in n or i == len(names) - 1:
            fname = f"shard-{len(set(index.values())):03d}.safetensors"
            save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
            index.update({k: fname for k in shard})
            shard = {}
    json.dump({"metadata": {}, "weight_map": index}, open(os.path.join(path, "model.safetensors.index.json"), "w"))
    cfg.save_pretrained(path)
    del meta
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loading.begin("mxfp4")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda")
    plan = loading.end()
    loading.finalize(model)
    torch.cuda.synchronize()
    E, H, I = 128, 2048, 768
    bf16_experts = layers * E * 3 * H * I * 2
    one_param = E * 2 * I * H * 2
    checks.append(dict(check=f"Qwen3-30B-A3B-shaped bf16 checkpoint, quantize-on-load ({layers} of 48 layers)",
                       load_peak_gib=(torch.cuda.max_memory_allocated() - base) / GiB,
                       resident_gib=(torch.cuda.memory_allocated() - base) / GiB,
                       bf16_experts_gib=bf16_experts / GiB, largest_expert_tensor_gib=one_param / GiB,
                       max_live_hp_expert_gib=max(b for _, b in plan.events) / GiB, quantized=plan.quantized))
    print(checks[-1], flush=True)
    del model
    torch.cuda.empty_cache()


class _Rows(list):
    """A list that also prints each appended row as a JSON line (a crashed child keeps its rows)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def append(self, row):
        super().append(row)
        print(f"ROW {self.kind} " + json.dumps(row, default=str), flush=True)


def table(results, checks, device):
    from host_plugin_mxfp4 import kernels

    lines = [f"device: {device}; date: {datetime.date.today().isoformat()}; T=4096, LoRA r=16, bf16, fwd+bwd (median); "
             f"dequantize tiles {kernels.DEQUANT_TILES}", ""]
    lines.append("| shape | routing | method | ms | peak GiB | vs scattermoe bf16 |")
    lines.append("| --- | --- | --- | ---: | ---: | ---: |")
    base = {(r["shape"], r["routing"]): r["ms"] for r in results if r["method"] == "scattermoe bf16"}
    for r in results:
        ms = "OOM" if r.get("ms") is None else f"{r['ms']:.2f}"
        pk = "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.2f}"
        b = base.get((r["shape"], r["routing"]))
        rel = "-" if (r.get("ms") is None or not b) else f"{r['ms'] / b:.2f}x"
        extra = f" ({','.join(r['picked'])})" if r.get("picked") else ""
        lines.append(f"| {r['shape']} | {r['routing']} | {r['method']}{extra} | {ms} | {pk} | {rel} |")
    lines.append("")
    for c in checks:
        lines.append("- " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in c.items()))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run of the script at toy shapes")
    ap.add_argument("--isolate", action="store_true", help="each shape / the load bench in its own process")
    ap.add_argument("--part", default=None, help="(internal) write this process's results to this JSON file")
    ap.add_argument("--only-load", action="store_true")
    ap.add_argument("--skip-fused", action="store_true", help="no strategy B rows (auto and A only)")
    ap.add_argument("--dequant-tiles", default=None,
                    help="sweep_dequant.py's JSON: use its best dequantize tiles (kernels.DEQUANT_TILES)")
    args = ap.parse_args()
    if args.dequant_tiles and os.path.exists(args.dequant_tiles):
        from host_plugin_mxfp4 import kernels

        for order, tile in json.load(open(args.dequant_tiles)).get("best", {}).items():
            kernels.DEQUANT_TILES[order] = tuple(tile)
        print("dequantize tiles:", kernels.DEQUANT_TILES, flush=True)
    global SKIP_FUSED
    SKIP_FUSED = args.skip_fused
    global T_TOKENS
    if args.tiny:
        SHAPES.clear()
        SHAPES.update(TINY)
        T_TOKENS = 64
        if not set(args.shapes.split(",")) <= set(TINY):
            args.shapes = ",".join(TINY)
    out_dir = os.environ.get("OUT", "/tmp/mxfp4_bench")
    os.makedirs(out_dir, exist_ok=True)
    device = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke run)"
    results, checks = ([], []) if not args.part else (_Rows("result"), _Rows("check"))

    def save():
        with open(os.path.join(out_dir, "bench_mxfp4.json"), "w") as f:
            json.dump({"device": device, "results": results, "checks": checks}, f, indent=1, default=str)
        with open(os.path.join(out_dir, "bench_mxfp4.md"), "w") as f:
            f.write(table(results, checks, device) + "\n")

    if args.isolate:
        import subprocess

        jobs = [["--shapes", n, "--skip-load"] for n in args.shapes.split(",")]
        if not args.skip_load:
            jobs.append(["--only-load"])
        for i, job in enumerate(jobs):
            part = os.path.join(out_dir, f"part{i}.json")
            cmd = [sys.executable, __file__, "--iters", str(args.iters), "--layers", str(args.layers), "--part", part, *job]
            cmd += ["--tiny"] if args.tiny else []
            cmd += ["--skip-fused"] if args.skip_fused else []
            cmd += ["--dequant-tiles", args.dequant_tiles] if args.dequant_tiles else []
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            rc = proc.returncode
            for line in proc.stdout.splitlines():
                if line.startswith("ROW "):
                    _, kind, payload = line.split(" ", 2)
                    (results if kind == "result" else checks).append(json.loads(payload))
                else:
                    print(line, flush=True)
            if rc:
                checks.append(dict(check=f"process {' '.join(job)} exited {rc}"))
            save()
        print(table(results, checks, device))
        return 0
    for name in ([] if args.only_load else args.shapes.split(",")):
        try:
            layer_bench(name, SHAPES[name], args.iters, results, checks)
        except Exception:
            traceback.print_exc()
            checks.append(dict(check=f"{name} layer bench failed", error=traceback.format_exc(limit=2)[-300:]))
        torch.cuda.empty_cache()
        save()
        if args.part:
            json.dump({"results": results, "checks": checks}, open(args.part, "w"), default=str)
    if not args.skip_load and DEV == "cuda":
        try:
            quantize_on_load_bench(2, checks)
        except Exception:
            traceback.print_exc()
            checks.append(dict(check="quantize-on-load bench failed", error=traceback.format_exc(limit=3)[-400:]))
        save()
        try:
            load_bench(args.layers, "/tmp", checks)
        except Exception:
            traceback.print_exc()
            checks.append(dict(check="load bench failed", error=traceback.format_exc(limit=3)[-400:]))
        if args.part:
            json.dump({"results": results, "checks": checks}, open(args.part, "w"), default=str)
    with open(os.path.join(out_dir, "bench_mxfp4.json"), "w") as f:
        json.dump({"device": device, "results": results, "checks": checks}, f, indent=1, default=str)
    text = table(results, checks, device)
    with open(os.path.join(out_dir, "bench_mxfp4.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
