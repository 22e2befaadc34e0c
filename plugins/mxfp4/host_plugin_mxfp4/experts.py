"""The experts forward for modules whose weights are FP4 containers, and the strategy choice.

* ``selective`` (A): the experts this batch routes to are gathered from the packed container,
  dequantized to the activation dtype (a ``[a, N, K]`` buffer, ``a`` = active experts), the routing
  is remapped to ``0..a-1``, and scattermoe's bf16 path runs on them (in training its merged experts
  node with the light tail, ``host_plugin_scattermoe.experts.merged_kwargs``, where scattermoe takes it;
  else its separate nodes, and its fused GLU/down/combine tail when that is on): bit-identical to
  scattermoe on the dequantized weights. With at least ``DENSE_ROUTES_PER_EXPERT`` routed rows per expert
  (T·k ≥ 4E: every expert is almost surely routed) all experts are dequantized in place of the
  selection: no ``torch.unique`` (a host synchronisation that stalls the step), no remap, no gather
  copy of the packed bytes. (Decoding the down projection on a side stream during the up GEMM
  was measured on an H200 and gained nothing: the GEMM fills the GPU.)
* ``fused`` (B): :func:`host_plugin_mxfp4.ops.fp4_scattered_experts`; no bf16 weight tile exists.
* ``auto``: a measured rule, not a per-run timing: A whenever its dequantized weights fit
  ``AUTO_MAX_DEQUANT_BYTES`` (all experts, or the active ones when all would not fit), else B. On
  the H200 and H100 B was 1.3x (after its rewrite) to 6.6x slower than A at every benchmarked shape (README), so timing
  both (and autotuning B's kernel during the first training step) bought nothing.

The gate/activation, biases and post-expert norm are the model's own (``_apply_gate``, ``act_fn``,
``has_bias``, ``is_transposed``, ``has_post_expert_norm``), as in scattermoe's experts forward.
"""

from __future__ import annotations

import types

import torch

from host_plugin_mxfp4 import loading
from host_plugin_mxfp4 import ops as fp4_ops

STRATEGIES = ("auto", "selective", "fused")
SETTINGS = {"strategy": "auto"}
AUTO_MAX_DEQUANT_BYTES = 4 << 30
#: Routed rows per expert from which A dequantizes every expert instead of selecting the active ones.
DENSE_ROUTES_PER_EXPERT = 4
STATS = {"selective": 0, "fused": 0}


def _layer_params(self):
    from host_plugin_scattermoe.lora import weight_and_lora

    has_gate = bool(getattr(self, "has_gate", True))
    has_bias = bool(getattr(self, "has_bias", False))
    up_name = "gate_up_proj" if has_gate else "up_proj"
    _, l1 = weight_and_lora(self, up_name)
    _, l2 = weight_and_lora(self, "down_proj")
    b1 = getattr(self, f"{up_name}_bias") if has_bias else None
    b2 = getattr(self, "down_proj_bias") if has_bias else None
    return up_name, (l1, b1), (l2, b2)


def _gate(self, h):
    """The module's activation, through scattermoe's fused gate kernels as its experts forward does."""
    from host_plugin_scattermoe.experts import apply_gate

    return apply_gate(self, h)


def _finish(self, y, top_k_weights, hidden_states):
    from host_plugin_scattermoe import ops

    if getattr(self, "has_post_expert_norm", False):
        y = self.post_expert_norm(y)
    return ops.combine(y, top_k_weights).to(hidden_states.dtype)  # fp32 routing weights: fp32 router grad


def _dtype(self, name):
    return self._parameters[name].dtype


def _select_experts(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[index]`` along dim 0, keeping ``t``'s memory order of dims (peft's ``B`` is a permuted
    view): the compact operand then has the same layout as the full one, so every GEMM (and its
    backward) runs the same way as on the full tensor and results stay bit-identical."""
    order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))
    inv = [order.index(d) for d in range(t.dim())]
    return t.permute(order).index_select(order.index(0), index).permute(inv)


def _dense_routing(self, top_k_index) -> bool:
    return top_k_index.numel() >= DENSE_ROUTES_PER_EXPERT * self.num_experts


def selective_forward(self, hidden_states, top_k_index, top_k_weights):
    """Strategy A (see module doc)."""
    from host_plugin_scattermoe import fused, ops
    from host_plugin_scattermoe.experts import merged_kwargs
    from host_plugin_scattermoe.routing import sort_tokens

    up_name, (l1, b1), (l2, b2) = _layer_params(self)
    E = self.num_experts
    k = top_k_index.shape[-1]
    dt = _dtype(self, up_name)
    if _dense_routing(self, top_k_index):
        active, idx, a = None, top_k_index, E
    else:
        active = torch.unique(top_k_index.reshape(-1))  # sorted
        remap = torch.full((E,), -1, dtype=torch.long, device=top_k_index.device)
        remap[active] = torch.arange(active.numel(), device=top_k_index.device)
        idx = remap[top_k_index]
        a = active.numel()
    k_major = loading.is_transposed(self)

    def select(name, lora, bias):
        w = loading.get_weights(self, name)
        if active is not None:
            w = w.select(active)
            if lora is not None:
                A, B, s = lora
                lora = (_select_experts(A, active), _select_experts(B, active), s)
            bias = bias.index_select(0, active) if bias is not None else None
        return w, lora, bias

    # [a, K, N] kernel views, stored like the module's own parameters (K-major when transposed)
    w1, l1, b1 = select(up_name, l1, b1)
    W1 = w1.dequantize(dt, k_major=k_major).transpose(1, 2)
    sei, ssi, offs = sort_tokens(idx, a)
    x = hidden_states.to(dt)
    W2 = None
    if torch.is_grad_enabled():
        # Training: the backward keeps both decoded weights anyway, so this is scattermoe's own experts call (its
        # merged node and light tail where they apply, merged_kwargs), bit-identical to scattermoe on the decoded
        # weights. Without gradients the two projections run one after the other (below): one decoded weight at a time.
        w2, l2, b2 = select("down_proj", l2, b2)
        W2 = w2.dequantize(dt, k_major=k_major).transpose(1, 2)
        merged = merged_kwargs(self, x, b1, b2)
        if merged is not None:
            out = ops.glu_experts(x, W1, W2, k, sei, ssi, offs, l1, l2, top_k_weights, **merged)
            return out.to(hidden_states.dtype)
    A1, B1, s1 = l1 if l1 is not None else (None, None, 0.0)
    h = ops.scattered_experts(x, W1, k, sei, ssi, offs, A1, B1, s1, b1, grouped_in=False, grouped_out=True)
    del W1  # freed here in no-grad forwards (autograd keeps it otherwise): the two decoded weights never coexist then
    if W2 is None:
        w2, l2, b2 = select("down_proj", l2, b2)
        W2 = w2.dequantize(dt, k_major=k_major).transpose(1, 2)
    A2, B2, s2 = l2 if l2 is not None else (None, None, 0.0)
    if fused.applies(self, b2):  # the same fused tail as scattermoe's experts forward (bit-identical to it)
        return fused.glu_down_combine(h, W2, k, sei, ssi, offs, A2, B2, s2, top_k_weights).to(hidden_states.dtype)
    h = _gate(self, h)
    y = ops.scattered_experts(h, W2, 1, sei, ssi, offs, A2, B2, s2, b2, grouped_in=True, grouped_out=False)
    return _finish(self, y, top_k_weights, hidden_states)


def fused_forward(self, hidden_states, top_k_index, top_k_weights):
    """Strategy B (see module doc)."""
    from host_plugin_scattermoe.routing import sort_tokens

    up_name, (l1, b1), (l2, b2) = _layer_params(self)
    E = self.num_experts
    k = top_k_index.shape[-1]
    dt = _dtype(self, up_name)
    sei, ssi, offs = sort_tokens(top_k_index, E)
    x = hidden_states.to(dt)
    A1, B1, s1 = l1 if l1 is not None else (None, None, 0.0)
    W1 = loading.get_weights(self, up_name)
    h = fp4_ops.fp4_scattered_experts(x, W1, k, sei, ssi, offs, A1, B1, s1, b1, grouped_in=False, grouped_out=True)
    h = _gate(self, h)
    A2, B2, s2 = l2 if l2 is not None else (None, None, 0.0)
    W2 = loading.get_weights(self, "down_proj")
    y = fp4_ops.fp4_scattered_experts(h, W2, 1, sei, ssi, offs, A2, B2, s2, b2, grouped_in=True, grouped_out=False)
    return _finish(self, y, top_k_weights, hidden_states)


def _dequant_bytes(self, active: int) -> int:
    per_expert = sum(2 * loading.get_weights(self, n).shape[1] * loading.get_weights(self, n).shape[2]
                     for n in loading.quantized_names(self))
    return active * per_expert


def choose(self, hidden_states, top_k_index) -> str:
    """The strategy for this call: the configured one, or ``auto``'s rule (module doc; measured in
    the README's tables): A whenever its dequantized weights fit ``AUTO_MAX_DEQUANT_BYTES``, else B.
    The active-expert count (a host synchronisation) is only looked at when all experts would not fit."""
    strategy = SETTINGS["strategy"]
    if strategy != "auto":
        return strategy
    E = self.num_experts
    if _dequant_bytes(self, E) <= AUTO_MAX_DEQUANT_BYTES or _dense_routing(self, top_k_index):
        active = E
    else:
        active = int(torch.unique(top_k_index).numel())
    return "selective" if _dequant_bytes(self, active) <= AUTO_MAX_DEQUANT_BYTES else "fused"


def fp4_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Installed as the ``forward`` of every quantized experts module."""
    strategy = choose(self, hidden_states, top_k_index)
    STATS[strategy] += 1
    if strategy == "selective":
        return selective_forward(self, hidden_states, top_k_index, top_k_weights)
    return fused_forward(self, hidden_states, top_k_index, top_k_weights)


def _wrapper_forward(self, x, *args, **kwargs):
    """peft ParamWrapper around a quantized experts module: never fold W + ΔW (the base is packed);
    the experts forward reads the LoRA factors itself."""
    kwargs.pop("adapter_names", None)
    return self.get_base_layer()(x, *args, **kwargs)


def install(model) -> int:
    """Route every quantized experts module (and the peft wrappers around it) to the FP4 forward."""
    from host_plugin_scattermoe import lora

    lora.attach(model)  # links wrappers -> experts module (idempotent)
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except Exception:  # pragma: no cover
        ParamWrapper = ()
    n = 0
    for m in model.modules():
        if loading.is_quantized(m):
            m.forward = types.MethodType(fp4_experts_forward, m)
            n += 1
        elif ParamWrapper and isinstance(m, ParamWrapper):
            base = m.get_base_layer()
            if loading.is_quantized(base):
                m.forward = types.MethodType(_wrapper_forward, m)
    return n
