"""How fast is torch's own grouped GEMM (`torch._grouped_mm`, CUTLASS on sm90) at the block's four base GEMMs?

A probe for issue 16: the Triton `_s2s_kernel` reaches 350-450 TFLOP/s at the many-expert shapes, cuBLAS dense
GEMMs 640-760. This times `torch._grouped_mm` on the same grouped operands (rows already in expert order, no LoRA),
each weight layout, and the row gather a gathered launch would need first. Prints a table, writes JSON.

Usage: python bench/grouped_mm_probe.py [--shapes ...] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_moe_block import SHAPES  # noqa: E402


def timed(fn, iters=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def probe(name, T):
    _, E, H, I, k = SHAPES[name]
    dev, dt = "cuda", torch.bfloat16
    logits = torch.randn(T, E, device=dev)
    eidx = logits.topk(k, dim=-1).indices.flatten()
    order = eidx.argsort(stable=True)
    counts = torch.bincount(eidx, minlength=E)
    offs = counts.cumsum(0).to(torch.int32)
    M = T * k
    x = torch.randn(T, H, device=dev, dtype=dt)
    rows = []
    # (launch, K, N): forward up [M,H]x[H,2I], down [M,I]x[I,H]; dX down [M,H]x[H,I], up [M,2I]x[2I,H]
    for launch, K, N in (("up fwd", H, 2 * I), ("down fwd", I, H), ("down dX", H, I), ("up dX", 2 * I, H)):
        a = torch.randn(M, K, device=dev, dtype=dt)
        w_nk = torch.randn(E, N, K, device=dev, dtype=dt)  # weight stored [E, out, in]: mat_b = its transpose view
        w_kn = w_nk.transpose(1, 2).contiguous()  # the other layout
        flop = 2 * M * K * N
        for layout, b in (("[E,N,K]^T", w_nk.transpose(1, 2)), ("[E,K,N]", w_kn)):
            try:
                ms = timed(lambda: torch._grouped_mm(a, b, offs=offs))
                rows.append(dict(shape=name, launch=launch, layout=layout, M=M, K=K, N=N, ms=ms, tflops=flop / ms / 1e9))
            except Exception as e:  # noqa: BLE001 - report and go on
                rows.append(dict(shape=name, launch=launch, layout=layout, error=f"{type(e).__name__}: {e}"[:160]))
        dense = timed(lambda: torch.mm(a, w_kn[0]))
        rows.append(dict(shape=name, launch=launch, layout="dense mm", M=M, K=K, N=N, ms=dense, tflops=flop / dense / 1e9))
    src = (order // k).to(torch.int64)
    g = timed(lambda: x.index_select(0, src))
    rows.append(dict(shape=name, launch="gather x rows", layout="index_select", M=M, K=H, ms=g))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--json", default=os.environ.get("OUT", "/tmp") + "/grouped_mm_probe.json")
    args = ap.parse_args()
    rows = []
    for name in args.shapes:
        rows += probe(name, args.tokens)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  T={args.tokens} bf16, no LoRA")
    print(f"{'shape':16} {'launch':14} {'layout':13} {'ms':>7} {'TFLOP/s':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:16} {r['launch']:14} {r['layout']:13} {r['error']}")
        else:
            print(f"{r['shape']:16} {r['launch']:14} {r['layout']:13} {r['ms']:7.3f} {r.get('tflops', 0):8.0f}")
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
