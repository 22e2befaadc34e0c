"""The tail of a SiLU-gated experts MLP as one autograd node: ``combine(silu_glu(h) · W_down (+ LoRA), gates)``.

``glu_down_combine(h, W, k, sorted_expert_idxs, sorted_scattered_idxs, expert_offsets, lora_A=None,
lora_B=None, scaling=1.0, gates=..., *, fused_lora=None, split_threshold=None, split_max_experts=None,
backend=None) -> Tensor [T, H]``

``h`` is the up projection's output ``[T*k, 2I]`` in sorted (grouped) order, ``[gate | up]``;
``W`` the down projection in kernel layout ``[E, I, H]``; ``gates`` the routing weights ``[T, k]``
(any float dtype; their gradient comes back in it, accumulated in fp32).

Forward: the SiLU-GLU kernel, the down projection (scatter to flat ``t*k+j`` order), the combine
kernel, as the separate ops do. The expert outputs ``y [T*k, H]`` are *not* kept for the backward.

Backward, one GEMM launch instead of three kernels and three ``[T*k, ·]`` temporaries
(``kernels.glu_down_dx``): the down projection's dX reads the token gradient ``dout[t]`` directly
(gathered like the forward's input, ``ssi // k``) and its epilogue scales each row by its routing
weight, applies the SiLU-GLU backward against ``h`` and reduces the routing weight's gradient
``<y, dout> = Σ act·(dout·W_eᵀ + s·(dout·B_e)·A_e)`` per column block. So ``dy = g·dout``
(``[T*k, H]``), ``d(act)`` (``[T*k, I]``) and ``y`` are never written; the LoRA gradients take
``g`` on the rank-sized side: ``dA = s·(g·dout·B)ᵀ·act``, ``dB = s·doutᵀ·(g·act·Aᵀ)`` (tiny ``[T*k, r]``
scalings). Used by the experts forward when ``scattermoe_fused_tail`` is on (``ops.SETTINGS``,
env ``SCATTERMOE_FUSED_TAIL=1``), for the default SiLU gate without biases or post-expert norm (a
trainable base weight runs the separate ops); the CPU path is the torch reference.

Measured on an H200 (Qwen3-30B-A3B block, T=4096): the fused launch takes ~0.63 ms against 0.28 +
0.06 + 0.07 ms for the plain dX, GLU backward and combine backward it replaces. Its epilogue holds
h's two halves beside the accumulator: 128×128 tiles spill, 128×64 tiles need 175 registers per
thread (one block per SM instead of two), so the GEMM runs at half the tile width and occupancy.
Hence off by default; it saves three launches, ~0.4 GB of traffic and the ``[T*k, H]`` outputs'
memory. The lighter version of this backward is the default experts node's light tail
(``ops._GluExpertsFunction``: the dX launch fed ``dout`` gathered, keeping the rule's tiles, with the gate scaling
and routing-weight gradient in the GLU backward kernel or, variant ``"gemm"``, in the dX epilogue against the saved
activation; ``y`` not kept).
"""

from __future__ import annotations

import torch

from host_plugin_scattermoe import kernels as K
from host_plugin_scattermoe import ops, reference


class GluDownCombineFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, W, A, B, gates, ssi, offs, k, scaling, split):
        has_lora = B is not None
        need_lora_grad = has_lora and (A.requires_grad or B.requires_grad)
        act = K.silu_glu_fwd(h)
        y, xa = ops.lora_linear_fwd(act, W, ssi, offs, 1, A, B, scaling, None, True, False, split, need_lora_grad)
        out = K.combine(y, gates)
        ctx.save_for_backward(h, act, W, A, B, xa, gates, ssi, offs)
        ctx.k, ctx.scaling, ctx.split = k, scaling, split
        return out

    @staticmethod
    def backward(ctx, dout):
        h, act, W, A, B, xa, gates, ssi, offs = ctx.saved_tensors
        k, s, split = ctx.k, ctx.scaling, ctx.split
        need_A, need_B = ctx.needs_input_grad[2:4]
        dout = dout.contiguous()
        has_lora = B is not None
        Wt = W.transpose(1, 2)
        dA = dB = None
        if has_lora and split:
            # rank-r GEMM dout·B first (grouped, fp32), then the base GEMM with its ·A epilogue
            dyb, _ = K.scatter2scatter(dout, B, ssi, offs, k, grouped_out=True, out_dtype=torch.float32)
            dh, _, dg = K.glu_down_dx(dout, Wt, ssi, offs, k, h, gates, B=A.transpose(1, 2), xa_in=dyb, scaling=s)
        elif has_lora:
            dh, dyb, dg = K.glu_down_dx(
                dout, Wt, ssi, offs, k, h, gates, A=B.transpose(1, 2), B=A.transpose(1, 2), scaling=s, write_xa=need_A
            )
        else:
            dh, dyb, dg = K.glu_down_dx(dout, Wt, ssi, offs, k, h, gates)
        if has_lora and (need_A or need_B):
            g_sorted = gates.reshape(-1).index_select(0, ssi).float()[:, None]
            if need_A:
                dA = K.group_outer(dyb * g_sorted, act, ssi, offs, scaling=s, out_dtype=A.dtype, compute_dtype=act.dtype)
            if need_B:
                dB = K.group_outer(dout, xa * g_sorted, ssi, offs, l_fan=k, scaling=s, out_dtype=B.dtype, compute_dtype=dout.dtype)
        return dh, None, dA, dB, dg.to(gates.dtype), None, None, None, None, None


def applies(module, down_bias=None) -> bool:
    """Whether an experts module's forward takes this tail: ``scattermoe_fused_tail`` on, the default SiLU
    gate, no down-projection bias, no post-expert norm."""
    from host_plugin_scattermoe.experts import _is_default_silu_gate

    return (
        ops.SETTINGS["fused_tail"]
        and bool(getattr(module, "has_gate", True))
        and _is_default_silu_gate(module)
        and down_bias is None
        and not getattr(module, "has_post_expert_norm", False)
    )


def glu_down_combine(
    h: torch.Tensor,
    W: torch.Tensor,
    k: int,
    sorted_expert_idxs: torch.Tensor,
    sorted_scattered_idxs: torch.Tensor,
    expert_offsets: torch.Tensor,
    lora_A: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None,
    scaling: float = 1.0,
    gates: torch.Tensor | None = None,
    *,
    fused_lora: bool | None = None,
    split_threshold: int | None = None,
    split_max_experts: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """See the module docstring. Returns ``[T, H]`` in ``h``'s dtype."""
    if gates is None:
        raise ValueError("glu_down_combine needs the routing weights (gates)")
    h = h.to(W.dtype)
    if not ops._use_triton(h, backend) or W.requires_grad or h.stride(-1) != 1:
        lora_A, lora_B = ops.cast_lora(lora_A, lora_B, scaling, W.dtype)
        act = reference.glu(h) if not ops._use_triton(h, backend) else ops.silu_glu(h, backend=backend)
        y = ops.scattered_experts(
            act, W, 1, sorted_expert_idxs, sorted_scattered_idxs, expert_offsets, lora_A, lora_B, scaling,
            grouped_in=True, grouped_out=False, fused_lora=fused_lora, split_threshold=split_threshold,
            split_max_experts=split_max_experts, backend=backend,
        )
        return ops.combine(y, gates, backend=backend)
    lora_A, lora_B = ops.kernel_lora(lora_A, lora_B, scaling, W.dtype)
    E, Kdim, N = W.shape
    split = lora_A is not None and ops.use_split(E, Kdim, N, fused_lora, split_threshold, split_max_experts)
    return GluDownCombineFunction.apply(
        h, W, lora_A, lora_B, gates.contiguous(), sorted_scattered_idxs, expert_offsets, int(k), float(scaling), split
    )
