"""Why one MoE block times 2.9 ms in one bench and 3.85 ms in another: the same experts, timed four ways.

At one shape (default Qwen3-30B-A3B, T=4096, bf16, LoRA r=16 on both expert parameters):

* ``block``: the whole sparse-MoE block as a training step runs it: router (linear, softmax, top-k,
  renormalise), the experts with PEFT's fp32 LoRA factors (peft's ``autocast_adapter_dtype``), fp32
  routing weights, input gradient through router and experts. What ``bench_moe_block.py`` times.
* ``experts``: the experts module alone on the block's routing (router excluded), fp32 factors.
* ``experts, bf16 LoRA``: the same with the LoRA factors cast to bf16 (no fp32->bf16 casts per step).
* ``experts, bf16 LoRA, bf16 gates, uniform routing``: what ``plugins/mxfp4/bench/bench_mxfp4.py``
  times for "scattermoe bf16" (its routing is a uniform random top-k, its weights bf16).

For each: median / min / p90 of N steps each synchronised (host launch overhead shows when the GPU
outruns the CPU), the mean of N back-to-back steps, the CPU time to enqueue one step, and the summed
GPU kernel time of one step (torch.profiler), plus a per-kernel table of the ``block`` variant.
Usage: python bench/diagnose_gap.py [--shapes Qwen3-30B-A3B ...] [--impls scattermoe grouped_mm]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def timeit(step, zero, iters):
    """``bench_moe_block.time_step`` (one timer for both benches) with its per-kernel profile."""
    from bench_moe_block import time_step

    res, ka = time_step(step, zero, iters, profile=True)
    return dict(median=res["ms"], min=res["min"], p90=res["p90"], b2b=res["b2b"], cpu_enqueue=res["host"],
                gpu_kernels=res["gpu"]), ka


def cprofile(step, zero, name, steps=20):
    """Where the host time of a step goes (the step is host-bound when this exceeds its GPU time)."""
    import cProfile
    import io
    import pstats

    pr = cProfile.Profile()
    torch.cuda.synchronize()
    pr.enable()
    for _ in range(steps):
        zero()
        step()
    pr.disable()
    torch.cuda.synchronize()
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats(key).print_stats(28)
        print(f"----- cProfile {name} block step, {steps} steps, by {key}")
        for line in buf.getvalue().splitlines():
            if line.strip() and not line.startswith(("   Ordered", "   List")):
                print(line[:170])


def kernel_info():
    """Registers, spills and shared memory of every compiled scattermoe kernel (from the loaded binaries)."""
    from host_plugin_scattermoe import kernels as K

    print("----- compiled kernels: name, BLOCK_M/N/K, warps, stages, GLU_BWD, regs, spills, smem")
    for jit in (K._s2s_kernel, K._group_outer_kernel):
        for dev_cache in jit.device_caches.values():
            for key, ck in dev_cache[0].items():
                try:
                    ck._init_handles()
                except Exception:  # noqa: BLE001
                    pass
                c = dict(getattr(ck.src, "constants", {}) or {})
                names = jit.arg_names
                const = {names[k[0]] if isinstance(k, tuple) else k: v for k, v in c.items()}
                tiles = [const.get(n) for n in ("BLOCK_M", "BLOCK_N", "BLOCK_P", "BLOCK_K", "BLOCK_Q")]
                print(jit.__name__, [t for t in tiles if t is not None], ck.metadata.num_warps, ck.metadata.num_stages,
                      const.get("GLU_BWD"), const.get("LORA"), getattr(ck, "n_regs", None), getattr(ck, "n_spills", None),
                      ck.metadata.shared)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=["Qwen3-30B-A3B"])
    ap.add_argument("--impls", nargs="*", default=["scattermoe", "grouped_mm"])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--profile-rows", type=int, default=18)
    ap.add_argument("--cprofile", action="store_true", help="also cProfile the block step's host side (top functions)")
    ap.add_argument("--kernel-info", action="store_true", help="registers/spills/smem of the compiled kernels")
    args = ap.parse_args()
    from bench_moe_block import SHAPES, build_block

    from host_plugin_scattermoe import experts, lora

    experts.register()
    T = args.tokens
    rows = []
    for name in args.shapes:
        family, E, H, I, k = SHAPES[name]
        holder, cfg = build_block(family, E, H, I, k, 16)
        lora.attach(holder)
        block = holder.mlp
        ex = block.experts
        lparams = [p for n, p in holder.named_parameters() if p.requires_grad]
        dtypes = sorted({str(p.dtype) for p in lparams})
        torch.manual_seed(1)
        x = torch.randn(1, T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        gout = torch.randn(1, T, H, device="cuda", dtype=torch.bfloat16)
        x2 = x.detach().view(T, H).clone().requires_grad_(True)
        g2 = gout.view(T, H)
        # the block's own routing (the router is frozen, so it is the same every step)
        with torch.no_grad():
            router = getattr(block, "gate", None) or getattr(block, "router")
            r_out = router(x.view(T, H))
            idx, wts = r_out[-1], r_out[-2]
            if idx.dtype.is_floating_point:
                idx, wts = wts, idx
        gen = torch.Generator(device="cuda").manual_seed(0)
        u_idx = torch.rand(T, E, generator=gen, device="cuda").topk(k, dim=-1).indices
        u_w = torch.softmax(torch.randn(T, k, generator=gen, device="cuda"), -1).to(torch.bfloat16)

        def zero():
            x.grad = None
            x2.grad = None
            for p in lparams:
                p.grad = None

        def step_block():
            out = block(x)
            out = out[0] if isinstance(out, tuple) else out
            out.backward(gout)

        def step_experts(i=idx, w=wts):
            def f():
                ex(x2, i, w).backward(g2)
            return f

        for impl in args.impls:
            cfg._experts_implementation = impl
            variants = [("block (router + experts, fp32 LoRA)", step_block),
                        ("experts, fp32 LoRA, fp32 gates", step_experts())]
            for label, fn in variants:
                res, ka = timeit(fn, zero, args.iters)
                rows.append(dict(shape=name, impl=impl, variant=label, lora_dtypes=dtypes, gates=str(wts.dtype), **res))
                print(json.dumps(rows[-1]), flush=True)
                if label.startswith("block") and args.cprofile and impl == "scattermoe":
                    cprofile(fn, zero, name)
                if label.startswith("block"):
                    print(f"----- per-kernel, {name} {impl} {label} (3 steps; ms per step)")
                    evs = sorted(ka, key=lambda e: -e.self_device_time_total)
                    for ev in evs[: args.profile_rows]:
                        if ev.self_device_time_total > 0:
                            print(f"{ev.self_device_time_total / 3 / 1e3:8.3f} ms {ev.count // 3:4d}x  {ev.key[:110]}")
            if impl != "scattermoe":
                continue
            saved = [p.data for p in lparams]
            for p in lparams:
                p.data = p.data.to(torch.bfloat16)
            for label, fn in (("experts, bf16 LoRA, fp32 gates", step_experts()),
                              ("experts, bf16 LoRA, bf16 gates, uniform routing (mxfp4 bench)", step_experts(u_idx, u_w))):
                res, ka = timeit(fn, zero, args.iters)
                rows.append(dict(shape=name, impl=impl, variant=label, lora_dtypes=["torch.bfloat16"],
                                 gates=str(wts.dtype if "fp32 gates" in label else u_w.dtype), **res))
                print(json.dumps(rows[-1]), flush=True)
                if "uniform" in label:
                    print(f"----- per-kernel, {name} {impl} {label} (3 steps; ms per step)")
                    evs = sorted(ka, key=lambda e: -e.self_device_time_total)
                    for ev in evs[: args.profile_rows]:
                        if ev.self_device_time_total > 0:
                            print(f"{ev.self_device_time_total / 3 / 1e3:8.3f} ms {ev.count // 3:4d}x  {ev.key[:110]}")
            for p, d in zip(lparams, saved):
                p.data = d
        del holder, block, ex, x, x2
        torch.cuda.empty_cache()
    if args.kernel_info:
        try:
            kernel_info()
        except Exception as e:  # noqa: BLE001 - diagnostics only
            print("kernel info failed:", repr(e)[:200])
    out = os.path.join(os.environ.get("OUT", "/tmp"), "diagnose_gap.json")
    json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, open(out, "w"), indent=1)
    print(f"\ndevice {torch.cuda.get_device_name()}  T={T} r=16 bf16 fwd+bwd; ms")
    print(f"{'shape':<15}{'impl':<11}{'variant':<62}{'median':>7}{'min':>7}{'p90':>7}{'b2b':>7}{'cpu':>7}{'gpu':>7}")
    for r in rows:
        print(f"{r['shape']:<15}{r['impl']:<11}{r['variant'][:61]:<62}{r['median']:>7.2f}{r['min']:>7.2f}{r['p90']:>7.2f}"
              f"{r['b2b']:>7.2f}{r['cpu_enqueue']:>7.2f}{r['gpu_kernels']:>7.2f}")


if __name__ == "__main__":
    sys.exit(main())
