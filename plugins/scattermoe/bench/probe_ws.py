"""Does Triton's Hopper warp specialisation run at all, and which feature of ``_s2s_kernel``'s WS tile hangs it?

On an H100 (2026-12-07, Triton 3.6) every launch of the WS tile (``SCATTERMOE_WS``) hung: the GPU test, the block
bench's ``scattermoe+ws`` row and ``bench_gemm.py --ws`` ran into their time limits. This probe times a plain
descriptor GEMM (``C = A·Bᵀ``, bf16, 128×256×64, 3 stages) with and without ``tl.range(..., warp_specialize=True)``,
then adds the WS tile's features one at a time, each in its own process under a time limit (a hung kernel never
returns):

* ``ws``: the plain loop warp-specialised (4 warps, as the tile);
* ``ws+zero``: programs past the last row block run a loop of no steps (the tile's spare programs);
* ``ws+epi``: a post-loop descriptor load and a rank-16 ``tl.dot`` into the accumulator (the tile's split LoRA);
* ``ws+scatter``: the epilogue stores rows through a row-index vector (the tile's scattered output);
* ``ws+coord``: the row block's TMA coordinate comes from a pointer load before the loop (the tile locates its
  expert from the offsets vector).

``--compile-check`` compiles every variant for sm_90a on a machine without a GPU. Usage:
python bench/probe_ws.py [--timeout 25] [--compile-check]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import triton
import triton.language as tl

VARIANTS = {  # name: (WS, ZERO, EPI, SCATTER, COORD, num_warps)
    "plain": (False, False, False, False, False, 8),
    "ws": (True, False, False, False, False, 4),
    "ws+zero": (True, True, False, False, False, 4),
    "ws+epi": (True, False, True, False, False, 4),
    "ws+scatter": (True, False, False, True, False, 4),
    "ws+coord": (True, False, False, False, True, 4),
}
BM, BN, BK, STAGES = 128, 256, 64, 3


@triton.jit
def _mm(a_d, b_d, r_d, f_d, C, rows_ptr, blk_ptr, M, N, K, live_m, s_cm,
        WS: tl.constexpr, ZERO: tl.constexpr, EPI: tl.constexpr, SCATTER: tl.constexpr, COORD: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BN)
    pm = pid // num_n
    pn = pid % num_n
    if COORD:
        pm = tl.load(blk_ptr + pm)
    k_stop = K
    if ZERO:
        k_stop = tl.where(pm < live_m, K, 0)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in tl.range(0, k_stop, BK, warp_specialize=WS):
        a = a_d.load([pm * BM, k])
        b = b_d.load([pn * BN, k])
        acc = tl.dot(a, b.T, acc)
    if EPI:
        r = r_d.load([pm * BM, 0])  # [BM, 16] fp32
        acc = tl.dot(r.to(tl.bfloat16), f_d.load([0, pn * BN]), acc)  # [16, BN] bf16
    m = pm * BM + tl.arange(0, BM)
    n = pn * BN + tl.arange(0, BN)
    mask = (m < M)[:, None] & (n < N)[None, :]
    if SCATTER:
        m = tl.load(rows_ptr + m, mask=m < M, other=0)
    tl.store(C + m[:, None] * s_cm + n[None, :], acc.to(tl.bfloat16), mask=mask)


def run_one(name: str, M=8192, N=2048, K=2048) -> dict:
    import torch
    from triton.tools.tensor_descriptor import TensorDescriptor

    ws, zero, epi, scatter, coord, warps = VARIANTS[name]
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    b = torch.randn(N, K, device="cuda", generator=g).bfloat16() / K ** 0.5
    r = torch.randn(M, 16, device="cuda", generator=g)
    f = torch.randn(16, N, device="cuda", generator=g).bfloat16()
    rows = torch.randperm(M, device="cuda", generator=g)
    c = torch.zeros(M, N, device="cuda", dtype=torch.bfloat16)
    live = triton.cdiv(M, BM)
    blk = torch.arange(live + 64, device="cuda", dtype=torch.int32)
    extra = 64 if zero else 0
    grid = ((live + extra) * triton.cdiv(N, BN),)
    args = (TensorDescriptor.from_tensor(a, [BM, BK]), TensorDescriptor.from_tensor(b, [BN, BK]),
            TensorDescriptor.from_tensor(r, [BM, 16]), TensorDescriptor.from_tensor(f, [16, BN]),
            c, rows, blk, M, N, K, live, c.stride(0))
    meta = dict(WS=ws, ZERO=zero, EPI=epi, SCATTER=scatter, COORD=coord, BM=BM, BN=BN, BK=BK, num_warps=warps, num_stages=STAGES)
    t0 = time.time()
    _mm[grid](*args, **meta)
    torch.cuda.synchronize()
    first = time.time() - t0
    want = a.float() @ b.float().T
    if epi:
        want += r.bfloat16().float() @ f.float()
    got = c.float()
    if scatter:
        got = got[rows]
    err = ((got - want).norm() / want.norm()).item()
    ms = triton.testing.do_bench(lambda: _mm[grid](*args, **meta), warmup=10, rep=50)
    return {"variant": name, "ok": True, "first_s": round(first, 2), "ms": ms,
            "tflops": 2 * M * N * K / ms / 1e9, "rel_err": err}


def compile_check(name: str) -> dict:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ws, zero, epi, scatter, coord, warps = VARIANTS[name]
    sig = {"a_d": f"tensordesc<bf16[{BM}, {BK}]>", "b_d": f"tensordesc<bf16[{BN}, {BK}]>",
           "r_d": f"tensordesc<fp32[{BM}, 16]>", "f_d": f"tensordesc<bf16[16, {BN}]>", "C": "*bf16",
           "rows_ptr": "*i64", "blk_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "live_m": "i32", "s_cm": "i32"}
    const = dict(WS=ws, ZERO=zero, EPI=epi, SCATTER=scatter, COORD=coord, BM=BM, BN=BN, BK=BK)
    sig.update({k: "constexpr" for k in const})
    ck = triton.compile(ASTSource(fn=_mm, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": warps, "num_stages": STAGES})
    ptx = ck.asm["ptx"]
    return {"variant": name, "warps": ck.metadata.num_warps, "wgmma": ptx.count("wgmma.mma_async"),
            "tma": ptx.count("cp.async.bulk.tensor"), "mbarrier_wait": ptx.count("mbarrier.try_wait")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--timeout", type=float, default=25)
    ap.add_argument("--compile-check", action="store_true")
    ap.add_argument("--one")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one)), flush=True)
        return
    if args.compile_check:
        for name in VARIANTS:
            try:
                print(compile_check(name))
            except Exception as e:  # noqa: BLE001 - report each variant
                print({"variant": name, "compile_error": repr(e)[:300]})
        return
    rows = []
    for name in VARIANTS:
        try:
            p = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True,
                               timeout=args.timeout, env=os.environ)
            got = [ln[7:] for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            row = json.loads(got[0]) if got else {"variant": name, "ok": False,
                                                   "error": (p.stderr.strip().splitlines() or ["?"])[-1][:200]}
        except subprocess.TimeoutExpired:
            row = {"variant": name, "ok": False, "error": f"no result in {args.timeout:.0f} s (hang)"}
        rows.append(row)
        print(row, flush=True)
    print(f"\n{'variant':<12}{'result':<40}{'ms':>8}{'TFLOP/s':>9}{'rel err':>10}")
    for r in rows:
        res = "ok" if r.get("ok") else r.get("error", "")
        print(f"{r['variant']:<12}{res[:39]:<40}{r.get('ms', float('nan')):>8.3f}{r.get('tflops', float('nan')):>9.0f}"
              f"{r.get('rel_err', float('nan')):>10.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
