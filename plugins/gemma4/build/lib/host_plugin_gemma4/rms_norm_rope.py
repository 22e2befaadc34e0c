"""Fused RMSNorm + RoPE (Triton), forward and backward, for Gemma 4 attention.

Gemma 4 normalises every q/k head with an RMSNorm (a learned scale, no ``1 +`` offset), then applies
rotary embeddings; v heads get a scale-less RMSNorm and no rotation. Eagerly that is ~10 kernels and
several full-size intermediates per projection (fp32 upcast, normed, scaled, ``rotate_half`` halves and
their concatenation, two products). Here one kernel reads x (and cos/sin) once and writes y once:

    r   = (mean(x**2) + eps) ** -0.5
    n   = x * r [* w]                                  (RMSNorm, fp32)
    y   = n * cos + rotate_half(n) * sin               (RoPE, when cos/sin are given)
    rotate_half([a, b]) = [-b, a]

Shapes: x ``(..., H, D)`` (any leading dims, last dim contiguous), w ``(D,)`` or None, cos/sin
``(..., D)`` with the same leading dims as x minus the head dim (they broadcast over heads, as
``apply_rotary_pos_emb(..., unsqueeze_dim=2)`` does). Math is fp32; the output has x's dtype.
Backward returns dx and dw (cos/sin come from the rotary module under no_grad: no gradient).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _halves(P, row_off, cols, m, HALF: tl.constexpr):
    """The two head-dim halves (``rotate_half``'s split) of the rows at ``P + row_off``, in fp32."""
    p = P + row_off[:, None] + cols[None, :]
    return tl.load(p, mask=m, other=0.0).to(tl.float32), tl.load(p + HALF, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _fwd_kernel(
    X, Y, W, COS, SIN, RSTD,
    n_rows, n_heads, eps,
    x_stride, y_stride, cs_stride,
    HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_W: tl.constexpr, HAS_ROPE: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_H)
    rmask = rows < n_rows
    cmask = cols < HALF
    m = rmask[:, None] & cmask[None, :]
    x1, x2 = _halves(X, rows * x_stride, cols, m, HALF)
    ms = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF)
    r = 1.0 / tl.sqrt(ms + eps)
    tl.store(RSTD + rows, r, mask=rmask)
    n1 = x1 * r[:, None]
    n2 = x2 * r[:, None]
    if HAS_W:
        w1 = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        w2 = tl.load(W + HALF + cols, mask=cmask, other=0.0).to(tl.float32)
        n1 = n1 * w1[None, :]
        n2 = n2 * w2[None, :]
    if HAS_ROPE:
        cs_off = (rows // n_heads) * cs_stride
        c1, c2 = _halves(COS, cs_off, cols, m, HALF)
        s1, s2 = _halves(SIN, cs_off, cols, m, HALF)
        o1 = n1 * c1 - n2 * s1
        o2 = n2 * c2 + n1 * s2
    else:
        o1 = n1
        o2 = n2
    yp = Y + rows[:, None] * y_stride + cols[None, :]
    tl.store(yp, o1.to(Y.dtype.element_ty), mask=m)
    tl.store(yp + HALF, o2.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _bwd_kernel(
    DY, X, W, COS, SIN, RSTD, DX, DW_PART,
    n_rows, n_heads,
    dy_stride, x_stride, dx_stride, cs_stride,
    HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_W: tl.constexpr, HAS_ROPE: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_H)
    rmask = rows < n_rows
    cmask = cols < HALF
    m = rmask[:, None] & cmask[None, :]
    g1, g2 = _halves(DY, rows * dy_stride, cols, m, HALF)
    if HAS_ROPE:
        # y1 = n1*c1 - n2*s1 ; y2 = n2*c2 + n1*s2  =>  dn1 = g1*c1 + g2*s2 ; dn2 = g2*c2 - g1*s1
        cs_off = (rows // n_heads) * cs_stride
        c1, c2 = _halves(COS, cs_off, cols, m, HALF)
        s1, s2 = _halves(SIN, cs_off, cols, m, HALF)
        d1 = g1 * c1 + g2 * s2
        d2 = g2 * c2 - g1 * s1
    else:
        d1 = g1
        d2 = g2
    x1, x2 = _halves(X, rows * x_stride, cols, m, HALF)
    r = tl.load(RSTD + rows, mask=rmask, other=0.0)
    h1 = x1 * r[:, None]
    h2 = x2 * r[:, None]
    if HAS_W:
        w1 = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        w2 = tl.load(W + HALF + cols, mask=cmask, other=0.0).to(tl.float32)
        tl.store(DW_PART + pid * (2 * HALF) + cols, tl.sum(d1 * h1, axis=0), mask=cmask)
        tl.store(DW_PART + pid * (2 * HALF) + HALF + cols, tl.sum(d2 * h2, axis=0), mask=cmask)
        d1 = d1 * w1[None, :]
        d2 = d2 * w2[None, :]
    dot = (tl.sum(d1 * h1, axis=1) + tl.sum(d2 * h2, axis=1)) / (2 * HALF)
    dx1 = r[:, None] * (d1 - h1 * dot[:, None])
    dx2 = r[:, None] * (d2 - h2 * dot[:, None])
    dp = DX + rows[:, None] * dx_stride + cols[None, :]
    tl.store(dp, dx1.to(DX.dtype.element_ty), mask=m)
    tl.store(dp + HALF, dx2.to(DX.dtype.element_ty), mask=m)


def _block_rows(half: int) -> int:
    # ~1K fp32 elements per half-block per program (8 per thread at 4 warps): no register spills in the
    # backward, which keeps ~12 such tiles live
    return max(1, min(64, 1024 // triton.next_power_of_2(half)))


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _prep_cos_sin(cos, sin, x):
    if cos is None:
        return None, None
    lead = x.shape[:-2]
    cos = cos.expand(*lead, x.shape[-1]).reshape(-1, x.shape[-1])
    sin = sin.expand(*lead, x.shape[-1]).reshape(-1, x.shape[-1])
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin


class _FusedRMSNormRoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, cos, sin, eps):
        D = x.shape[-1]
        if D % 2:
            raise ValueError(f"fused_rms_norm_rope: head_dim must be even, got {D}")
        n_heads = x.shape[-2] if x.dim() >= 2 else 1
        cos2, sin2 = _prep_cos_sin(cos, sin, x)
        x2 = _as_rows(x)
        n_rows = x2.shape[0]
        y = torch.empty((n_rows, D), dtype=x.dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        half = D // 2
        br = _block_rows(half)
        grid = (triton.cdiv(n_rows, br),)
        dummy = x2
        _fwd_kernel[grid](
            x2, y, weight if weight is not None else dummy,
            cos2 if cos2 is not None else dummy, sin2 if sin2 is not None else dummy, rstd,
            n_rows, n_heads, eps,
            x2.stride(0), y.stride(0), cos2.stride(0) if cos2 is not None else 0,
            HALF=half, BLOCK_R=br, BLOCK_H=triton.next_power_of_2(half),
            HAS_W=weight is not None, HAS_ROPE=cos2 is not None,
        )
        ctx.save_for_backward(x2, weight, cos2, sin2, rstd)
        ctx.n_heads, ctx.shape, ctx.has_w = n_heads, x.shape, weight is not None
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, cos2, sin2, rstd = ctx.saved_tensors
        D = x2.shape[-1]
        half = D // 2
        n_rows = x2.shape[0]
        dy2 = _as_rows(dy)
        dx = torch.empty_like(x2)
        br = _block_rows(half)
        nprog = triton.cdiv(n_rows, br)
        dw_part = torch.empty((nprog, D), dtype=torch.float32, device=x2.device) if ctx.has_w else rstd
        dummy = x2
        _bwd_kernel[(nprog,)](
            dy2, x2, weight if weight is not None else dummy,
            cos2 if cos2 is not None else dummy, sin2 if sin2 is not None else dummy,
            rstd, dx, dw_part,
            n_rows, ctx.n_heads,
            dy2.stride(0), x2.stride(0), dx.stride(0), cos2.stride(0) if cos2 is not None else 0,
            HALF=half, BLOCK_R=br, BLOCK_H=triton.next_power_of_2(half),
            HAS_W=ctx.has_w, HAS_ROPE=cos2 is not None,
        )
        dw = dw_part.sum(0).to(weight.dtype) if ctx.has_w and ctx.needs_input_grad[1] else None
        return dx.view(ctx.shape), dw, None, None, None


def fused_rms_norm_rope(x, weight=None, cos=None, sin=None, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm (scale ``weight`` or none) then RoPE (when ``cos``/``sin`` are given) in one kernel.

    ``x``: ``(..., H, D)``; ``cos``/``sin``: ``(..., D)`` broadcast over the H heads.
    """
    if (cos is None) != (sin is None):
        raise ValueError("fused_rms_norm_rope: pass both cos and sin, or neither")
    return _FusedRMSNormRoPE.apply(x, weight, cos, sin, float(eps))


def fused_rms_norm(x, weight=None, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm alone (Gemma 4's scale-less ``v_norm`` when ``weight`` is None)."""
    return _FusedRMSNormRoPE.apply(x, weight, None, None, float(eps))


def eager_rms_norm_rope(x, weight=None, cos=None, sin=None, eps: float = 1e-6) -> torch.Tensor:
    """The composition the kernel replaces, exactly as transformers' Gemma 4 runs it (the oracle)."""
    from transformers.models.gemma4.modeling_gemma4 import apply_rotary_pos_emb

    xf = x.float()
    n = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        n = n * weight.float()
    n = n.type_as(x)
    if cos is not None:
        n = apply_rotary_pos_emb(n, cos, sin, unsqueeze_dim=-2 if x.dim() == cos.dim() + 1 else 2)
    return n
