"""Does a newer Triton's Hopper warp specialisation speed up this plugin's grouped GEMM? (issue 16)

Triton 3.6 (the device image's) hangs every warp-specialised launch on sm_90 (``probe_ws.py``, eighth session). Under
Triton 3.9, compiled for sm_90a, the pass applies (``setmaxnreg`` in the PTX: producer and consumer warps with their
own register budgets) only to a persistent tile loop with in-kernel tensor descriptors and 4 warps per consumer
group, ``tl.range(..., warp_specialize=True)`` on the tile loop; a host-built descriptor fails its pass and 8 warps
compile without it. This probe times such a persistent grouped GEMM (rows already grouped by expert, one weight
matrix per expert, no LoRA: the ``down fwd`` and ``up dX`` launches of a block step) with and without the pass,
beside the plugin's own launch of the same GEMM (``kernels.scatter2scatter``, its rule's tiles) and cuBLAS dense of
the same FLOPs, and checks each against a float32 reference.

``--compile-check`` compiles the variants for sm_90a without a GPU and counts ``wgmma`` and ``setmaxnreg``.
Usage: python bench/probe_ws_grouped.py [--shapes Qwen3-30B-A3B ...] [--json out.json] [--compile-check]
"""

from __future__ import annotations

import argparse
import json

import os

import triton
import triton.language as tl
from bench_gemm import SHAPES as GEMM_SHAPES

#: the interpreter's CPU (TRITON_INTERPRET=1, a smoke run of this script) or the GPU
DEV = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
#: name: (E, H, I, top_k), bench_gemm.py's shapes, and a tiny one for the interpreter's smoke run
SHAPES = {name: spec[1:] for name, spec in GEMM_SHAPES.items()} | {"tiny": (4, 128, 64, 2)}
VARIANTS = {  # name: (BM, BN, BK, warps, stages, WS, FLAT)
    "persist": (128, 256, 64, 8, 3, False, True),
    "persist nf": (128, 256, 64, 8, 4, False, False),
    "ws 128x256": (128, 256, 64, 4, 3, True, False),
    "ws 128x128": (128, 128, 64, 4, 4, True, False),
    "ws 128x256 s4": (128, 256, 64, 4, 4, True, False),
}


@triton.jit
def _grouped(X, W, Y, blk_ptr, nblk_ptr, L, K, N, E, s_ym,
             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, W_NK: tl.constexpr,
             WS: tl.constexpr, FLAT: tl.constexpr):
    """Y[rows of e] = X[rows of e] · W_e for each row block (e, row0, end) of ``blk_ptr`` ([3, n] int32)."""
    x_d = tl.make_tensor_descriptor(X, shape=[L, K], strides=[K, 1], block_shape=[BM, BK])
    if W_NK:  # W stored [E, N, K] (K contiguous), as transformers stores the experts
        w_d = tl.make_tensor_descriptor(W, shape=[E * N, K], strides=[K, 1], block_shape=[BN, BK])
    else:  # [E, K, N]
        w_d = tl.make_tensor_descriptor(W, shape=[E * K, N], strides=[N, 1], block_shape=[BK, BN])
    num_n = tl.cdiv(N, BN)
    nblk = tl.load(nblk_ptr)
    for t in tl.range(tl.program_id(0), nblk * num_n, tl.num_programs(0), flatten=FLAT, warp_specialize=WS):
        pm = t // num_n
        pn = t % num_n
        e = tl.load(blk_ptr + pm)
        row0 = tl.load(blk_ptr + nblk + pm)
        end = tl.load(blk_ptr + 2 * nblk + pm)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in tl.range(0, K, BK):
            a = x_d.load([row0, k])
            if W_NK:
                acc = tl.dot(a, w_d.load([e * N + pn * BN, k]).T, acc)
            else:
                acc = tl.dot(a, w_d.load([e * K + k, pn * BN]), acc)
        rows = row0 + tl.arange(0, BM)
        cols = pn * BN + tl.arange(0, BN)
        tl.store(Y + rows[:, None].to(tl.int64) * s_ym + cols[None, :], acc.to(Y.dtype.element_ty),
                 mask=(rows < end)[:, None] & (cols < N)[None, :])


def block_table(counts, BM):
    """``[3, n]`` int32 (expert, first row, end row) of every row block, and ``n``."""
    import torch

    ends = counts.cumsum(0)
    starts = ends - counts
    nb = (counts + BM - 1) // BM
    e = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), nb)
    first = torch.repeat_interleave(nb.cumsum(0) - nb, nb)
    row0 = starts[e] + (torch.arange(len(e), device=counts.device) - first) * BM
    return torch.stack([e, row0, ends[e]]).to(torch.int32).contiguous(), len(e)


def bench(fn) -> float:
    """Median ms on the GPU; under the interpreter one call, untimed (nan)."""
    if DEV == "cpu":
        fn()
        return float("nan")
    return triton.testing.do_bench(fn, warmup=10, rep=60)


def launches(name, T=4096):
    """``[(launch, X [L, K] grouped, W, W_NK, counts)]``: the two grouped-input launches of a block step, routing as
    the block bench's (random router logits, top-k)."""
    import torch

    E, H, I, k = SHAPES[name]
    T = 64 if name == "tiny" else T
    g = torch.Generator(device=DEV).manual_seed(0)
    idx = torch.randn(T, E, device=DEV, generator=g).topk(k, -1).indices
    counts = torch.bincount(idx.flatten(), minlength=E)
    L = T * k
    dt = torch.float16 if DEV == "cpu" else torch.bfloat16
    act = torch.randn(L, I, device=DEV, generator=g).to(dt)
    dh = torch.randn(L, 2 * I, device=DEV, generator=g).to(dt)
    W2 = (torch.randn(E, H, I, device=DEV, generator=g) * I ** -0.5).to(dt)  # [E, N=H, K=I]
    W1 = (torch.randn(E, 2 * I, H, device=DEV, generator=g) * (2 * I) ** -0.5).to(dt)  # dX: [E, K=2I, N=H]
    return [("down fwd", act, W2, True, counts), ("up dX", dh, W1, False, counts)]


def reference(X, W, W_NK, counts):
    import torch

    out, r0 = [], 0
    for e, c in enumerate(counts.tolist()):
        w = W[e].float()
        out.append(X[r0:r0 + c].float() @ (w.T if W_NK else w))
        r0 += c
    return torch.cat(out)


def run_variant(name, X, W, W_NK, tab, nblk, num_sms):
    import torch

    BM, BN, BK, warps, stages, ws, flat = VARIANTS[name]
    L, K = X.shape
    E = W.shape[0]
    N = W.shape[1] if W_NK else W.shape[2]
    Y = torch.empty(L, N, device=DEV, dtype=X.dtype)
    nb = torch.tensor([nblk], device=DEV, dtype=torch.int32)
    tiles = nblk * triton.cdiv(N, BN)

    def go():
        _grouped[(min(num_sms, tiles),)](X, W, Y, tab, nb, L, K, N, E, Y.stride(0), BM=BM, BN=BN, BK=BK, W_NK=W_NK,
                                         WS=ws, FLAT=flat, num_warps=warps, num_stages=stages)
    go()
    if DEV == "cuda":
        torch.cuda.synchronize()
    return go, Y


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=["Qwen3-30B-A3B"])
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--json")
    ap.add_argument("--compile-check", action="store_true")
    args = ap.parse_args()
    if args.compile_check:
        return compile_check(args.variants)
    import torch

    from host_plugin_scattermoe import kernels as K

    triton.set_allocator(lambda size, align, stream: torch.empty(size, device=DEV, dtype=torch.int8))
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else 4
    rows = []
    print(f"{torch.cuda.get_device_name() if DEV == 'cuda' else 'interpreter'}  triton {triton.__version__}  torch {torch.__version__}", flush=True)
    for shape in args.shapes:
        for launch, X, W, W_NK, counts in launches(shape):
            L, Kd = X.shape
            N = W.shape[1] if W_NK else W.shape[2]
            flops = 2 * L * Kd * N
            want = reference(X, W, W_NK, counts)
            res = {}
            for v in args.variants:
                BM = VARIANTS[v][0]
                tab, nblk = block_table(counts, BM)
                try:
                    go, Y = run_variant(v, X, W, W_NK, tab, nblk, num_sms)
                    err = ((Y.float() - want).norm() / want.norm()).item()
                    ms = bench(go)
                    res[v] = dict(ms=ms, err=err)
                except Exception as exc:  # noqa: BLE001 - a variant that fails is reported
                    res[v] = dict(error=repr(exc)[:200])
                print(shape, launch, v, res[v], flush=True)
            # the plugin's own launch: grouped in, grouped out, no LoRA (kernel view [E, K, N])
            E = W.shape[0]
            ssi = torch.arange(L, device=DEV)
            offs = counts.cumsum(0)
            Wk = W.transpose(1, 2) if W_NK else W
            go = lambda: K.scatter2scatter(X, Wk, ssi, offs, 1, grouped_in=True, grouped_out=True)  # noqa: E731
            Y, _ = go()
            res["plugin"] = dict(ms=bench(go),
                                 err=((Y.float() - want).norm() / want.norm()).item())
            a = torch.randn(L, Kd, device=DEV, dtype=X.dtype)
            b = torch.randn(Kd, N, device=DEV, dtype=X.dtype)
            res["cuBLAS dense"] = dict(ms=bench(lambda: a @ b), err=0.0)
            for v, r in res.items():
                rows.append(dict(shape=shape, launch=launch, variant=v, tflops=flops / r["ms"] / 1e9 if "ms" in r else None,
                                 **r))
    print(f"\n{'shape':<16}{'launch':<10}{'variant':<16}{'ms':>8}{'TFLOP/s':>9}{'rel err':>10}")
    for r in rows:
        if "ms" in r:
            print(f"{r['shape']:<16}{r['launch']:<10}{r['variant']:<16}{r['ms']:>8.3f}{r['tflops']:>9.0f}{r['err']:>10.1e}")
        else:
            print(f"{r['shape']:<16}{r['launch']:<10}{r['variant']:<16}  {r['error'][:60]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "rows": rows}, f, indent=1)


def compile_check(variants):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for v in variants:
        BM, BN, BK, warps, stages, ws, flat = VARIANTS[v]
        for w_nk in (True, False):
            sig = {"X": "*bf16", "W": "*bf16", "Y": "*bf16", "blk_ptr": "*i32", "nblk_ptr": "*i32", "L": "i32",
                   "K": "i32", "N": "i32", "E": "i32", "s_ym": "i32"}
            const = dict(BM=BM, BN=BN, BK=BK, W_NK=w_nk, WS=ws, FLAT=flat)
            sig.update({c: "constexpr" for c in const})
            try:
                ck = triton.compile(ASTSource(fn=_grouped, signature=sig, constexprs=const),
                                    target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
                ptx = ck.asm["ptx"]
                print(v, "W_NK" if w_nk else "W_KN", "wgmma", ptx.count("wgmma.mma_async"), "setmaxnreg",
                      ptx.count("setmaxnreg"), "warps", ck.metadata.num_warps, flush=True)
            except Exception as exc:  # noqa: BLE001
                print(v, "W_NK" if w_nk else "W_KN", "FAIL", repr(exc)[:150], flush=True)


if __name__ == "__main__":
    main()
