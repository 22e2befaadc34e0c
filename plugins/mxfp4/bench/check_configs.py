"""GPU: run the FP4 kernel in every mode with every autotune config, each in its own process
(an illegal address kills the CUDA context), and compare with a dequantized bf16 reference.

Usage: python check_configs.py [modes] ; CHECK_SHAPE="E,N,K,T,k,r" and CHECK_DTYPE=float16 pick another case
(default: Qwen3-30B-A3B's down projection in bf16); CHECK_E_POW2=4 launches with another expert-vector width than
``expert_block(E)`` (the width strategy B passed before the fourth session)."""

import os
import subprocess
import sys

import torch


def one(mode, cfg_idx, E=128, N=2048, K=768, T=4096, k=8, r=16, dtype=torch.bfloat16):
    import triton

    from host_plugin_scattermoe.routing import sort_tokens

    from host_plugin_mxfp4 import kernels as Kn
    from host_plugin_mxfp4.formats import FP4Weights

    cfg = Kn._configs()[cfg_idx]
    g = torch.Generator(device="cuda").manual_seed(0)
    w = FP4Weights.quantize(torch.randn(E, N, K, generator=g, device="cuda") * 0.02, "mxfp4")
    # the last expert idle when the case is small (as in test_mxfp4_kernels)
    idx = torch.rand(T, E - 1 if E <= 8 else E, generator=g, device="cuda").topk(k, -1).indices
    sei, ssi, offs = sort_tokens(idx, E)
    L = T * k
    A = torch.randn(E, r, K, generator=g, device="cuda").to(dtype) * 0.02
    B = torch.randn(E, N, r, generator=g, device="cuda").to(dtype) * 0.02
    Wd = w.dequantize(dtype)  # [E, N, K]
    red_k = mode.startswith("fwd")
    gin = mode.endswith("gin")
    I, J = (K, N) if red_k else (N, K)
    flat = not red_k and not gin  # the dX of a scattered-output projection reads dY in flat order
    x = torch.randn((L if (gin or flat) else T), I, generator=g, device="cuda").to(dtype)
    fan = 1 if (gin or flat) else k
    out = torch.empty(L, J, device="cuda", dtype=dtype)
    xa = torch.empty(L, r, device="cuda", dtype=torch.float32)
    Am, Bm = (A, B) if red_k else (B.transpose(1, 2), A.transpose(1, 2))
    sc = w.scales
    args = (
        x, w.packed, sc, out, Am, Bm, xa, out, ssi, offs, I, J, r, E, fan, 1,
        x.stride(0), x.stride(1), *w.packed.stride(), *sc.stride(), out.stride(0), out.stride(1),
        *Am.stride(), *Bm.stride(), xa.stride(0), xa.stride(1), 0, 0, 2.0,
    )
    e_pow2 = int(os.environ.get("CHECK_E_POW2", 0)) or Kn.expert_block(E)
    meta = dict(RED_IS_K=red_k, SCALE_KIND=0, FP4_BLOCK=32, X_GROUPED=gin, Y_GROUPED=not gin, LORA=1, WRITE_XA=True,
                HAS_BIAS=False, INT64=False, DOT_PREC="tf32", E_POW2=e_pow2, BLOCK_R=Kn.rank_block(r),
                DECODE_ASM=Kn.decode_asm(x, 0))
    grid = (triton.cdiv(J, cfg.kwargs["BLOCK_J"]), triton.cdiv(L, cfg.kwargs["BLOCK_M"]) + E)
    Kn._fp4_kernel[grid](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    torch.cuda.synchronize()
    # reference
    xs = x if gin else (x[ssi] if flat else x[ssi // k])
    ref = torch.empty(L, J, device="cuda", dtype=torch.float32)
    starts = torch.cat([offs.new_zeros(1), offs[:-1]]).tolist()
    ends = offs.tolist()
    for e in range(E):
        s, t = starts[e], ends[e]
        if t <= s:
            continue
        xe = xs[s:t].float()
        We = Wd[e].float()  # [N, K]
        if red_k:
            y = xe @ We.t() + 2.0 * (xe @ A[e].float().t()) @ B[e].float().t()
        else:
            y = xe @ We + 2.0 * (xe @ B[e].float()) @ A[e].float()
        ref[s:t] = y
    got = out.float()
    if gin:  # Y scattered to flat positions (otherwise Y_GROUPED: rows already in sorted order)
        got = got[ssi]
    err = ((got - ref).norm() / ref.norm()).item()
    print(f"RESULT {mode} cfg{cfg_idx} {cfg} rel_err={err:.2e}")


if __name__ == "__main__":
    if len(sys.argv) > 2:
        sizes = os.environ.get("CHECK_SHAPE")
        shape = dict(zip("E N K T k r".split(), map(int, sizes.split(",")))) if sizes else {}
        one(sys.argv[1], int(sys.argv[2]), **shape, dtype=getattr(torch, os.environ.get("CHECK_DTYPE", "bfloat16")))
        sys.exit(0)
    from host_plugin_mxfp4 import kernels as Kn

    for mode in sys.argv[1].split(",") if len(sys.argv) > 1 else ("fwd", "fwd_gin", "dx", "dx_gin"):
        for i in range(len(Kn._configs())):
            p = subprocess.run([sys.executable, __file__, mode, str(i)], capture_output=True, text=True,
                               env={**os.environ, "CUDA_LAUNCH_BLOCKING": "1"})
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT")]
            print(line[0] if line else f"FAIL {mode} cfg{i}: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}", flush=True)
