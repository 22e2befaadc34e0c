"""Pure-torch reference of the ScatterMoE math (public, stable API): the CPU path and the test oracle.

Every function is differentiable with plain autograd, works in any floating dtype (tests run it in
float64) and never materialises ``W + B·A``: the LoRA term is always ``((X·Aᵀ)·Bᵀ)·scaling``.

Kernel layout used throughout (see :mod:`host_plugin_scattermoe.lora` for the conversion from
transformers / peft layouts):

* ``W``  ``[E, K, N]``: expert ``e`` maps ``K`` input features to ``N`` outputs, ``y = x @ W[e]``.
* ``A``  ``[E, r, K]`` and ``B`` ``[E, N, r]``: ``y += scaling * (x @ A[e].T) @ B[e].T``.
* ``bias`` ``[E, N]``.

Row conventions (``L = T * k`` routed pairs, sorted by :func:`routing.sort_tokens`):

* ``grouped_in=False``: ``x`` is ``[T, K]`` (one row per token); sorted position ``p`` reads row
  ``sorted_scattered_idxs[p] // k``. ``grouped_in=True``: ``x`` is ``[L, K]`` in sorted order.
* ``grouped_out=True``: the output is ``[L, N]`` in sorted order; ``grouped_out=False``: the output
  is ``[L, N]`` in flat (token-major, ``t * k + j``) order.

Functions:

* ``scattered_linear(x, W, k, sorted_expert_idxs, sorted_scattered_idxs, expert_offsets, A=None,
  B=None, scaling=1.0, bias=None, grouped_in=False, grouped_out=False) -> Tensor``
* ``combine(y, gates) -> Tensor``: ``out[t] = sum_j gates[t, j] * y[t * k + j]``.
* ``experts_forward(hidden_states, top_k_index, top_k_weights, gate_up, down, *, transposed=False,
  gate_up_bias=None, down_bias=None, gate_up_lora=None, down_lora=None, apply_gate=glu,
  post_norm=None) -> Tensor``: a whole transformers experts module (``gate_up`` / ``down`` in the
  transformers layout; ``*_lora`` = ``(A, B, scaling)`` in kernel layout).
* ``glu(h, act=silu)``, ``gpt_oss_glu(h, alpha=1.702, limit=7.0)``: the two gate layouts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from host_plugin_scattermoe.routing import sort_tokens


def scattered_linear(
    x: torch.Tensor,
    W: torch.Tensor,
    k: int,
    sorted_expert_idxs: torch.Tensor,
    sorted_scattered_idxs: torch.Tensor,
    expert_offsets: torch.Tensor,
    A: torch.Tensor | None = None,
    B: torch.Tensor | None = None,
    scaling: float = 1.0,
    bias: torch.Tensor | None = None,
    grouped_in: bool = False,
    grouped_out: bool = False,
) -> torch.Tensor:
    """One expert projection: gather -> ``x W_e + s (x A_eᵀ) B_eᵀ + b_e`` -> scatter (see module doc)."""
    L = sorted_scattered_idxs.numel()
    xs = x if grouped_in else x.index_select(0, sorted_scattered_idxs // k)
    ends = expert_offsets.tolist()
    outs = []
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            xe = xs[start:end]
            ye = xe @ W[e]
            if A is not None:
                ye = ye + ((xe @ A[e].transpose(0, 1)) @ B[e].transpose(0, 1)) * scaling
            if bias is not None:
                ye = ye + bias[e]
            outs.append(ye)
        start = end
    N = W.shape[-1]
    y = torch.cat(outs, 0) if outs else xs.new_zeros(0, N)
    if y.shape[0] < L:  # only possible with out-of-range expert ids; keep shapes valid
        y = torch.cat([y, y.new_zeros(L - y.shape[0], N)], 0)
    if grouped_out:
        return y
    return torch.zeros(L, N, dtype=y.dtype, device=y.device).index_copy(0, sorted_scattered_idxs, y)


def combine(y: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_j gates[t, j] * y[t*k + j]`` with ``y`` ``[T*k, N]`` in flat order."""
    T, k = gates.shape
    dt = torch.promote_types(gates.dtype, y.dtype)  # fp32 gates: fp32 sum and router gradient
    return torch.bmm(gates.unsqueeze(1).to(dt), y.view(T, k, -1).to(dt)).squeeze(1).to(y.dtype)


def glu(h: torch.Tensor, act: Callable = F.silu) -> torch.Tensor:
    """Concatenated gate/up layout: ``act(h[:, :I]) * h[:, I:]``."""
    gate, up = h.chunk(2, dim=-1)
    return act(gate) * up


def gpt_oss_glu(h: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """gpt-oss: interleaved gate/up columns, clamped sigmoid-GLU, ``(up + 1) * glu``."""
    gate, up = h[..., ::2], h[..., 1::2]
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def experts_forward(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    *,
    transposed: bool = False,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    gate_up_lora: tuple | None = None,
    down_lora: tuple | None = None,
    apply_gate: Callable = glu,
    post_norm: Callable | None = None,
) -> torch.Tensor:
    """A whole experts module. ``gate_up`` is ``[E, 2I, H]`` (or ``[E, H, 2I]`` when ``transposed``),
    ``down`` is ``[E, H, I]`` (or ``[E, I, H]``)."""
    E = gate_up.shape[0]
    k = top_k_index.shape[1]
    sei, ssi, offs = sort_tokens(top_k_index, E)
    W1 = gate_up if transposed else gate_up.transpose(1, 2)
    W2 = down if transposed else down.transpose(1, 2)
    A1, B1, s1 = gate_up_lora if gate_up_lora is not None else (None, None, 0.0)
    A2, B2, s2 = down_lora if down_lora is not None else (None, None, 0.0)
    h = scattered_linear(hidden_states, W1, k, sei, ssi, offs, A1, B1, s1, gate_up_bias, False, True)
    h = apply_gate(h)
    y = scattered_linear(h, W2, 1, sei, ssi, offs, A2, B2, s2, down_bias, True, False)
    if post_norm is not None:
        y = post_norm(y)
    return combine(y, top_k_weights).to(hidden_states.dtype)
