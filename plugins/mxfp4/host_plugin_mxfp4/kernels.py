"""Strategy B: scatter2scatter grouped GEMMs that read packed FP4 experts and dequantize in the K loop.

One kernel, two modes, both on the *same* container layout (``packed [E, N, K/2]``, scales
``[E, N, K/block]``; K = the input features, the axis the blocks run along):

* forward (``RED_IS_K=1``): ``y = gather(x) · W_eᵀ (+ s·(x·A_eᵀ)·B_eᵀ) (+ b_e)``, reduction over K;
* dX (``RED_IS_K=0``): ``dx = dY · W_e (+ s·(dY·B_e)·A_e)``, reduction over N, reading the
  forward's packed bytes with K as the *output* axis. No transposed or re-quantised copy of the
  weights exists; the dX numerics see exactly the forward's FP4 values.

Each program owns ``BLOCK_M`` sorted rows of one expert (located with scattermoe's device-side
``locate_block``, no host sync, no padding) and a ``BLOCK_J`` slice of the output; per reduction
tile it loads one contiguous activation tile, the packed bytes (vectorised along K) and one scale
per FP4 block (E8M0 bytes -> ``2**(s-127)`` built from the exponent bits, or linear fp32 scales
for NVFP4 = E4M3 x tensor scale), decodes E2M1 arithmetically, multiplies, casts to the activation
dtype, interleaves the low (even-K) and high (odd-K) nibbles back into one ``[n, k]`` tile and
feeds one ``tl.dot``; ``SWAP`` configs make the decoded tile the MMA's left operand. The reduction
tile is a multiple of the FP4 block size so a tile never splits a scale block. LoRA is fused like
scattermoe's fused path (a ``[BLOCK_M, r]`` accumulator in the same loop, ``·Bᵀ`` in the epilogue);
the rank intermediate is written for the backward. dA/dB never touch the base weights: they are
scattermoe's ``group_outer`` over the rank intermediates.

Autotune pruning counts the extra shared memory per pipeline stage: the packed tile (one byte per
two weights) and the block scales (uint8, or fp32 for linear scales) on top of the activation and
LoRA tiles, plus the decoded operand staged once for the MMA.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from host_plugin_scattermoe.kernels import (
    block_rows, device_limits, expert_block, fits_device, locate_block, m_bucket, needs_int64, rank_block,
)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

SCALE_E8M0 = 0
SCALE_LINEAR = 1
#: Strategy B's E2M1 decode on a GPU with bf16 activations and E8M0 scales: ``asm`` (two bf16 lanes per instruction,
#: :func:`_decode_e2m1_bf16`) or ``fp32`` (the portable path, used everywhere else); the same values. ``MXFP4_DECODE``.
#: ``asm`` by default since its bitwise GPU test (``tests/test_mxfp4_gpu.py``) and the kernel tests passed with it on an
#: H100 (2026-12-07), where B's timings were taken with it too.
DECODE = os.environ.get("MXFP4_DECODE", "asm")


def _prune(configs, named_args, **kwargs):
    limits = device_limits()
    lora = named_args.get("LORA", kwargs.get("LORA", 0))
    br = named_args.get("BLOCK_R", kwargs.get("BLOCK_R", 16))
    fp4_block = named_args.get("FP4_BLOCK", kwargs.get("FP4_BLOCK", 32))
    scale_elt = 4 if named_args.get("SCALE_KIND", kwargs.get("SCALE_KIND", 0)) == SCALE_LINEAR else 1
    x = named_args.get("X")
    elt = x.element_size() if hasattr(x, "element_size") else 2
    J = named_args.get("J", 1 << 30)
    red_is_k = named_args.get("RED_IS_K", kwargs.get("RED_IS_K", 1))
    kept, scored = [], []
    for c in configs:
        bm, bj, bi = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_J"], c.kwargs["BLOCK_I"]
        # the K axis (reduction in the forward, output in dX) must hold whole FP4 blocks
        if (bi if red_is_k else bj) % fp4_block:
            continue
        # dX with 16-bit operands takes SWAP tiles only: compiled by Triton 3.6 for an H100, the plain form (the
        # decoded tile as the right operand, interleaved along its output axis) gave wrong dX at every plain config
        # (rel. error 2.0-3.0 in fp16 and bf16, 2e-4 / 1.7e-3 at SWAP ones: bench/check_configs.py; README)
        if not red_is_k and elt == 2 and not c.kwargs.get("SWAP"):
            continue
        # activations + packed bytes (bi*bj/2, one per 2 weights) + one scale per FP4 block
        per_stage = bm * bi * elt + bi * bj // 2 + bi * bj // fp4_block * scale_elt
        if lora:
            per_stage += br * bi * elt
        smem = c.num_stages * per_stage + bi * bj * elt  # + decoded operand staged for the MMA
        if lora:
            smem += bj * br * elt
        acc = bm * bj + (bm * br if lora else 0) + bi * bj  # fp32 acc + decode temporaries
        scored.append((bj, smem + acc, c))
        # an output tile much wider than the output is wasted work (kept only as the fallback below)
        if bj <= max(32, triton.next_power_of_2(J)) and fits_device(smem, acc, c.num_warps, limits):
            kept.append(c)
    if kept:
        return kept
    scored.sort(key=lambda sc: sc[:2])  # the narrowest, then smallest, of the correct tiles
    return [scored[0][2]] if scored else configs[:1]


def _configs():
    """Tiles ``(BLOCK_M, BLOCK_J, BLOCK_I, warps, stages, SWAP)``. 256-row tiles decode each weight tile once for twice
    the rows (the decode costs about as much as the MMA per 128 rows); ``SWAP`` puts the decoded tile on wgmma's
    register side (kernel doc)."""
    out = []
    for bm, bj, bi, w, s, swap in [
        (128, 128, 64, 8, 3, 0),
        (64, 128, 64, 4, 4, 0),
        (128, 64, 64, 4, 4, 0),
        (128, 128, 128, 8, 3, 0),
        (256, 128, 64, 8, 3, 0),
        (128, 128, 64, 8, 3, 1),
        (256, 128, 64, 8, 3, 1),
        (128, 64, 64, 4, 4, 1),
    ]:
        kw = {"BLOCK_M": bm, "BLOCK_J": bj, "BLOCK_I": bi, "SWAP": swap}
        out.append(triton.Config(kw, num_warps=w, num_stages=s))
    return out


@triton.jit
def _decode_e2m1(byte, HIGH: tl.constexpr):
    """The low (or ``HIGH``) nibble of each packed byte (int32) as its fp32 E2M1 value. The sign bit and
    the three magnitude bits ``e e m`` are shifted straight into an fp32's sign, lowest exponent bits
    and top mantissa bit: that float is ``2**(e-127)·(1+m/2)`` (``e > 0``) or ``m·2**-127`` (``e = 0``,
    subnormal), i.e. exactly the E2M1 value times ``2**-126`` in both cases; one exact multiply by
    ``2**126`` restores it. About a third of the integer work of decoding exponent and mantissa
    separately (the dequantize kernel was integer-ALU-bound at ~2.1 TB/s on an H200)."""
    if HIGH:
        bits = ((byte & 0x80) << 24) | ((byte & 0x70) << 18)
    else:
        bits = ((byte & 0x8) << 28) | ((byte & 0x7) << 22)
    return bits.to(tl.float32, bitcast=True) * 8.507059173023462e37  # 2**126


@triton.jit
def _decode_e8m0(s):
    """E8M0 bytes (int32) -> 2**(s-127) in fp32 (2**-127 is the subnormal 1<<22; 255 is NaN)."""
    bits = tl.where(s == 0, 1 << 22, s << 23)
    v = bits.to(tl.float32, bitcast=True)
    return tl.where(s == 255, float("nan"), v)


@triton.jit
def _load_scales(ptrs, mask, SCALE_KIND: tl.constexpr):
    """fp32 block scale per element: E8M0 bytes decoded (``SCALE_KIND`` 0), or linear fp32 scales."""
    if SCALE_KIND == 0:  # SCALE_E8M0 (jit code may not read non-constexpr globals)
        sc = _decode_e8m0(tl.load(ptrs, mask=mask, other=127).to(tl.int32))
    else:
        sc = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return sc


@triton.jit
def _dequant_kernel(
    Wq, Sc, Out, R, N, KB, s_oe, s_on, s_ok,
    SCALE_KIND: tl.constexpr, HALF_BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_KB: tl.constexpr,
):
    """Rows ``r`` (= expert·N + n) of packed bytes → values ``decode(code) · scale`` in ``Out``'s dtype.
    Byte ``j`` holds elements ``2j`` (low nibble) and ``2j+1`` (high), which share scale
    ``j // HALF_BLOCK`` (E8M0 bytes decoded here, or precomputed fp32 linear scales). ``Out`` strides
    are per (expert, n, k), so K-major storage (transformers' transposed experts) is written directly.
    ``BLOCK_KB`` is a multiple of ``HALF_BLOCK`` (a tile never splits a scale block): each scale is
    loaded and decoded once per tile and broadcast over its ``HALF_BLOCK`` bytes."""
    NB: tl.constexpr = BLOCK_KB // HALF_BLOCK
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    j = (tl.program_id(1) * BLOCK_KB + tl.arange(0, BLOCK_KB)).to(tl.int64)
    r_mask = rows < R
    mask = r_mask[:, None] & (j < KB)[None, :]
    byte = tl.load(Wq + rows[:, None] * KB + j[None, :], mask=mask, other=0).to(tl.int32)
    sb = tl.program_id(1) * NB + tl.arange(0, NB)
    smask = r_mask[:, None] & (sb < KB // HALF_BLOCK)[None, :]
    sc = _load_scales(Sc + rows[:, None] * (KB // HALF_BLOCK) + sb[None, :], smask, SCALE_KIND)
    scale = tl.reshape(tl.broadcast_to(sc[:, :, None], (BLOCK_R, NB, HALF_BLOCK)), (BLOCK_R, BLOCK_KB))
    ty = Out.dtype.element_ty  # fp32 -> bf16/fp16 casts round to nearest even (Triton's default)
    # one store of the interleaved (low, high) nibbles: two stride-2 stores into a K-contiguous
    # output wrote half-sectors and ran 11x slower on H100 (6.4 vs 0.57 ms at Qwen3-30B's gate_up)
    vals = tl.interleave((_decode_e2m1(byte, False) * scale).to(ty), (_decode_e2m1(byte, True) * scale).to(ty))
    kk = (tl.program_id(1) * (2 * BLOCK_KB) + tl.arange(0, 2 * BLOCK_KB)).to(tl.int64)
    base = (rows // N) * s_oe + (rows % N) * s_on
    kmask = r_mask[:, None] & (kk < 2 * KB)[None, :]
    tl.store(Out + base[:, None] + kk[None, :] * s_ok, vals, mask=kmask)


def _nibble_ptx(dst: str, sign_shift: int, bits_shift: int, scale: str) -> str:
    """PTX for one bf16x2 register of decoded nibbles from ``t`` (two bytes spread into the two 16-bit lanes): the
    nibble's sign bit shifted to bit 15 of its lane, its ``e e m`` bits to bits 8..6, i.e. a bf16 equal to the E2M1
    value times ``2**-126`` (bf16 has fp32's exponent; ``e = 0`` lands on a bf16 subnormal), then two exact bf16x2
    multiplies (``fma`` with -0.0): by ``2**126`` (``k``) and by the block ``scale``."""
    return (f"shl.b32 s, t, {sign_shift};\nand.b32 s, s, 0x80008000;\nshl.b32 m, t, {bits_shift};\n"
            f"and.b32 m, m, 0x01C001C0;\nor.b32 v, s, m;\nfma.rn.bf16x2 v, v, k, nz;\n"
            f"fma.rn.bf16x2 {dst}, v, {scale}, nz;\n")


#: E2M1 -> bf16 for four packed bytes per call (``_decode_e2m1_bf16``): ``prmt`` spreads bytes 0,1 (then 2,3) into
#: the two 16-bit lanes of ``t``; the low nibbles (shifts 12, 6) and the high ones (8, 2) each become one bf16x2
#: register (:func:`_nibble_ptx`). Outputs: $0,$1 the low nibbles of elements 0-1 and 2-3, $2,$3 the high nibbles;
#: inputs: $4 the four bytes, $5,$6 their scales (bf16x2).
_E2M1_BF16_ASM = tl.constexpr(
    "{\n.reg .b32 z, nz, k, t, s, m, v;\nmov.b32 z, 0;\nmov.b32 nz, 0x80008000;\nmov.b32 k, 0x7E807E80;\n"
    + "prmt.b32 t, $4, z, 0x4140;\n" + _nibble_ptx("$0", 12, 6, "$5") + _nibble_ptx("$2", 8, 2, "$5")
    + "prmt.b32 t, $4, z, 0x4342;\n" + _nibble_ptx("$1", 12, 6, "$6") + _nibble_ptx("$3", 8, 2, "$6")
    + "}"
)


@triton.jit
def _decode_e2m1_bf16(byte, scale):
    """Packed bytes (uint8) and their block scales (bf16, exact for E8M0) -> the (low, high) nibbles' bf16 values,
    bit-identical to ``(_decode_e2m1(byte, HIGH) * scale).to(bf16)`` (every product is exact or rounds once), with no
    fp32 multiplies or fp32 -> bf16 conversions (sm_80+: bf16x2 ``fma``): B's K loop is 252 SASS instructions per
    thread instead of 339 at 128×128×64 (``bench/sm90_compile_check.py``). GPU only: the interpreter does not run
    inline assembly."""
    return tl.inline_asm_elementwise(_E2M1_BF16_ASM, "=r,=r,=r,=r,r,r,r", [byte, scale],
                                     dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)


@triton.jit
def _fp4_tile(w_base, s_base, n, n_mask, k0, K, s_wn, s_wk, s_sn, s_sk, dtype,
              SCALE_KIND: tl.constexpr, FP4_BLOCK: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
              DECODE_ASM: tl.constexpr, EVEN_K: tl.constexpr):
    """``W_e[n, k0:k0+BK]`` decoded into ``dtype`` as one ``[BN, BK]`` tile (``k0`` and ``BK`` whole scale blocks).
    Each packed byte holds elements ``2j`` (low nibble) and ``2j+1`` (high): the two decoded halves are interleaved
    back along K, so the tile feeds one full-K ``tl.dot`` against contiguous activations. Each block scale is loaded
    and decoded once and broadcast over its ``FP4_BLOCK / 2`` bytes. ``DECODE_ASM`` (bf16, E8M0, GPU) decodes two
    bf16 lanes per instruction (:func:`_decode_e2m1_bf16`), the same values. ``EVEN_K``: no K tail, no K masks."""
    HALF: tl.constexpr = BK // 2
    NB: tl.constexpr = BK // FP4_BLOCK
    kb = k0 // 2 + tl.arange(0, HALF)
    sb = k0 // FP4_BLOCK + tl.arange(0, NB)
    if EVEN_K:
        b_mask = n_mask[:, None]
        s_mask = n_mask[:, None]
    else:
        b_mask = n_mask[:, None] & (kb < K // 2)[None, :]
        s_mask = n_mask[:, None] & (sb < K // FP4_BLOCK)[None, :]
    byte = tl.load(w_base + n[:, None] * s_wn + kb[None, :] * s_wk, mask=b_mask, other=0)
    sc = _load_scales(s_base + n[:, None] * s_sn + sb[None, :] * s_sk, s_mask, SCALE_KIND)
    if DECODE_ASM:
        sc16 = tl.reshape(tl.broadcast_to(sc.to(tl.bfloat16)[:, :, None], (BN, NB, FP4_BLOCK // 2)), (BN, HALF))
        lo, hi = _decode_e2m1_bf16(byte.to(tl.uint8), sc16)
    else:
        sc32 = tl.reshape(tl.broadcast_to(sc[:, :, None], (BN, NB, FP4_BLOCK // 2)), (BN, HALF))
        b32 = byte.to(tl.int32)
        lo = (_decode_e2m1(b32, False) * sc32).to(dtype)
        hi = (_decode_e2m1(b32, True) * sc32).to(dtype)
    return tl.interleave(lo, hi)


@triton.jit
def _fp4_s2s_kernel(
    X, Wq, Sc, Y, A, Bm, XA_out, Bias, ssi_ptr, offsets_ptr,
    I, J, R, E, FAN_OUT, M_BUCKET,
    s_xm, s_xi,
    s_we, s_wn, s_wk,
    s_se, s_sn, s_sk,
    s_ym, s_yj,
    s_ae, s_ar, s_ai, s_be, s_bj, s_br,
    s_xam, s_xar, s_bias_e, s_bias_j,
    scaling,
    RED_IS_K: tl.constexpr, SCALE_KIND: tl.constexpr, FP4_BLOCK: tl.constexpr,
    X_GROUPED: tl.constexpr, Y_GROUPED: tl.constexpr, LORA: tl.constexpr, WRITE_XA: tl.constexpr,
    HAS_BIAS: tl.constexpr, INT64: tl.constexpr, DOT_PREC: tl.constexpr, E_POW2: tl.constexpr,
    DECODE_ASM: tl.constexpr, EVEN_I: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr, SWAP: tl.constexpr,
):
    """Forward (``RED_IS_K``: reduction over K, output over N) or dX (reduction over N, output over K): per reduction
    tile, one contiguous activation tile and one decoded weight tile (:func:`_fp4_tile`, ``[n, k]``) into one
    ``tl.dot``. ``SWAP`` accumulates the transposed output, ``acc[j, m]`` (``yᵀ = W·xᵀ``): the decoded tile is then
    the left operand, which Hopper's wgmma reads from registers (the right one must go through shared memory);
    the autotuner picks the faster form per shape."""
    pid_j = tl.program_id(0)
    pid_m = tl.program_id(1)
    e, row0, end = locate_block(pid_m, offsets_ptr, E, BLOCK_M, E_POW2)
    if e >= E:
        return
    e64 = e.to(tl.int64)
    rows, m_mask, x_rows, y_rows = block_rows(row0, end, ssi_ptr, FAN_OUT, X_GROUPED, Y_GROUPED, INT64, BLOCK_M)
    r_offs = tl.arange(0, BLOCK_R)
    r_mask = r_offs < R
    w_base = Wq + e64 * s_we
    s_base = Sc + e64 * s_se
    j_offs = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)  # output: n (forward) or k (dX)
    j_mask = j_offs < J
    i_base = tl.arange(0, BLOCK_I)
    dt = X.dtype.element_ty
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if SWAP:
        acc = tl.zeros((BLOCK_J, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
    for i0 in range(0, I, BLOCK_I):
        i_offs = i0 + i_base
        if EVEN_I:  # no reduction tail: all-true masks, which the compiler folds away
            i_mask = tl.full((BLOCK_I,), 1, tl.int1)
        else:
            i_mask = i_offs < I
        x = tl.load(X + x_rows[:, None] * s_xm + i_offs[None, :] * s_xi, mask=m_mask[:, None] & i_mask[None, :],
                    other=0.0)
        if RED_IS_K:  # W_e[j, i0:i0+BI]: [BJ, BI]
            w = _fp4_tile(w_base, s_base, j_offs, j_mask, i0, I, s_wn, s_wk, s_sn, s_sk, dt,
                          SCALE_KIND, FP4_BLOCK, BLOCK_J, BLOCK_I, DECODE_ASM, EVEN_I)
            if SWAP:
                acc = tl.dot(w, tl.trans(x), acc, input_precision=DOT_PREC)
            else:
                acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PREC)
        else:  # W_e[i0:i0+BI, j]: [BI, BJ]
            w = _fp4_tile(w_base, s_base, i_offs, i_mask, pid_j * BLOCK_J, J, s_wn, s_wk, s_sn, s_sk, dt,
                          SCALE_KIND, FP4_BLOCK, BLOCK_I, BLOCK_J, DECODE_ASM, False)
            if SWAP:
                acc = tl.dot(tl.trans(w), tl.trans(x), acc, input_precision=DOT_PREC)
            else:
                acc = tl.dot(x, w, acc, input_precision=DOT_PREC)
        if LORA:
            a = tl.load(A + e64 * s_ae + r_offs[:, None] * s_ar + i_offs[None, :] * s_ai,
                        mask=r_mask[:, None] & i_mask[None, :], other=0.0)
            xa = tl.dot(x, tl.trans(a.to(dt)), xa, input_precision=DOT_PREC)
    if LORA:
        if WRITE_XA:
            if pid_j == 0:
                tl.store(XA_out + rows[:, None] * s_xam + r_offs[None, :] * s_xar, xa,
                         mask=m_mask[:, None] & r_mask[None, :])
        b = tl.load(Bm + e64 * s_be + j_offs[:, None] * s_bj + r_offs[None, :] * s_br,
                    mask=j_mask[:, None] & r_mask[None, :], other=0.0).to(dt)  # [BJ, R]
        xs = (xa * scaling).to(dt)
        if SWAP:
            acc = tl.dot(b, tl.trans(xs), acc, input_precision=DOT_PREC)
        else:
            acc = tl.dot(xs, tl.trans(b), acc, input_precision=DOT_PREC)
    if HAS_BIAS:
        bias = tl.load(Bias + e64 * s_bias_e + j_offs * s_bias_j, mask=j_mask, other=0.0).to(tl.float32)
        if SWAP:
            acc += bias[:, None]
        else:
            acc += bias[None, :]
    if SWAP:
        tl.store(Y + y_rows[None, :] * s_ym + j_offs[:, None] * s_yj, acc.to(Y.dtype.element_ty),
                 mask=j_mask[:, None] & m_mask[None, :])
    else:
        tl.store(Y + y_rows[:, None] * s_ym + j_offs[None, :] * s_yj, acc.to(Y.dtype.element_ty),
                 mask=m_mask[:, None] & j_mask[None, :])


#: The kernel with ``EVEN_I`` (no reduction tail for the launch's ``BLOCK_I``) derived from its arguments, as every
#: launch path (autotuned, interpreter, ``bench/check_configs.py``) runs it.
_fp4_kernel = triton.heuristics({"EVEN_I": lambda a: a["I"] % a["BLOCK_I"] == 0})(_fp4_s2s_kernel)

if not INTERPRET:

    def _bench(fn, quantiles=None):
        return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)

    _fp4_tuned = triton.autotune(
        configs=_configs(),
        key=["M_BUCKET", "I", "J", "R", "RED_IS_K", "SCALE_KIND", "X_GROUPED", "Y_GROUPED", "LORA", "INT64"],
        prune_configs_by={"early_config_prune": _prune},
        do_bench=_bench,
    )(_fp4_kernel)

_INTERP_CFG = {"BLOCK_M": 16, "BLOCK_J": 32, "BLOCK_I": 32, "SWAP": 0}


def _dot_prec(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def decode_asm(x: torch.Tensor, scale_kind: int) -> bool:
    """Whether a launch on ``x`` decodes with :func:`_decode_e2m1_bf16` (``DECODE``)."""
    return DECODE == "asm" and scale_kind == SCALE_E8M0 and x.dtype == torch.bfloat16 and x.is_cuda and not INTERPRET


def kernel_scales(w) -> tuple[torch.Tensor, int]:
    """``(scale tensor, SCALE_KIND)`` the kernel reads: E8M0 bytes as is, NVFP4 as linear fp32."""
    if w.scale_kind == "e8m0":
        return w.scales, SCALE_E8M0
    return w.linear_scales(), SCALE_LINEAR


def fp4_scatter2scatter(
    x: torch.Tensor,
    w,  # FP4Weights [E, N, K]
    sorted_scattered_idxs: torch.Tensor,
    expert_offsets: torch.Tensor,
    fan_out: int,
    *,
    reduce_k: bool = True,
    A: torch.Tensor | None = None,
    B: torch.Tensor | None = None,
    scaling: float = 1.0,
    bias: torch.Tensor | None = None,
    grouped_in: bool = False,
    grouped_out: bool = False,
    write_xa: bool = False,
    scales: tuple | None = None,
):
    """Forward (``reduce_k``: ``y = x W_eᵀ``, ``x [., K]`` -> ``[L, N]``) or dX (``x [., N]`` ->
    ``[L, K]``) on packed FP4 weights. ``A`` ``[E, r, I]`` / ``B`` ``[E, J, r]`` in the reduction/output
    axes of this call (for dX pass ``Bᵀ``/``Aᵀ`` views, as scattermoe does). Returns ``(y, xa)``."""
    L = sorted_scattered_idxs.numel()
    E, N, K = w.shape
    I, J = (K, N) if reduce_k else (N, K)
    if x.shape[-1] != I:
        raise ValueError(f"x has {x.shape[-1]} features, the FP4 weights expect {I}")
    out = torch.empty(L, J, device=x.device, dtype=x.dtype)
    R = 0 if B is None else B.shape[-1]
    lora = B is not None
    xa_out = torch.empty(L, R, device=x.device, dtype=torch.float32) if (lora and write_xa) else None
    if L == 0:
        return out, xa_out
    sc, kind = scales if scales is not None else kernel_scales(w)
    dummy = out
    Am = A if lora else dummy.new_empty(1, 1, 1)
    Bm = B if lora else dummy.new_empty(1, 1, 1)
    xab = xa_out if xa_out is not None else dummy.new_empty(1, 1)
    bb = bias if bias is not None else dummy.new_empty(1, 1)
    int64 = needs_int64(x, out, w.packed)
    args = (
        x, w.packed, sc, out, Am, Bm, xab, bb, sorted_scattered_idxs, expert_offsets,
        I, J, R, E, fan_out, m_bucket(L),
        x.stride(0), x.stride(1),
        w.packed.stride(0), w.packed.stride(1), w.packed.stride(2),
        sc.stride(0), sc.stride(1), sc.stride(2),
        out.stride(0), out.stride(1),
        Am.stride(0), Am.stride(1), Am.stride(2), Bm.stride(0), Bm.stride(1), Bm.stride(2),
        xab.stride(0), xab.stride(1), bb.stride(0), bb.stride(1),
        float(scaling),
    )
    meta = dict(
        RED_IS_K=bool(reduce_k), SCALE_KIND=kind, FP4_BLOCK=w.block_size,
        X_GROUPED=bool(grouped_in), Y_GROUPED=bool(grouped_out), LORA=int(lora), WRITE_XA=bool(write_xa and lora),
        HAS_BIAS=bias is not None, INT64=int64, DOT_PREC=_dot_prec(x.dtype),
        E_POW2=expert_block(E), BLOCK_R=rank_block(R), DECODE_ASM=decode_asm(x, kind),
    )

    def grid(META):
        return (triton.cdiv(J, META["BLOCK_J"]), triton.cdiv(L, META["BLOCK_M"]) + E)

    if INTERPRET or not x.is_cuda:
        _fp4_kernel[grid](*args, **meta, **_INTERP_CFG)
    else:
        _fp4_tuned[grid](*args, **meta)
    return out, xa_out


#: Dequantize tiles ``(BLOCK_R rows, BLOCK_KB packed bytes, num_warps)`` by output order (K contiguous,
#: or K-major as transformers' transposed experts): the fastest of bench/sweep_dequant.py on an H200
#: (2026-12-01, summed over the Qwen3-30B-A3B / Qwen3.5-35B-A3B expert shapes: 3.2-3.4 TB/s of bytes
#: read + written, copy 4.25; gpt-oss's K-major gate_up 3.1 TB/s). (8, 256) is 4x slower K-major.
DEQUANT_TILES = {"k_contiguous": (8, 256, 4), "k_major": (64, 128, 8)}


def dequantize(w, out: torch.Tensor, tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Decode the FP4 container ``w`` (``[E, N, K]`` or ``[N, K]``) into ``out`` (same logical shape,
    any strides, e.g. the transpose of a contiguous ``[E, K, N]``). The product is the same fp32
    multiply as ``formats.dequantize_*`` (bit-identical values); 4.25 bits are read per weight and
    each output written once, with no scratch (E8M0 scales are decoded in the kernel). Launches on
    the current stream (``experts`` decodes the down projection on a side stream)."""
    packed = w.packed.contiguous()
    N, KB = packed.shape[-2], packed.shape[-1]
    R = packed.numel() // KB
    e8m0 = w.scale_kind == "e8m0"
    sc = w.scales.contiguous() if e8m0 else w.linear_scales().contiguous()
    o = out if out.dim() == 3 else out.unsqueeze(0)
    half = w.block_size // 2
    if tile is None:
        tile = (16, 16, 4) if INTERPRET else DEQUANT_TILES["k_contiguous" if o.stride(2) == 1 else "k_major"]
    BLOCK_R, BLOCK_KB, warps = tile
    BLOCK_KB = max(half, BLOCK_KB // half * half)  # whole scale blocks per tile
    grid = (triton.cdiv(R, BLOCK_R), triton.cdiv(KB, BLOCK_KB))
    _dequant_kernel[grid](
        packed, sc, o, R, N, KB, o.stride(0), o.stride(1), o.stride(2),
        SCALE_KIND=SCALE_E8M0 if e8m0 else SCALE_LINEAR, HALF_BLOCK=half,
        BLOCK_R=BLOCK_R, BLOCK_KB=BLOCK_KB, num_warps=warps,
    )
    return out
