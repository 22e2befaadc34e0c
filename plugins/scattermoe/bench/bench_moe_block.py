"""Benchmark one MoE block, forward + backward, bf16, LoRA r=16 on the expert parameters: what a training step sees.

(a) transformers ``grouped_mm`` experts + peft ``target_parameters`` (peft folds W + B·A per step)
(b) this plugin's ``scattermoe`` experts (Triton, LoRA consumed as factors; the LoRA forward path
    its default threshold picks)
(b+graph) the same with ``scattermoe_cuda_graph``: the experts call replayed as two CUDA graphs (``graphs.py``)
(b+ptr) the same with the expert GEMMs' operands loaded through pointers and the tiles of the rule
    before TMA (``SCATTERMOE_TMA=0``: the kernels as they were before the TMA pass, for before/after in one run)
(b+persist) / (b+flat) the same with the persistent grid on every TMA tile (``SCATTERMOE_PERSISTENT=1``) / on none (``=0``)
(b+half) / (b+full) the same with half-height tiles for experts' short last row blocks everywhere (``SCATTERMOE_HALF_TAIL=1``)
    / nowhere (``=0``)
(b+ws) the same with the warp-specialised tile on the grouped-input launches (``SCATTERMOE_WS=1``: down projection
    forward and up projection dX; their fused LoRA as the split epilogue); (b+ws2) also the two gathered launches, their
    rows copied into sorted order first (``SCATTERMOE_WS=2``)
(b+torchsort) the same with the routing sort on torch (``SCATTERMOE_TRITON_ROUTING=0``: one stable ``torch.sort`` and a
    ``searchsorted`` instead of the Triton counting sort of ``routing_kernels``; before/after in one run)
(b+torchcopy) the same with the LoRA factors' re-layout by torch's strided copies instead of the tiled Triton
    transpose (``SCATTERMOE_TILED_RELAYOUT=0``, relayout.py), for before/after in one run
(b+oldtail) / (b+gemmtail) the same with the merged node's old backward (``SCATTERMOE_LIGHT_TAIL=0``: the combine
    backward as its own kernel over the kept expert outputs) / with the light tail's ``"gemm"`` variant (gate scaling
    and dgates in the dX epilogue instead of the GLU backward kernel)
(b+unmerged) the same with the experts call as separate autograd nodes (``SCATTERMOE_MERGED=0``: up projection, gate,
    down projection, combine, each its own node, the combine backward over the kept ``y``), for before/after of the
    merged node in one process (gpt-oss: the merged node with its biases and clamped gate, 2026-12-06 third session)
(b+before) the same with all three of the above off (torch sort, torch copies, old backward; and the SiLU-GLU as its
    own kernel, below): main before the
    2026-12-06 afternoon pass, for the whole pass's before/after in one run
(b+gluepi0) / (b+gluepi1) the same with the SiLU-GLU as its own kernel after the up projection
    (``SCATTERMOE_GLU_EPILOGUE=0``) / in the up projection's epilogue (``=1``), for before/after in one run
(b+torchrouter) the same with the model's own router (``SCATTERMOE_FUSED_ROUTER=0``: softmax, top-k, renormalise and
    cast as transformers' ops instead of ``router.py``'s one node), for before/after in one process
(b+tail) the same with ``scattermoe_fused_tail`` (SiLU-GLU, down projection and combine as one node whose
    backward is one GEMM launch; off by default)
(c) liger-kernel's fused MoE (``bench/liger_peer.py``), when installed, for the SiLU-gated families:
    base weights only (it takes no LoRA factors and always computes the full weight gradients)

The whole sparse-MoE block (router, experts, combine) as the model runs it, same weights and routing;
base weights and router frozen, the input requires grad (as inside a network). Per implementation:
``ms`` = median of N steps each synchronised (what the issue's table reports: the GPU time plus any
time the GPU waits for the host to enqueue), ``min``/``p90`` of those, ``b2b`` = mean of N
back-to-back steps (as in a training loop: host and GPU overlap, so this is max(host, GPU)),
``gpu`` = summed kernel time of one step (torch.profiler), ``host`` = host time to enqueue one step,
``cold s`` = the first step (Triton compiles, no autotuning), peak GiB of the step on top of the
weights, TFLOP/s of the useful math at ``ms``, and the relative error of (b) vs (a) on the output and
all LoRA + input gradients. The table is printed last; JSON to $OUT (or --json).

Usage: python bench/bench_moe_block.py [--tokens 4096] [--rank 16] [--shapes Qwen3-30B-A3B ...]
"""

from __future__ import annotations

import argparse
import datetime
import gc
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
TARGET_MS = {"Qwen3-30B-A3B": 2.0, "Qwen3.5-35B-A3B": 2.0, "OLMoE-1B-7B": 2.2, "gpt-oss-20b": 3.5, "Mixtral-8x7B": 10.0}  # issue 16
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H20": 148.0, "A100": 312.0, "B200": 2250.0, "L40S": 362.0}


def device_peak() -> float:
    name = torch.cuda.get_device_name()
    if "H100" in name and "PCIe" in name:
        return 756.0
    for key, val in PEAK_BF16_TFLOPS.items():
        if key in name:
            return val
    return float("nan")


def build_block(family, E, H, I, k, rank, lora=True):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)  # peft's random LoRA init draws from the global generator: same factors for every implementation

    if family == "gpt_oss":
        from transformers import GptOssConfig
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

        cfg = GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k)
        cls = GptOssMLP
    else:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=k, norm_topk_prob=True)
        cls = Qwen3MoeSparseMoeBlock
    with torch.device("cuda"):
        block = cls(cfg)
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():  # on the GPU: the same weights for every implementation, in seconds even for Mixtral
        for name, p in block.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, device="cuda") * (0.02 if "bias" not in name else 0.01))
    holder = nn.Module()
    holder.mlp = block.to("cuda", torch.bfloat16)
    if lora:
        lcfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                          init_lora_weights=False)
        inject_adapter_in_model(lcfg, holder)
    for name, p in holder.named_parameters():
        p.requires_grad_("lora_" in name)
    holder.to("cuda")
    return holder, cfg


def graph_pool_bytes() -> int:
    """Bytes of CUDA memory segments owned by private pools (CUDA graphs' pools), 0 when none."""
    return sum(seg["total_size"] for seg in torch.cuda.memory_snapshot() if tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0))


def flops(E, H, I, k, T, rank):
    """Useful FLOPs of fwd + bwd with a frozen base: base fwd + dX, LoRA fwd + dX + dA + dB."""
    L = T * k
    base = 2 * L * (H * 2 * I + I * H)
    lora = 2 * L * rank * ((H + 2 * I) + (I + H))
    return 2 * base + 4 * lora


def time_step(step, zero, iters, profile=False):
    """(median, min, p90 of synchronised steps, back-to-back mean, host enqueue ms, GPU kernel ms, cold s);
    with ``profile`` also the profiler's per-kernel averages of 3 steps (``(dict, key_averages)``)."""
    import time

    t0 = time.perf_counter()
    zero()
    step()
    torch.cuda.synchronize()
    cold = time.perf_counter() - t0
    for _ in range(3):
        zero()
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        zero()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    h0 = time.perf_counter()
    for _ in range(iters):
        zero()
        step()
    host = (time.perf_counter() - h0) / iters * 1e3
    e.record()
    torch.cuda.synchronize()
    b2b = s.elapsed_time(e) / iters
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            zero()
            step()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    gpu = sum(ev.self_device_time_total for ev in ka) / 3 / 1e3
    res = dict(ms=times[len(times) // 2], min=times[0], p90=times[int(0.9 * (len(times) - 1))], b2b=b2b, host=host,
               gpu=gpu, cold_s=cold)
    return (res, ka) if profile else res


def isolated(args):
    import subprocess

    rows, dev = [], None
    for name in args.shapes:
        part = f"{args.json}.{name}.part"
        cmd = [sys.executable, os.path.abspath(__file__), "--tokens", str(args.tokens), "--rank", str(args.rank), "--iters",
               str(args.iters), "--shapes", name, "--impls", *args.impls, "--json", part]
        subprocess.run(cmd, check=False)
        if os.path.exists(part):
            d = json.load(open(part))
            rows += d["rows"]
            dev = d["device"]
            os.remove(part)
    with open(args.json, "w") as f:
        json.dump({"device": dev, "date": datetime.date.today().isoformat(), "torch": torch.__version__, "rows": rows,
                   "isolated": True}, f, indent=1)
    print_table(rows, dev, args.tokens, args.rank)


def print_table(rows, dev, T, R):
    peak = device_peak()
    print(f"\ndevice: {dev}  peak bf16 {peak:.0f} TFLOP/s  date {datetime.date.today()}  T={T} r={R} bf16 fwd+bwd, ms")
    print(f"{'shape':<16}{'impl':<20}{'ms':>7}{'min':>7}{'p90':>7}{'b2b':>7}{'gpu':>7}{'host':>7}{'cold s':>7}{'GiB':>6}"
          f"{'TFLOP/s':>8}{'vs (a)':>7}{'target':>7}{'relerr':>9}")
    base = {r["shape"]: r["ms"] for r in rows if r["impl"] == "grouped_mm"}
    for r in rows:
        tgt = f"{r['target_ms']:.1f}" if r["target_ms"] and r["impl"].startswith("scattermoe") else "-"
        sp = f"{base[r['shape']] / r['ms']:.1f}x" if r["shape"] in base else "-"
        tf = f"{r['tflops']:.0f}" if r["tflops"] else "-"
        err = f"{r['err']:.1e}" if r["err"] is not None else "-"
        print(f"{r['shape']:<16}{r['impl']:<20}{r['ms']:>7.2f}{r['min']:>7.2f}{r['p90']:>7.2f}{r['b2b']:>7.2f}{r['gpu']:>7.2f}"
              f"{r['host']:>7.2f}{r['cold_s']:>7.1f}{r['gib']:>6.2f}{tf:>8}{sp:>7}{tgt:>7}{err:>9}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--impls", nargs="*", default=["grouped_mm", "scattermoe", "scattermoe+graph", "scattermoe+tail", "liger"])
    ap.add_argument("--json", default=os.environ.get("OUT", ".") + "/bench_moe_block.json")
    ap.add_argument("--isolate", action="store_true",
                    help="each shape in its own process (host-side numbers of later shapes otherwise grow with the process)")
    args = ap.parse_args()
    if args.isolate:
        return isolated(args)

    from host_plugin_scattermoe import experts, graphs, lora, router
    from host_plugin_scattermoe import ops as _ops

    glu_default = _ops.SETTINGS["glu_epilogue"]  # the plugin's default (env SCATTERMOE_GLU_EPILOGUE)
    lora_defaults = {k_: _ops.SETTINGS[k_] for k_ in ("fused_lora", "split_max_experts")}
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import liger_peer

    experts.register()
    impls = [i for i in args.impls if i != "liger" or liger_peer.available()]
    if "liger" in impls:
        liger_peer.register()
    dev = torch.cuda.get_device_name()
    T, R = args.tokens, args.rank
    rows = []
    for name in args.shapes:
        family, E, H, I, k = SHAPES[name]
        fl = flops(E, H, I, k, T, R)
        ref = None
        for impl in impls:
            if impl in ("liger", "scattermoe+tail") and family == "gpt_oss":
                continue
            torch.cuda.empty_cache()
            holder, cfg = build_block(family, E, H, I, k, R, lora=impl != "liger")
            if impl.startswith("scattermoe"):
                lora.attach(holder)
                router.install(holder)
                graphs.install(holder)
            from host_plugin_scattermoe import ops

            from host_plugin_scattermoe import kernels as K

            K.TMA_MODE = "0" if impl == "scattermoe+ptr" else os.environ.get("SCATTERMOE_TMA", "rule")
            # +ph: persistent grid (flattened) with half-height tails; +pnf / +pnfh: persistent, tile loop not flattened
            persist = {"scattermoe+persist": "1", "scattermoe+flat": "0", "scattermoe+ph": "1", "scattermoe+pnf": "noflat",
                       "scattermoe+pnfh": "noflat"}.get(impl, os.environ.get("SCATTERMOE_PERSISTENT", "rule"))
            half = {"scattermoe+half": "1", "scattermoe+full": "0", "scattermoe+ph": "1", "scattermoe+pnfh": "1"}.get(
                impl, os.environ.get("SCATTERMOE_HALF_TAIL", "rule"))
            ws = {"scattermoe+ws": "1", "scattermoe+ws2": "2"}.get(impl, os.environ.get("SCATTERMOE_WS", "0"))
            if (persist, half, ws) != (K.PERSISTENT_MODE, K.HALF_TAIL_MODE, K.WS_MODE):  # the rule reads them
                K.PERSISTENT_MODE, K.HALF_TAIL_MODE, K.WS_MODE = persist, half, ws
                K._PICKED.clear()
                K._PLANS.clear()
            from host_plugin_scattermoe import routing

            routing.TRITON = impl not in ("scattermoe+torchsort", "scattermoe+before") and os.environ.get("SCATTERMOE_TRITON_ROUTING", "1") == "1"
            from host_plugin_scattermoe import relayout
            # (b+torchcopy): the LoRA factors' re-layout by torch's copies (SCATTERMOE_TILED_RELAYOUT=0), same process
            relayout.ENABLED = impl not in ("scattermoe+torchcopy", "scattermoe+before") and os.environ.get("SCATTERMOE_TILED_RELAYOUT", "1") != "0"
            # +split: every LoRA forward on the split path; +fused: never (the default picks by expert count and size)
            ops.SETTINGS["fused_lora"] = lora_defaults["fused_lora"] and impl != "scattermoe+split"
            ops.SETTINGS["split_max_experts"] = 0 if impl == "scattermoe+fused" else lora_defaults["split_max_experts"]
            ops.SETTINGS["fused_tail"] = impl == "scattermoe+tail"
            ops.SETTINGS["light_tail"] = {"scattermoe+oldtail": "0", "scattermoe+before": "0", "scattermoe+gemmtail": "gemm"}.get(
                impl, os.environ.get("SCATTERMOE_LIGHT_TAIL", "glu"))
            ops.SETTINGS["cuda_graph"] = impl == "scattermoe+graph"
            ops.SETTINGS["fused_router"] = impl != "scattermoe+torchrouter" and os.environ.get("SCATTERMOE_FUSED_ROUTER",
                                                                                               "1") == "1"
            ops.SETTINGS["merged"] = impl != "scattermoe+unmerged" and os.environ.get("SCATTERMOE_MERGED", "1") == "1"
            ops.SETTINGS["glu_epilogue"] = {"scattermoe+gluepi0": False, "scattermoe+gluepi1": True,
                                             "scattermoe+before": False}.get(impl, glu_default)
            cfg._experts_implementation = impl.split("+")[0]
            lparams = [p for p in holder.parameters() if p.requires_grad]
            torch.manual_seed(1)
            x = torch.randn(1, T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            gout = torch.randn(1, T, H, device="cuda", dtype=torch.bfloat16)

            def step():
                out = holder.mlp(x)
                out = out[0] if isinstance(out, tuple) else out
                out.backward(gout)
                return out

            def zero():
                x.grad = None
                for p in lparams:
                    p.grad = None

            try:
                res = time_step(step, zero, args.iters)
            except Exception as exc:  # noqa: BLE001 - a peer that cannot run this shape is reported, not fatal
                print(f"{name} {impl} failed: {exc!r}"[:300], flush=True)
                del holder, x, gout
                continue
            zero()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
            out = step().detach().float()
            torch.cuda.synchronize()
            # on top of the weights: the step's peak outside CUDA graphs, plus (graph rows) every segment of the
            # graphs' private pool: their saved activations, buffers and temporaries stay reserved between steps.
            # The pool is shared, so a graph row after an earlier shape's graph row can include that one's
            # segments (an upper bound; --isolate gives each shape a fresh process).
            pool = graph_pool_bytes() if impl == "scattermoe+graph" else 0
            res["gib"] = (torch.cuda.max_memory_allocated() - base_mem + pool) / 2**30
            grads = [p.grad.detach().float() for p in lparams] + [x.grad.detach().float()]
            if impl == "grouped_mm":
                ref = (out, grads)
            rel = lambda a, b: ((a - b).norm() / b.norm().clamp_min(1e-12)).item()  # noqa: E731
            err = None
            if impl.startswith("scattermoe") and ref is not None:
                err = max([rel(out, ref[0])] + [rel(b, a) for a, b in zip(ref[1], grads)])
            path = ""
            if impl.startswith("scattermoe"):
                path = "split" if ops.use_split(E, H, 2 * I) else "fused"
            row = dict(shape=name, E=E, H=H, I=I, k=k, T=T, r=R, impl=impl, path=path, **res,
                       tflops=fl / res["ms"] / 1e9 if impl != "liger" else None, err=err, target_ms=TARGET_MS.get(name))
            rows.append(row)
            print(json.dumps(row), flush=True)
            from host_plugin_scattermoe import graphs

            for m in holder.modules():  # a captured graph keeps its pool segments until released
                graphs.release(m)
            del holder, x, gout, out, grads
            gc.collect()  # peft's wrappers hold reference cycles: free this block (and its graphs) before the next
    with open(args.json, "w") as f:
        json.dump({"device": dev, "date": datetime.date.today().isoformat(), "torch": torch.__version__, "rows": rows}, f,
                  indent=1)
    print_table(rows, dev, T, R)


if __name__ == "__main__":
    sys.exit(main())
