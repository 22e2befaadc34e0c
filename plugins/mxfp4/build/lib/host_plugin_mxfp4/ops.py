"""Autograd entry of strategy B and the two strategies as whole experts forwards.

``fp4_scattered_experts(x, w, k, sei, ssi, offs, A=None, B=None, scaling=1.0, bias=None,
grouped_in=False, grouped_out=False)`` mirrors ``host_plugin_scattermoe.ops.scattered_experts``
with an :class:`~host_plugin_mxfp4.formats.FP4Weights` ``w`` (``[E, N, K]``) instead of a bf16
``W [E, K, N]``. Gradients flow to ``x``, ``bias``, ``A`` and ``B``; never to the base.
"""

from __future__ import annotations

import torch

from host_plugin_mxfp4 import kernels as K
from host_plugin_mxfp4.formats import FP4Weights


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda or K.INTERPRET


class FP4ExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, A, B, w, sei, ssi, offs, k, scaling, grouped_in, grouped_out):
        has_lora = B is not None
        need_lora_grad = has_lora and (A.requires_grad or B.requires_grad)
        scales = K.kernel_scales(w)
        y, xa = K.fp4_scatter2scatter(
            x, w, ssi, offs, k, reduce_k=True, A=A, B=B, scaling=scaling, bias=bias,
            grouped_in=grouped_in, grouped_out=grouped_out, write_xa=need_lora_grad, scales=scales,
        )
        ctx.save_for_backward(x, A, B, xa, sei, ssi, offs)
        ctx.w, ctx.scales = w, scales
        ctx.k, ctx.scaling, ctx.grouped_in, ctx.grouped_out = k, scaling, grouped_in, grouped_out
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        from host_plugin_scattermoe.kernels import group_outer

        x, A, B, xa, sei, ssi, offs = ctx.saved_tensors
        w = ctx.w
        k, s, gin, gout = ctx.k, ctx.scaling, ctx.grouped_in, ctx.grouped_out
        need_x, need_b, need_A, need_B = ctx.needs_input_grad[:4]
        dy = dy.contiguous()
        E, N, Kdim = w.shape
        has_lora = B is not None
        dx = db = dA = dB = None
        dyb = None
        if need_x or (has_lora and need_A):
            # dX = dY W_e + s (dY B_e) A_e, reading the forward's packed layout with K as output axis
            dx, dyb = K.fp4_scatter2scatter(
                dy, w, ssi, offs, 1, reduce_k=False,
                A=B.transpose(1, 2) if has_lora else None, B=A.transpose(1, 2) if has_lora else None,
                scaling=s, grouped_in=gout, grouped_out=gin, write_xa=has_lora and need_A, scales=ctx.scales,
            )
            if not gin and k > 1:
                dx = dx.view(-1, k, Kdim).sum(1)
            if not need_x:
                dx = None
        x_fan = 0 if gin else k
        dy_fan = 0 if gout else 1
        if has_lora and need_A:
            dA = group_outer(dyb, x, ssi, offs, l_fan=0, r_fan=x_fan, scaling=s, out_dtype=A.dtype, compute_dtype=x.dtype)
        if has_lora and need_B:
            dB = group_outer(dy, xa, ssi, offs, l_fan=dy_fan, r_fan=0, scaling=s, out_dtype=B.dtype, compute_dtype=dy.dtype)
        if need_b and ctx.has_bias:
            dy_g = dy if gout else dy.index_select(0, ssi)
            db = torch.zeros(E, N, device=dy.device, dtype=torch.float32).index_add_(0, sei, dy_g.float())
        return dx, db, dA, dB, None, None, None, None, None, None, None, None


def fp4_scattered_experts(
    x: torch.Tensor,
    w: FP4Weights,
    k: int,
    sorted_expert_idxs: torch.Tensor,
    sorted_scattered_idxs: torch.Tensor,
    expert_offsets: torch.Tensor,
    lora_A: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None,
    scaling: float = 1.0,
    bias: torch.Tensor | None = None,
    grouped_in: bool = False,
    grouped_out: bool = False,
) -> torch.Tensor:
    """Strategy B projection (Triton on CUDA or under ``TRITON_INTERPRET=1``; otherwise the torch
    reference on the dequantized weights)."""
    from host_plugin_scattermoe import reference

    if (lora_A is None) != (lora_B is None):
        raise ValueError("pass both lora_A and lora_B, or neither")
    if lora_A is not None and scaling == 0:
        lora_A = lora_B = None
    # One compute dtype, the activations' (peft keeps LoRA factors in fp32 on a bf16 model; autograd casts back).
    dt = x.dtype
    if lora_A is not None:
        lora_A, lora_B = lora_A.to(dt), lora_B.to(dt)
    if bias is not None:
        bias = bias.to(dt)
    if not _use_triton(x):
        W = w.dequantize(dt).transpose(1, 2)
        return reference.scattered_linear(
            x, W, k, sorted_expert_idxs, sorted_scattered_idxs, expert_offsets,
            lora_A, lora_B, scaling, bias, grouped_in, grouped_out,
        )
    if lora_A is not None:
        # contiguous rank-r copies (E*r*(K+N) elements, negligible): the kernels then see the
        # canonical operand layout (A [E, r, K] and B [E, N, r] row-major, their transposes in dX),
        # the one validated per autotune config on the GPU, not peft's permuted view of lora_B
        lora_A, lora_B = lora_A.contiguous(), lora_B.contiguous()
    return FP4ExpertsFunction.apply(
        x, bias, lora_A, lora_B, w, sorted_expert_idxs, sorted_scattered_idxs, expert_offsets,
        int(k), float(scaling), bool(grouped_in), bool(grouped_out),
    )
