"""The four expert GEMMs of a block step through a CuTe-DSL grouped GEMM, against this plugin's Triton launches.

quack-kernels (Dao-AILab; the CuTe-DSL library SonicMoE builds on) has a Hopper grouped GEMM with a varlen M dimension
(``cu_seqlens_m``: one group per expert) and gathered A rows (``A_idx``, cp.async in a producer warp group), warp
specialised, persistent and with ping-pong consumers: what Triton 3.6 cannot compile on sm_90 (``bench/probe_ws.py``).
This bench times it at the block's real shapes, without LoRA (it has no LoRA epilogue), beside the plugin's launch
on the same operands without and with (fused) LoRA, and checks that both compute the same product. It answers
whether a CuTe-DSL fast path would pay, not how to build one.

Launches (T tokens, bf16, transformers' weight layout ``[E, N, K]``):
``up fwd`` x gathered (``ssi // k``) → grouped ``[L, 2I]``; ``down fwd`` grouped ``[L, I]`` → ``[L, H]``;
``down dX`` dy gathered (``ssi``) → grouped ``[L, I]``; ``up dX`` grouped ``[L, 2I]`` → ``[L, H]``.
quack writes every output in grouped order; the plugin's ``down fwd`` / ``up dX`` scatter theirs (compared through
``ssi``).

Needs ``quack-kernels`` and ``nvidia-cutlass-dsl`` (not dependencies of the plugin).
Usage: python bench/cute_peer.py [--shapes Qwen3-30B-A3B ...] [--configs default coop256 pp128] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import triton

from bench_gemm import SHAPES as GEMM_SHAPES

SHAPES = {name: spec[1:] for name, spec in GEMM_SHAPES.items()}  # name: (E, H, I, top_k)


def quack_configs(names):
    from quack.gemm_config import GemmConfig

    table = {
        # quack's sm90 default: 128×192, 2-CTA cluster along M, ping-pong consumers
        "default": None,
        "pp128x192c1": GemmConfig(tile_m=128, tile_n=192, cluster_m=1, cluster_n=1, pingpong=True,
                                  is_dynamic_persistent=False),
        "coop128x256c1": GemmConfig(tile_m=128, tile_n=256, cluster_m=1, cluster_n=1, pingpong=False,
                                    is_dynamic_persistent=False),
        "pp128x128c1": GemmConfig(tile_m=128, tile_n=128, cluster_m=1, cluster_n=1, pingpong=True,
                                  is_dynamic_persistent=False),
    }
    return [(n, table[n]) for n in names]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--configs", nargs="*", default=["default", "pp128x192c1", "coop128x256c1"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    t0 = time.perf_counter()
    from quack.gemm_interface import gemm, gemm_tuned

    print(f"quack import {time.perf_counter() - t0:.1f} s", flush=True)
    from host_plugin_scattermoe import kernels as K
    from host_plugin_scattermoe import ops
    from host_plugin_scattermoe.routing import sort_tokens

    dev, dt, T, r = "cuda", torch.bfloat16, args.tokens, args.rank
    rows = []
    for name in args.shapes:
        E, H, I, k = SHAPES[name]
        L = T * k
        g = torch.Generator(device=dev).manual_seed(0)
        sei, ssi, offs = sort_tokens(torch.randn(T, E, device=dev, generator=g).topk(k, -1).indices, E)

        def rnd(*shape, scale=0.02):
            return (torch.randn(*shape, device=dev, generator=g) * scale).to(dt)

        W1 = rnd(E, 2 * I, H).transpose(1, 2)  # kernel view [E, K, N] of the stored [E, N, K]
        W2 = rnd(E, H, I).transpose(1, 2)
        A1, B1 = ops.kernel_strides(rnd(E, r, H), rnd(E, 2 * I, r))
        A2, B2 = ops.kernel_strides(rnd(E, r, I), rnd(E, H, r))
        x, h, dy, dh = rnd(T, H, scale=1), rnd(L, I, scale=1), rnd(L, H, scale=1), rnd(L, 2 * I, scale=1)
        cu = torch.cat([offs.new_zeros(1), offs]).to(torch.int32)
        tok = (ssi // k).to(torch.int32)
        s32 = ssi.to(torch.int32)
        launches = [
            # name, ours(lora), quack(cfg), A operand, B view, gather idx, ours scatters its output
            ("up fwd", x, W1, k, False, True, A1, B1, tok, False),
            ("down fwd", h, W2, 1, True, False, A2, B2, None, True),
            ("down dX", dy, W2.transpose(1, 2), 1, False, True, B2.transpose(1, 2), A2.transpose(1, 2), s32, False),
            ("up dX", dh, W1.transpose(1, 2), 1, True, False, B1.transpose(1, 2), A1.transpose(1, 2), None, True),
        ]
        for lname, a, W, fan, gin, gout, LA, LB, idx, scattered in launches:
            flops = 2 * L * W.shape[1] * W.shape[2]

            def ours(lora):
                kw = dict(A=LA, B=LB, write_xa=True) if lora else {}
                return K.scatter2scatter(a, W, ssi, offs, fan, scaling=2.0, grouped_in=gin, grouped_out=gout, **kw)[0]

            ref = ours(False)
            ref_g = ref[ssi] if scattered else ref
            for lora in (False, True):
                ms = triton.testing.do_bench(lambda: ours(lora), warmup=10, rep=40)
                v = "triton rule" + (" + LoRA" if lora else "")
                rows.append({"shape": name, "launch": lname, "variant": v, "ms": ms, "tflops": flops / ms / 1e9})
                print(f"{name:<16}{lname:<9}{v:<24}{ms:>8.3f}{flops / ms / 1e9:>7.0f}", flush=True)
            out = torch.empty(L, W.shape[2], device=dev, dtype=dt)
            for cname, cfg in quack_configs(args.configs):
                if cfg is None:
                    def run():
                        return gemm(a, W, out=out, cu_seqlens_m=cu, A_idx=idx, tuned=False)
                else:
                    def run():
                        gemm_tuned.fn(a, W, out, cu_seqlens_m=cu, A_idx=idx, config=cfg)
                        return out
                try:
                    t1 = time.perf_counter()
                    got = run()
                    torch.cuda.synchronize()
                    cold = time.perf_counter() - t1
                    err = ((got.float() - ref_g.float()).abs().max() / ref_g.float().abs().max()).item()
                    ms = triton.testing.do_bench(run, warmup=10, rep=40)
                except Exception as e:  # noqa: BLE001 - a config that does not apply is reported, not fatal
                    print(f"{name:<16}{lname:<9}quack {cname} failed: {e!r}"[:400], flush=True)
                    continue
                v = f"quack {cname}"
                rows.append({"shape": name, "launch": lname, "variant": v, "ms": ms, "tflops": flops / ms / 1e9,
                             "cold_s": cold, "relerr": err})
                print(f"{name:<16}{lname:<9}{v:<24}{ms:>8.3f}{flops / ms / 1e9:>7.0f}  cold {cold:5.1f} s  "
                      f"relerr {err:.1e}", flush=True)
        torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}  T={T} bf16, per launch ms (TFLOP/s); quack without LoRA")
    variants = list(dict.fromkeys(r_["variant"] for r_ in rows))
    print(f"{'shape':<16}{'launch':<9}" + "".join(f"{v[:18]:>20}" for v in variants))
    for name in args.shapes:
        for lname in ("up fwd", "down fwd", "down dX", "up dX"):
            got = {r_["variant"]: r_ for r_ in rows if r_["shape"] == name and r_["launch"] == lname}
            if got:
                print(f"{name:<16}{lname:<9}" + "".join(
                    f"{got[v]['ms']:>12.3f} ({got[v]['tflops']:>4.0f})" if v in got else f"{'-':>20}" for v in variants))
    path = args.json or os.path.join(os.environ.get("OUT", "."), "cute_peer.json")
    with open(path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "tokens": T, "rank": r, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
