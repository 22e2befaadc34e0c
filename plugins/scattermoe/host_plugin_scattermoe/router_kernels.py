"""Triton kernels of the fused top-k router (``router.py``): one launch for the whole forward (the logits GEMM included),
one for the whole backward.

Why: transformers' routers run softmax, top-k, the renormalisation and a cast as 6-9 small kernels, and autograd
runs ~14 more in their backward. In a synchronised block step (issue 16) the GPU waits on the host through all of
them, before the first expert GEMM (``bench/trace_step.py``, H100: ~250 µs of host time for ~50 µs of GPU work), and
cuBLAS's host cost for the small logits GEMM alone is ~100 µs per call there (cProfile of ``F.linear``).

* ``_router_fwd_kernel``: per block of ``BLOCK_T`` tokens, the ``[BLOCK_T, E]`` logits GEMM (fp32 accumulation over
  ``H``, the bias added, rounded to the input dtype and written out: the model's logits, up to the last bit of an
  element whose fp32 sum lands at a rounding boundary) stays in registers for the routing; ``MODE`` 0 is
  softmax (fp32), top-k of the probabilities, renormalised over the k when ``NORM`` (Qwen3-MoE, Qwen3.5, OLMoE,
  Mixtral); ``MODE`` 1 is top-k of the logits, softmax over those k (gpt-oss). The top-k is k rounds of arg-max, the
  lowest expert id first among equal values, values descending.
* ``_router_bwd_kernel``: per block of tokens, the logits' gradient from the scores' gradient (recomputed from the
  logits: ``dl = p·(g − Σ p·g)`` over all experts without ``NORM``, ``w·(g − Σ w·g)`` over the chosen k with it, and
  in ``MODE`` 1), plus the logits' own gradient (an auxiliary loss), rounded to the input dtype as autograd's
  ``ToCopyBackward`` does, then ``dX = dl · W`` over ``H`` in chunks of ``BLOCK_H``; ``dl`` is written out only when
  the router's own weight or bias needs a gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from host_plugin_scattermoe.kernels import INT32_LIMIT, INTERPRET, _next_pow2
from host_plugin_scattermoe.launch import launch as _launch

#: the most experts the kernels hold in registers
MAX_EXPERTS = 512
#: the largest top-k they take
MAX_TOP_K = 32


@triton.jit
def _token_block(T, E, BLOCK_T: tl.constexpr, EP: tl.constexpr, INT64: tl.constexpr):
    """This program's token rows and the expert columns, with their masks."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    if INT64:
        rows = rows.to(tl.int64)
    cols = tl.arange(0, EP)
    return rows, rows < T, cols, cols < E


@triton.jit
def _router_fwd_kernel(X, W, Bias, Logits, Scores, Idx, T, E, H, stride_x, stride_w, K: tl.constexpr,
                       KP: tl.constexpr, EP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                       MODE: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
                       INT64: tl.constexpr):
    rows, rmask, cols, cmask = _token_block(T, E, BLOCK_T, EP, INT64)
    # the logits GEMM: [BLOCK_T, H] x [H, EP], fp32 accumulation, every expert in one tile
    acc = tl.zeros([BLOCK_T, EP], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < H
        xt = tl.load(X + rows[:, None] * stride_x + kk[None, :], mask=rmask[:, None] & km[None, :], other=0.0)
        wt = tl.load(W + cols[None, :] * stride_w + kk[:, None], mask=cmask[None, :] & km[:, None], other=0.0)
        acc = tl.dot(xt, wt.to(xt.dtype), acc, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    lq = acc.to(Logits.dtype.element_ty)  # the logits in the input dtype, as the model's F.linear returns them
    tl.store(Logits + rows[:, None] * E + cols[None, :], lq, mask=rmask[:, None] & cmask[None, :])
    # rows past T hold 0 (no NaN from an all -inf row), padded experts -inf
    lg = tl.where(cmask[None, :], tl.where(rmask[:, None], lq.to(tl.float32), 0.0), float("-inf"))
    if MODE == 0:
        mx = tl.max(lg, axis=1)
        ex = tl.where(cmask[None, :], tl.exp(lg - mx[:, None]), 0.0)
        sel = tl.where(cmask[None, :], ex / tl.sum(ex, axis=1)[:, None], -1.0)  # probabilities; padding never wins
        gone = -2.0
    else:
        sel = lg
        gone = float("-inf")
    kcols = tl.arange(0, KP)
    vals = tl.zeros([BLOCK_T, KP], dtype=tl.float32)
    ids = tl.zeros([BLOCK_T, KP], dtype=tl.int32)
    for j in tl.static_range(K):
        v = tl.max(sel, axis=1)
        i = tl.argmax(sel, axis=1, tie_break_left=True)
        vals = tl.where(kcols[None, :] == j, v[:, None], vals)
        ids = tl.where(kcols[None, :] == j, i[:, None], ids)
        sel = tl.where(cols[None, :] == i[:, None], gone, sel)
    kmask = kcols[None, :] < K
    if MODE == 0:
        if NORM:
            w = vals / tl.sum(vals, axis=1)[:, None]
        else:
            w = vals
    else:
        top = tl.max(tl.where(kmask, vals, float("-inf")), axis=1)
        ex = tl.where(kmask, tl.exp(vals - top[:, None]), 0.0)
        w = ex / tl.sum(ex, axis=1)[:, None]
    m = rmask[:, None] & kmask
    o = rows[:, None] * K + kcols[None, :]
    tl.store(Scores + o, w.to(Scores.dtype.element_ty), mask=m)
    tl.store(Idx + o, ids.to(tl.int64), mask=m)


@triton.jit
def _router_bwd_kernel(Logits, GScores, Idx, GLogits, W, DX, DL, T, E, H, stride_l, stride_w, stride_dx,
                       K: tl.constexpr, KP: tl.constexpr, EP: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_H: tl.constexpr, MODE: tl.constexpr, NORM: tl.constexpr, HAS_GL: tl.constexpr,
                       WRITE_DX: tl.constexpr, WRITE_DL: tl.constexpr, DOT_PREC: tl.constexpr, INT64: tl.constexpr):
    rows, rmask, cols, cmask = _token_block(T, E, BLOCK_T, EP, INT64)
    lm = rmask[:, None] & cmask[None, :]
    lg = tl.load(Logits + rows[:, None] * stride_l + cols[None, :], mask=lm, other=0.0).to(tl.float32)
    lg = tl.where(cmask[None, :], lg, float("-inf"))
    kcols = tl.arange(0, KP)
    km = rmask[:, None] & (kcols[None, :] < K)
    # rows past T choose expert 0 with a zero gradient (no NaN from an empty choice)
    ids = tl.load(Idx + rows[:, None] * K + kcols[None, :], mask=km, other=0).to(tl.int32)
    g = tl.load(GScores + rows[:, None] * K + kcols[None, :], mask=km, other=0.0).to(tl.float32)
    # the scores' gradient and the chosen set, spread over the experts
    gE = tl.zeros([BLOCK_T, EP], dtype=tl.float32)
    chosen = tl.zeros([BLOCK_T, EP], dtype=tl.int1)
    for j in tl.static_range(K):
        ij = tl.sum(tl.where(kcols[None, :] == j, ids, 0), axis=1)
        gj = tl.sum(tl.where(kcols[None, :] == j, g, 0.0), axis=1)
        hit = cols[None, :] == ij[:, None]
        gE = tl.where(hit, gj[:, None], gE)
        chosen = chosen | hit
    if MODE == 0 and not NORM:
        mx = tl.max(lg, axis=1)
        ex = tl.where(cmask[None, :], tl.exp(lg - mx[:, None]), 0.0)
        p = ex / tl.sum(ex, axis=1)[:, None]
    else:  # the weights are a softmax over the chosen logits
        ls = tl.where(chosen, lg, float("-inf"))
        mx = tl.max(ls, axis=1)
        ex = tl.where(chosen, tl.exp(ls - mx[:, None]), 0.0)
        p = ex / tl.sum(ex, axis=1)[:, None]
    dl = p * (gE - tl.sum(p * gE, axis=1)[:, None])
    if HAS_GL:
        dl += tl.load(GLogits + rows[:, None] * stride_l + cols[None, :], mask=lm, other=0.0).to(tl.float32)
    dl = tl.where(lm, dl, 0.0).to(DX.dtype.element_ty)
    if WRITE_DL:
        tl.store(DL + rows[:, None] * stride_l + cols[None, :], dl, mask=lm)
    if WRITE_DX:
        for h0 in range(0, H, BLOCK_H):
            hc = h0 + tl.arange(0, BLOCK_H)
            hm = hc < H
            wt = tl.load(W + cols[:, None] * stride_w + hc[None, :], mask=cmask[:, None] & hm[None, :], other=0.0)
            acc = tl.dot(dl, wt.to(dl.dtype), input_precision=DOT_PREC)
            tl.store(DX + rows[:, None] * stride_dx + hc[None, :], acc.to(DX.dtype.element_ty),
                     mask=rmask[:, None] & hm[None, :])


_PLANS: dict = {}


def _plan(kind: str, T: int, E: int, H: int, k: int, dtype, flags: tuple):
    """(grid, constexprs + launch options, launch.py slot) per problem signature, built once."""
    key = (kind, T, E, H, k, dtype, flags)
    p = _PLANS.get(key)
    if p is not None:
        return p
    EP = max(16, _next_pow2(E))
    KP = max(2, _next_pow2(k))
    # a few [BLOCK_T, EP] fp32 tiles live in registers: ~4K elements per tile keeps them out of local memory (and
    # gives the forward's GEMM 128 programs at T = 4096, E = 128)
    bt = 16 if INTERPRET else max(16, min(32, 4096 // EP))
    int64 = (T + bt) * max(E, k, H) >= INT32_LIMIT
    kw = dict(K=k, KP=KP, EP=EP, BLOCK_T=bt, INT64=int64, num_warps=4 if EP <= 128 else 8)
    if kind == "fwd":
        mode, norm, has_bias = flags
        # the W chunk [BLOCK_K, EP] is the GEMM's shared-memory tile: 3 stages up to 128 experts, else 2
        kw.update(MODE=mode, NORM=norm, HAS_BIAS=has_bias, BLOCK_K=32 if INTERPRET or dtype == torch.float32 else 64,
                  DOT_PREC="ieee" if dtype == torch.float32 else "tf32", num_stages=3 if EP <= 128 else 2)
    else:
        mode, norm, has_gl, write_dx, write_dl = flags
        # the W chunk [EP, BLOCK_H] is the shared-memory tile: at most 32 KB per stage, 2 stages
        bh = 32 if INTERPRET else max(16, min(128, 32768 // (EP * dtype.itemsize)))
        # its [BLOCK_T, EP] tiles (logits, probabilities, gradients, the dot's accumulator) spill at 4 warps from 64
        # experts on (ptxas, sm_90a): 8 warps there
        kw.update(MODE=mode, NORM=norm, HAS_GL=has_gl, WRITE_DX=write_dx, WRITE_DL=write_dl, BLOCK_H=bh,
                  DOT_PREC="ieee" if dtype == torch.float32 else "tf32", num_stages=2, num_warps=8 if EP >= 64 else 4)
    p = ((triton.cdiv(T, bt), 1, 1), kw, {})
    if len(_PLANS) > 256:
        _PLANS.clear()
    _PLANS[key] = p
    return p


def route(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, k: int, mode: int, norm: bool,
          scores_dtype: torch.dtype):
    """``(logits [T, E] x.dtype, scores [T, k] scores_dtype, ids [T, k] int64)`` for ``x [T, H]`` and the router
    weight ``W [E, H]`` (and bias ``[E]``), in one launch."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if W.stride(-1) != 1:
        W = W.contiguous()
    T, H = x.shape
    E = W.shape[0]
    dev = x.device
    logits = torch.empty(T, E, device=dev, dtype=x.dtype)
    scores = torch.empty(T, k, device=dev, dtype=scores_dtype)
    ids = torch.empty(T, k, device=dev, dtype=torch.int64)
    if T:
        g, kw, slot = _plan("fwd", T, E, H, k, x.dtype, (mode, norm, b is not None))
        args = (x, W, b if b is not None else W, logits, scores, ids, T, E, H, x.stride(0), W.stride(0))
        _launch(_router_fwd_kernel, g, args, kw, slot)
    return logits, scores, ids


def backward(logits, g_scores, ids, g_logits, W, mode: int, norm: bool, need_dx: bool, need_dl: bool):
    """``(dX [T, H] or None, dl [T, E] or None)``: the router's input gradient through ``W [E, H]`` and the logits'
    gradient (for the router's own weight and bias), both in the logits' dtype."""
    T, E = logits.shape
    H = W.shape[1]
    dev, dt = logits.device, logits.dtype
    dx = torch.empty(T, H, device=dev, dtype=dt) if need_dx else None
    dl = torch.empty(T, E, device=dev, dtype=dt) if need_dl else None
    if T:
        logits = logits.contiguous()  # the forward's already is: the gradients share its row stride E
        if g_logits is not None:
            g_logits = g_logits.contiguous()
        if W.stride(1) != 1:
            W = W.contiguous()
        g_scores = g_scores.contiguous()
        flags = (mode, norm, g_logits is not None, need_dx, need_dl)
        g, kw, slot = _plan("bwd", T, E, H, ids.shape[1], dt, flags)
        args = (logits, g_scores, ids.contiguous(), g_logits if g_logits is not None else logits, W,
                dx if dx is not None else logits, dl if dl is not None else logits, T, E, H, E, W.stride(0), H)
        _launch(_router_bwd_kernel, g, args, kw, slot)
    return dx, dl
