"""Probe (GPU, forward only, no LoRA): can a decode-in-the-GEMM forward reach bf16 speed on Hopper?

Times, at the up projection of Qwen3.5-35B-A3B and Qwen3-30B-A3B (T=4096, k=8, rows already grouped
by expert, balanced routing: 128 / 256 rows per expert), y_e = x_e · W_eᵀ for:

* ``bf16 tl.dot``: a plain grouped GEMM on the decoded bf16 weights (the same simple kernel shape);
* ``dot_scaled rhs``: ``tl.dot_scaled(x, None, "bf16", Wqᵀ, scales, "e2m1")`` on the packed MXFP4
  container as stored (``[E, N, K/2]`` bytes, ``[E, N, K/32]`` E8M0 scales): Triton upcasts in registers;
* ``dot_scaled lhs (swapped)``: ``yᵀ = W · xᵀ`` with the packed weight as the left operand (wgmma
  reads A from registers, so the upcast operand need not go back through shared memory);
* ``decode rhs (interleave)``: the packed tile decoded by hand in the K loop (the dequantize kernel's bit trick,
  ``kernels._decode_e2m1``), both nibbles interleaved back into one ``[BN, BK]`` tile, one full-K ``tl.dot``;
* ``decode rhs (even/odd)``: the same decode feeding two half-K dots on strided ``x`` columns, as strategy B's
  loop does (tells whether B's loop shape or the decode itself costs the time);
* ``decode lhs (swapped)``: the interleaved decoded tile as the left operand of ``yᵀ = W · xᵀ`` (wgmma can read
  it from registers instead of shared memory);
* ``scattermoe bf16``: ``ops.scattered_experts`` (grouped in/out, no LoRA) on the decoded weights;
* ``decode + scattermoe``: the dequantize kernel then scattermoe (strategy A's forward cost).

Each variant is checked against a float32 reference (relative error). Prints a table; JSON to $OUT.
``--cpu-check`` runs the hand-decoded kernels under the Triton interpreter at a toy shape instead (no GPU).
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

from host_plugin_mxfp4.formats import FP4Weights
from host_plugin_mxfp4.kernels import _decode_e2m1, _decode_e8m0


@triton.jit
def _bf16_kernel(X, W, Y, ROWS, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    m = pid_m * BM + tl.arange(0, BM)
    e = (pid_m * BM) // ROWS
    n = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        x = tl.load(X + m[:, None].to(tl.int64) * K + k[None, :])
        w = tl.load(W + e.to(tl.int64) * N * K + n[None, :] * K + k[:, None])  # [BK, BN] of W_e [N, K]
        acc = tl.dot(x, w, acc)
    tl.store(Y + m[:, None].to(tl.int64) * N + n[None, :], acc.to(tl.bfloat16))


@triton.jit
def _ds_rhs_kernel(X, Wq, S, Y, ROWS, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    m = pid_m * BM + tl.arange(0, BM)
    e = ((pid_m * BM) // ROWS).to(tl.int64)
    n = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        kb = k0 // 2 + tl.arange(0, BK // 2)
        ks = k0 // 32 + tl.arange(0, BK // 32)
        x = tl.load(X + m[:, None].to(tl.int64) * K + k[None, :])
        wq = tl.load(Wq + e * N * (K // 2) + n[None, :] * (K // 2) + kb[:, None])  # [BK/2, BN]
        sc = tl.load(S + e * N * (K // 32) + n[:, None] * (K // 32) + ks[None, :])  # [BN, BK/32]
        acc = tl.dot_scaled(x, None, "bf16", wq, sc, "e2m1", acc)
    tl.store(Y + m[:, None].to(tl.int64) * N + n[None, :], acc.to(tl.bfloat16))


@triton.jit
def _ds_lhs_kernel(X, Wq, S, Y, ROWS, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    m = pid_m * BM + tl.arange(0, BM)
    e = ((pid_m * BM) // ROWS).to(tl.int64)
    n = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BN, BM), tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        kb = k0 // 2 + tl.arange(0, BK // 2)
        ks = k0 // 32 + tl.arange(0, BK // 32)
        xt = tl.load(X + m[None, :].to(tl.int64) * K + k[:, None])  # [BK, BM]
        wq = tl.load(Wq + e * N * (K // 2) + n[:, None] * (K // 2) + kb[None, :])  # [BN, BK/2]
        sc = tl.load(S + e * N * (K // 32) + n[:, None] * (K // 32) + ks[None, :])  # [BN, BK/32]
        acc = tl.dot_scaled(wq, sc, "e2m1", xt, None, "bf16", acc)
    tl.store(Y + m[None, :].to(tl.int64) * N + n[:, None], acc.to(tl.bfloat16))


@triton.jit
def _dec_tile(Wq, S, e, n, k0, N, K, BN: tl.constexpr, BK: tl.constexpr):
    """W_e[n, k0:k0+BK] decoded to fp32 as two ``[BN, BK/2]`` halves (even / odd k) from the packed bytes."""
    kb = k0 // 2 + tl.arange(0, BK // 2)
    ks = k0 // 32 + tl.arange(0, BK // 32)
    wq = tl.load(Wq + e * N * (K // 2) + n[:, None] * (K // 2) + kb[None, :]).to(tl.int32)  # [BN, BK/2]
    sc = _decode_e8m0(tl.load(S + e * N * (K // 32) + n[:, None] * (K // 32) + ks[None, :]).to(tl.int32))
    sc = tl.reshape(tl.broadcast_to(sc[:, :, None], (BN, BK // 32, 16)), (BN, BK // 2))
    return _decode_e2m1(wq, False) * sc, _decode_e2m1(wq, True) * sc


@triton.jit
def _dec_il_kernel(X, Wq, S, Y, ROWS, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    m = pid_m * BM + tl.arange(0, BM)
    e = ((pid_m * BM) // ROWS).to(tl.int64)
    n = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        x = tl.load(X + m[:, None].to(tl.int64) * K + k[None, :])
        lo, hi = _dec_tile(Wq, S, e, n, k0, N, K, BN, BK)
        w = tl.interleave(lo.to(x.dtype), hi.to(x.dtype))  # [BN, BK]
        acc = tl.dot(x, tl.trans(w), acc)
    tl.store(Y + m[:, None].to(tl.int64) * N + n[None, :], acc.to(Y.dtype.element_ty))


@triton.jit
def _dec_eo_kernel(X, Wq, S, Y, ROWS, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    m = pid_m * BM + tl.arange(0, BM)
    e = ((pid_m * BM) // ROWS).to(tl.int64)
    n = pid_n * BN + tl.arange(0, BN)
    t = tl.arange(0, BK // 2)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        xe = tl.load(X + m[:, None].to(tl.int64) * K + (k0 + 2 * t)[None, :])
        xo = tl.load(X + m[:, None].to(tl.int64) * K + (k0 + 2 * t + 1)[None, :])
        lo, hi = _dec_tile(Wq, S, e, n, k0, N, K, BN, BK)
        acc = tl.dot(xe, tl.trans(lo.to(xe.dtype)), acc)
        acc = tl.dot(xo, tl.trans(hi.to(xe.dtype)), acc)
    tl.store(Y + m[:, None].to(tl.int64) * N + n[None, :], acc.to(Y.dtype.element_ty))


@triton.jit
def _dec_lhs_kernel(X, Wq, S, Y, ROWS, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """``yᵀ = W_e · xᵀ``: the decoded tile is the left operand, which wgmma may read from registers, so it need not
    be stored to shared memory before the MMA (the rhs variants' decoded tile is)."""
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    m = pid_m * BM + tl.arange(0, BM)
    e = ((pid_m * BM) // ROWS).to(tl.int64)
    n = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BN, BM), tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        xt = tl.load(X + m[None, :].to(tl.int64) * K + k[:, None])  # [BK, BM]
        lo, hi = _dec_tile(Wq, S, e, n, k0, N, K, BN, BK)
        acc = tl.dot(tl.interleave(lo.to(xt.dtype), hi.to(xt.dtype)), xt, acc)
    tl.store(Y + m[None, :].to(tl.int64) * N + n[:, None], acc.to(Y.dtype.element_ty))


HAND_DECODED = {"decode rhs (interleave)": _dec_il_kernel, "decode rhs (even/odd)": _dec_eo_kernel,
                "decode lhs (swapped)": _dec_lhs_kernel}


def cpu_check():
    """The hand-decoded kernels under the interpreter (fp32 activations: bf16 math is wrong there)."""
    E, N, K, rows_e, bm, bn, bk = 2, 32, 128, 16, 16, 16, 64
    w = FP4Weights.quantize(torch.randn(E, N, K, generator=torch.Generator().manual_seed(0)) * 0.02, "mxfp4")
    x = torch.randn(E * rows_e, K, generator=torch.Generator().manual_seed(1))
    ref = torch.bmm(x.view(E, rows_e, K), w.dequantize(torch.float32).transpose(1, 2)).view(-1, N)
    for name, kern in HAND_DECODED.items():
        y = torch.empty_like(ref)
        kern[(N // bn, E * rows_e // bm)](x, w.packed, w.scales, y, rows_e, N, K, BM=bm, BN=bn, BK=bk)
        err = ((y - ref).norm() / ref.norm()).item()
        print(f"{name}: rel err {err:.1e}")
        assert err < 1e-5, name


CFGS = [(128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (64, 128, 128, 4, 3), (128, 256, 64, 8, 3), (64, 256, 128, 8, 3)]


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
        for bm, bn, bk, nw, ns in CFGS:
            if rows_e % bm:
                continue
            y = torch.empty(L, N, device="cuda", dtype=torch.bfloat16)
            grid = (N // bn, L // bm)
            cfg = f"{bm}x{bn}x{bk} w{nw} s{ns}"
            kw = dict(BM=bm, BN=bn, BK=bk, num_warps=nw, num_stages=ns)
            record("bf16 tl.dot", cfg, lambda: (_bf16_kernel[grid](x, Wd, y, rows_e, N, K, **kw), y)[1])
            record("dot_scaled rhs", cfg, lambda: (_ds_rhs_kernel[grid](x, w.packed, w.scales, y, rows_e, N, K, **kw), y)[1])
            record("dot_scaled lhs (swapped)", cfg, lambda: (_ds_lhs_kernel[grid](x, w.packed, w.scales, y, rows_e, N, K, **kw), y)[1])
            for variant, kern in HAND_DECODED.items():
                record(variant, cfg, lambda kern=kern: (kern[grid](x, w.packed, w.scales, y, rows_e, N, K, **kw), y)[1])
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
