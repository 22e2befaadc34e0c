"""Where the host time of the eager scattermoe block step goes: microseconds per call of each piece.

Builds the block of ``bench_moe_block.py`` (default Qwen3-30B-A3B, T=4096, bf16, peft LoRA r=16, fp32 factors)
and times on the host (perf_counter, no synchronisation inside a round of ``--n`` calls, best of ``--rounds``):

* a Triton kernel with one argument (Triton's launcher floor) and one small torch op (the dispatcher's),
* the up projection's ``kernels.scatter2scatter`` launch (ours + Triton's), the same ``_s2s_kernel`` launched with
  pre-built arguments (Triton's launcher alone: the difference is our Python), ``_tma_descs`` alone,
* ``sort_tokens`` (and its torch path), ``weight_and_lora`` (both projections), ``cast_lora`` + ``kernel_strides``,
* the experts forward (``_experts_eager``) under grad, its backward, and the whole block step forward + backward.

Usage: python bench/host_overhead.py [--shape Qwen3-30B-A3B] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def per_call_us(fn, n=20, rounds=7, sync=True):
    best = float("inf")
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = (time.perf_counter() - t0) / n * 1e6
        if sync:
            torch.cuda.synchronize()
        best = min(best, dt)
    return best


def main():
    import triton
    import triton.language as tl

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="Qwen3-30B-A3B")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--json", default=os.environ.get("OUT", "/tmp") + "/host_overhead.json")
    args = ap.parse_args()
    from bench_moe_block import SHAPES, build_block

    from host_plugin_scattermoe import experts, lora, ops
    from host_plugin_scattermoe import kernels as K
    from host_plugin_scattermoe.routing import sort_tokens

    experts.register()
    family, E, H, I, k = SHAPES[args.shape]
    holder, cfg = build_block(family, E, H, I, k, 16)
    lora.attach(holder)
    cfg._experts_implementation = "scattermoe"
    block = holder.mlp
    wrapped = block.experts  # peft's ParamWrapper chain; the experts module is at its end
    chain = lora._chain(wrapped)
    ex = chain[-1].base_layer if chain else wrapped
    T = args.tokens
    torch.manual_seed(1)
    x = torch.randn(1, T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gout = torch.randn(1, T, H, device="cuda", dtype=torch.bfloat16)
    lparams = [p for p in holder.parameters() if p.requires_grad]
    with torch.no_grad():
        router = getattr(block, "gate", None) or getattr(block, "router")
        r_out = router(x.view(T, H))
        idx, wts = r_out[-1], r_out[-2]
        if idx.dtype.is_floating_point:
            idx, wts = wts, idx
    rows = {}

    @triton.jit
    def _empty(X):
        pass

    dummy = torch.empty(1, device="cuda")
    _empty[(1,)](dummy)
    rows["triton launch, 1 arg"] = per_call_us(lambda: _empty[(1,)](dummy))
    a = torch.randn(16, device="cuda")
    rows["torch op (a + 1)"] = per_call_us(lambda: a + 1)
    rows["torch.empty"] = per_call_us(lambda: torch.empty(T * k, 2 * I, device="cuda", dtype=torch.bfloat16))

    rows["sort_tokens"] = per_call_us(lambda: sort_tokens(idx, E))
    from host_plugin_scattermoe import routing

    if hasattr(routing, "sort_tokens_torch"):  # the torch path (SCATTERMOE_TRITON_ROUTING=0)
        rows["sort_tokens, torch path"] = per_call_us(lambda: routing.sort_tokens_torch(idx, E))
    rows["weight_and_lora x2"] = per_call_us(
        lambda: (lora.weight_and_lora(ex, "gate_up_proj"), lora.weight_and_lora(ex, "down_proj")), sync=False
    )
    W1, l1 = lora.weight_and_lora(ex, "gate_up_proj")
    rows["cast_lora + kernel_strides (1 proj)"] = per_call_us(
        lambda: ops.kernel_strides(*ops.cast_lora(l1[0], l1[1], l1[2], W1.dtype))
    )
    sei, ssi, offs = sort_tokens(idx, E)
    A1, B1 = ops.kernel_strides(*ops.cast_lora(l1[0].detach(), l1[1].detach(), l1[2], W1.dtype))
    W1k = W1.transpose(1, 2)
    xs = x.detach().view(T, H)

    def s2s():
        return K.scatter2scatter(xs, W1k, ssi, offs, k, A=A1, B=B1, scaling=l1[2], grouped_out=True, write_xa=True)

    s2s()
    rows["scatter2scatter (up, fused LoRA)"] = per_call_us(s2s, n=10)
    # the same launch with pre-built arguments: capture what _s2s_launch passes to the kernel
    captured = {}
    orig = K._s2s_kernel

    class Spy:
        def __getitem__(self, grid):
            def run(*a, **kw):
                captured.update(grid=grid, a=a, kw=kw)
                return orig[grid](*a, **kw)
            return run

    direct = getattr(getattr(K, "_launch", None), "__module__", None) == "host_plugin_scattermoe.launch"
    if direct:
        from host_plugin_scattermoe import launch
    K._s2s_kernel = Spy()
    try:
        if direct:
            launch.ENABLED = False  # the spy sees the normal kernel[grid] call
        s2s()
    finally:
        K._s2s_kernel = orig
        if direct:
            launch.ENABLED = True
    g, ca, ckw = captured["grid"], captured["a"], captured["kw"]
    rows["_s2s_kernel[grid](prebuilt args)"] = per_call_us(lambda: orig[g](*ca, **ckw), n=10)
    if direct:  # the same launch through launch.py's direct path (the compiled kernel's C launcher)
        slot = {}
        g3 = tuple(g) + (1,) * (3 - len(g))
        launch.launch(orig, g3, ca, ckw, slot)
        rows["launch.launch direct (prebuilt args)"] = per_call_us(lambda: launch.launch(orig, g3, ca, ckw, slot), n=10)
    tile = {kk: ckw[kk] for kk in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
    rows["_tma_descs"] = per_call_us(lambda: K._tma_descs(xs, W1k, tile, False), sync=False)

    def zero():
        x.grad = None
        for p in lparams:
            p.grad = None

    xe = x.detach().view(T, H).clone().requires_grad_(True)

    def fwd():
        return experts._experts_eager(ex, xe, idx, wts)

    for _ in range(3):
        fwd().backward(gout.view(T, H))
    rows["experts forward (grad on)"] = per_call_us(fwd, n=10)
    outs = []

    def bwd_once():
        outs[-1].backward(gout.view(T, H))
        outs.pop()

    best = float("inf")
    for _ in range(7):
        outs[:] = [fwd() for _ in range(5)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            bwd_once()
        best = min(best, (time.perf_counter() - t0) / 5 * 1e6)
        torch.cuda.synchronize()
    rows["experts backward"] = best

    def step():
        zero()
        out = block(x)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(gout)

    for _ in range(3):
        step()
    rows["block step fwd+bwd (router+experts)"] = per_call_us(step, n=10)
    if direct and "merged" in ops.SETTINGS:  # what each host-path switch is worth, same process
        for merged, on in ((False, True), (True, False), (False, False)):
            ops.SETTINGS["merged"], launch.ENABLED = merged, on
            for _ in range(2):
                step()
            rows[f"  block step, merged node {'on' if merged else 'off'}, direct launch {'on' if on else 'off'}"] = (
                per_call_us(step, n=10))
        ops.SETTINGS["merged"], launch.ENABLED = True, True
    print(f"\nhost time per call, {torch.cuda.get_device_name()}  {args.shape} T={T} r=16 bf16 (best of 7 rounds), us")
    for name, us in rows.items():
        print(f"{name:<44}{us:>9.1f}")
    json.dump({"device": torch.cuda.get_device_name(), "shape": args.shape, "T": T, "us": rows}, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    sys.exit(main())
