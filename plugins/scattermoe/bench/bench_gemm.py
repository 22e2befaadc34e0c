"""Where the block's time goes: each expert GEMM of the Qwen3-30B-A3B shape alone, vs cuBLAS.

For the up (K=2048 → N=1536) and down (768 → 2048) projections at T·k = 32768 routed rows, times
(median, ms) and TFLOP/s of: a dense cuBLAS ``torch.mm`` of the same total FLOPs (the ceiling for a
GEMM of this size on this device), ``torch._grouped_mm`` on the pre-sorted rows (what transformers'
``grouped_mm`` runs, no LoRA), and ``scatter2scatter`` without LoRA, with fused LoRA, and with the
split LoRA epilogue, gathered and grouped input. Usage: python bench/bench_gemm.py [--tokens 4096]
"""

from __future__ import annotations

import argparse

import torch
import triton


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    from host_plugin_scattermoe import kernels as K
    from host_plugin_scattermoe.routing import sort_tokens

    T, E, k, r = args.tokens, args.experts, args.top_k, args.rank
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    logits = torch.randn(T, E, device=dev, generator=g)
    sei, ssi, offs = sort_tokens(logits.topk(k, -1).indices, E)
    L = T * k
    rows = []
    for name, Kd, N in (("up", 2048, 1536), ("down", 768, 2048)):
        x = torch.randn(T, Kd, device=dev, dtype=dt)
        xg = torch.randn(L, Kd, device=dev, dtype=dt)
        W = (torch.randn(E, N, Kd, device=dev, dtype=dt) * 0.02).transpose(1, 2)  # transformers' [E, N, K]
        A = torch.randn(E, r, Kd, device=dev, dtype=dt) * 0.02
        B = torch.randn(E, N, r, device=dev, dtype=dt) * 0.02
        xa = torch.randn(L, r, device=dev, dtype=torch.float32)
        fl = 2 * L * Kd * N
        dense_b = torch.randn(Kd, N, device=dev, dtype=dt)
        cases = {
            "cuBLAS dense mm": lambda: xg @ dense_b,
            "torch._grouped_mm": lambda: torch._grouped_mm(xg, W, offs=offs.to(torch.int32)),
            "s2s no LoRA, gathered": lambda: K.scatter2scatter(x, W, ssi, offs, k, grouped_out=True),
            "s2s no LoRA, grouped": lambda: K.scatter2scatter(xg, W, ssi, offs, 1, grouped_in=True),
            "s2s fused LoRA, gathered": lambda: K.scatter2scatter(x, W, ssi, offs, k, A=A, B=B, grouped_out=True, write_xa=True),
            "s2s split epilogue, gathered": lambda: K.scatter2scatter(x, W, ssi, offs, k, B=B, xa_in=xa, grouped_out=True),
            "s2s dX-like (Wᵀ, fused)": lambda: K.scatter2scatter(
                torch.randn(L, N, device=dev, dtype=dt), W.transpose(1, 2), ssi, offs, 1,
                A=B.transpose(1, 2), B=A.transpose(1, 2), grouped_in=True, write_xa=True),
        }
        for case, fn in cases.items():
            try:
                fn()
                ms = triton.testing.do_bench(fn, warmup=10, rep=50)
            except Exception as e:  # noqa: BLE001 - report, keep going
                print(case, "failed:", repr(e)[:200])
                continue
            rows.append((name, case, ms, fl / ms / 1e9))
    print(f"\n{torch.cuda.get_device_name()}  T={T} E={E} k={k} r={r} bf16  (rows = {L})")
    print(f"{'proj':<6}{'case':<32}{'ms':>8}{'TFLOP/s':>9}")
    for name, case, ms, tf in rows:
        print(f"{name:<6}{case:<32}{ms:>8.3f}{tf:>9.0f}")
    for key, conf in K._PICKED.items():
        print("tiles", key, conf)


if __name__ == "__main__":
    main()
