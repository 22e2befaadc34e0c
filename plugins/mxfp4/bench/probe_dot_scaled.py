"""Probe (GPU, forward only, no LoRA): can a decode-in-the-GEMM forward reach bf16 speed on Hopper?

Times, at the up projection of Qwen3.5-35B-A3B and Qwen3-30B-A3B (T=4096, k=8, rows already grouped
by expert, balanced routing: 128 / 256 rows per expert), y_e = x_e · W_eᵀ for:

* ``bf16 tl.dot``: a plain grouped GEMM on the decoded bf16 weights (the same simple kernel shape);
* ``dot_scaled rhs``: ``tl.dot_scaled(x, None, "bf16", Wqᵀ, scales, "e2m1")`` on the packed MXFP4
  container as stored (``[E, N, K/2]`` bytes, ``[E, N, K/32]`` E8M0 scales): Triton upcasts in registers;
* ``dot_scaled lhs (swapped)``: ``yᵀ = W · xᵀ`` with the packed weight as the left operand (wgmma
  reads A from registers, so the upcast operand need not go back through shared memory);
* ``B tile (fp32 decode)`` / ``B tile (asm decode)``: strategy B's own weight tile (``kernels._fp4_tile``: the
  packed tile decoded in the K loop, nibbles interleaved back into one ``[BN, BK]`` tile) with the fp32 or the bf16x2
  PTX decode, as the right operand, and as the left one of ``yᵀ = W · xᵀ`` (``lhs``, which wgmma can read from
  registers instead of shared memory);
* ``B kernel``: strategy B's autotuned forward kernel itself (no LoRA), with either decode;
* ``scattermoe bf16``: ``ops.scattered_experts`` (grouped in/out, no LoRA) on the decoded weights;
* ``decode + scattermoe``: the dequantize kernel then scattermoe (strategy A's forward cost).

Each variant is checked against a float32 reference (relative error). Prints a table; JSON to $OUT.
``--cpu-check`` runs the fp32-decode and bf16 variants under the Triton interpreter at a toy shape instead (no GPU).
"""

from __future__ import annotations

import json
import os
import sys

if "--cpu-check" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import triton
import triton.language as tl

from host_plugin_mxfp4 import kernels as fp4_kernels
from host_plugin_mxfp4.formats import FP4Weights
from host_plugin_mxfp4.kernels import _fp4_tile

#: The probe's variants: name -> (``VARIANT``, ``SWAP``) of :func:`_probe_kernel`.
VARIANTS = {
    "bf16 tl.dot": (0, False), "dot_scaled rhs": (1, False), "dot_scaled lhs (swapped)": (1, True),
    "B tile (fp32 decode)": (2, False), "B tile lhs (fp32 decode, swapped)": (2, True),
    "B tile (asm decode)": (3, False), "B tile lhs (asm decode, swapped)": (3, True),
}


@triton.jit
def _probe_kernel(X, W, Wq, S, Y, ROWS, N, K, VARIANT: tl.constexpr, SWAP: tl.constexpr, BM: tl.constexpr,
                  BN: tl.constexpr, BK: tl.constexpr):
    """One ``[BM, BN]`` tile of ``y = x · W_eᵀ`` (rows grouped by expert, ``ROWS`` per expert): ``VARIANT`` 0 reads
    the decoded bf16 weights, 1 the packed ones through ``tl.dot_scaled``, 2 / 3 decode them as strategy B does
    (fp32 / PTX decode); ``SWAP`` accumulates ``yᵀ = W_e · xᵀ`` so the weight is the left operand, which wgmma may read
    from registers."""
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    m = pid_m * BM + tl.arange(0, BM)
    e = ((pid_m * BM) // ROWS).to(tl.int64)
    n = pid_n * BN + tl.arange(0, BN)
    if SWAP:
        acc = tl.zeros((BN, BM), tl.float32)
    else:
        acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        if SWAP:
            x = tl.load(X + m[None, :].to(tl.int64) * K + k[:, None])  # [BK, BM]
        else:
            x = tl.load(X + m[:, None].to(tl.int64) * K + k[None, :])  # [BM, BK]
        if VARIANT == 0:
            acc = tl.dot(x, tl.load(W + e * N * K + n[None, :] * K + k[:, None]), acc)  # [BK, BN] of W_e
        elif VARIANT == 1:
            kb = k0 // 2 + tl.arange(0, BK // 2)
            ks = k0 // 32 + tl.arange(0, BK // 32)
            sc = tl.load(S + e * N * (K // 32) + n[:, None] * (K // 32) + ks[None, :])  # [BN, BK/32]
            if SWAP:
                wq = tl.load(Wq + e * N * (K // 2) + n[:, None] * (K // 2) + kb[None, :])  # [BN, BK/2]
                acc = tl.dot_scaled(wq, sc, "e2m1", x, None, "bf16", acc)
            else:
                wq = tl.load(Wq + e * N * (K // 2) + n[None, :] * (K // 2) + kb[:, None])  # [BK/2, BN]
                acc = tl.dot_scaled(x, None, "bf16", wq, sc, "e2m1", acc)
        else:  # W_e[n, k0:k0+BK] as strategy B decodes it (E8M0 scales, no K tail)
            w = _fp4_tile(Wq + e * N * (K // 2), S + e * N * (K // 32), n, n < N, k0, K, K // 2, 1, K // 32, 1,
                          X.dtype.element_ty, 0, 32, BN, BK, VARIANT == 3, True)
            if SWAP:
                acc = tl.dot(w, x, acc)
            else:
                acc = tl.dot(x, tl.trans(w), acc)
    if SWAP:
        tl.store(Y + m[None, :].to(tl.int64) * N + n[:, None], acc.to(Y.dtype.element_ty))
    else:
        tl.store(Y + m[:, None].to(tl.int64) * N + n[None, :], acc.to(Y.dtype.element_ty))


CFGS = [(128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (64, 128, 128, 4, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3)]


def cpu_check():
    """The bf16 and the fp32-decode variants under the interpreter (fp32 activations: bf16 math is wrong there;
    ``dot_scaled`` takes bf16 only, and the interpreter runs no inline PTX)."""
    E, N, K, rows_e, bm, bn, bk = 2, 32, 128, 16, 16, 16, 64
    w = FP4Weights.quantize(torch.randn(E, N, K, generator=torch.Generator().manual_seed(0)) * 0.02, "mxfp4")
    x = torch.randn(E * rows_e, K, generator=torch.Generator().manual_seed(1))
    Wd = w.dequantize(torch.float32)
    ref = torch.bmm(x.view(E, rows_e, K), Wd.transpose(1, 2)).reshape(-1, N)
    for name, (variant, swap) in VARIANTS.items():
        if variant in (1, 3):
            continue
        y = torch.empty_like(ref)
        _probe_kernel[(N // bn, E * rows_e // bm)](x, Wd, w.packed, w.scales, y, rows_e, N, K, VARIANT=variant,
                                                   SWAP=swap, BM=bm, BN=bn, BK=bk)
        err = ((y - ref).norm() / ref.norm()).item()
        print(f"{name}: rel err {err:.1e}")
        assert err < 1e-5, name


def main():
    from host_plugin_scattermoe import ops
    from host_plugin_scattermoe.routing import sort_tokens

    out_dir = os.environ.get("OUT", "/tmp/mxfp4_probe")
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for name, (E, N, K, rows_e) in {"Qwen3.5 gate_up": (256, 1024, 2048, 128), "Qwen3-30B gate_up": (128, 1536, 2048, 256)}.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        w = FP4Weights.quantize(torch.randn(E, N, K, generator=g, device="cuda") * 0.02, "mxfp4")
        Wd = w.dequantize(torch.bfloat16)
        L = E * rows_e
        x = torch.randn(L, K, generator=g, device="cuda").bfloat16()
        ref = torch.bmm(x.view(E, rows_e, K).float(), Wd.float().transpose(1, 2)).view(L, N)
        flop = 2 * L * N * K
        idx = torch.arange(L, device="cuda").view(-1, 1) // rows_e  # grouped rows, one expert each
        sei, ssi, offs = sort_tokens(idx, E)

        def record(variant, cfg, fn):
            try:
                y = fn()
                err = ((y.float() - ref).norm() / ref.norm()).item()
                ms = triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
                rows.append(dict(shape=name, variant=variant, cfg=cfg, ms=ms, tflops=flop / ms / 1e9, rel_err=err))
            except Exception as exc:
                rows.append(dict(shape=name, variant=variant, cfg=cfg, ms=None, error=repr(exc)[:300]))
            print(rows[-1], flush=True)

        with torch.no_grad():
            record("scattermoe bf16", "-", lambda: ops.scattered_experts(x, Wd.transpose(1, 2), 1, sei, ssi, offs, grouped_in=True, grouped_out=True))
            record("decode + scattermoe", "-", lambda: ops.scattered_experts(x, w.dequantize(torch.bfloat16).transpose(1, 2), 1, sei, ssi, offs, grouped_in=True, grouped_out=True))
            default = fp4_kernels.DECODE
            for decode in ("asm", "fp32"):  # strategy B's forward kernel as it runs (autotuned; no LoRA)
                fp4_kernels.DECODE = decode
                record(f"B kernel ({decode} decode)", "autotuned", lambda: fp4_kernels.fp4_scatter2scatter(
                    x, w, ssi, offs, 1, grouped_in=True, grouped_out=True)[0])
            fp4_kernels.DECODE = default
        for bm, bn, bk, nw, ns in CFGS:
            if rows_e % bm:
                continue
            y = torch.empty(L, N, device="cuda", dtype=torch.bfloat16)
            grid = (N // bn, L // bm)
            cfg = f"{bm}x{bn}x{bk} w{nw} s{ns}"
            kw = dict(BM=bm, BN=bn, BK=bk, num_warps=nw, num_stages=ns)
            for label, (variant, swap) in VARIANTS.items():  # not ``name``: record() reads the shape's name
                record(label, cfg, lambda v=variant, sw=swap: (
                    _probe_kernel[grid](x, Wd, w.packed, w.scales, y, rows_e, N, K, VARIANT=v, SWAP=sw, **kw), y)[1])
        del w, Wd, x, ref
        torch.cuda.empty_cache()
    json.dump({"device": torch.cuda.get_device_name(), "triton": triton.__version__, "rows": rows},
              open(os.path.join(out_dir, "probe_dot_scaled.json"), "w"), indent=1)
    print("\n| shape | variant | tile | ms | TFLOP/s | rel err |\n| --- | --- | --- | ---: | ---: | ---: |")
    for r in rows:
        if r.get("ms") is None:
            print(f"| {r['shape']} | {r['variant']} | {r['cfg']} | fail: {r['error'][:60]} | | |")
        else:
            print(f"| {r['shape']} | {r['variant']} | {r['cfg']} | {r['ms']:.3f} | {r['tflops']:.0f} | {r['rel_err']:.1e} |")


if __name__ == "__main__":
    cpu_check() if "--cpu-check" in sys.argv else main()
