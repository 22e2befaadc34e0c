"""The experts forward for modules whose weights are FP4 containers, and the strategy choice.

* ``selective`` (A): the experts this batch routes to are gathered from the packed container,
  dequantized to the activation dtype (a ``[a, N, K]`` buffer, ``a`` = active experts), the routing
  is remapped to ``0..a-1``, and scattermoe's bf16 path (``host_plugin_scattermoe.ops``, and its
  fused GLU/down/combine tail when that is on) runs on them: bit-identical to scattermoe
  on the dequantized weights. With at least ``DENSE_ROUTES_PER_EXPERT`` routed rows per expert
  (T·k ≥ 4E: every expert is almost surely routed) all experts are dequantized in place of the
  selection: no ``torch.unique`` (a host synchronisation that stalls the step), no remap, no gather
  copy of the packed bytes.
* ``fused`` (B): :func:`host_plugin_mxfp4.ops.fp4_scattered_experts`; no bf16 weight tile exists.
* ``auto``: per layer shape and batch (bucketed token count and active-expert fraction), both are
  timed once (forward + backward on CUDA) and the faster is cached; A is skipped when its dequant
  buffer would exceed ``AUTO_MAX_DEQUANT_BYTES``. Without CUDA (and without the Triton
  interpreter) B runs the torch reference on dequantized weights, so ``auto`` picks A there.

The gate/activation, biases and post-expert norm are the model's own (``_apply_gate``, ``act_fn``,
``has_bias``, ``is_transposed``, ``has_post_expert_norm``), as in scattermoe's experts forward.
"""

from __future__ import annotations

import logging
import time
import types

import torch

from host_plugin_mxfp4 import loading
from host_plugin_mxfp4 import ops as fp4_ops

log = logging.getLogger("host.mxfp4")

STRATEGIES = ("auto", "selective", "fused")
SETTINGS = {"strategy": "auto"}
AUTO_MAX_DEQUANT_BYTES = 4 << 30
#: Routed rows per expert from which A dequantizes every expert instead of selecting the active ones.
DENSE_ROUTES_PER_EXPERT = 4
_AUTO_CACHE: dict = {}
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

    def weights(name, lora, bias):
        # [a, K, N] kernel view, stored like the module's own parameter (K-major when transposed)
        w = loading.get_weights(self, name)
        W = (w if active is None else w.select(active)).dequantize(dt, k_major=loading.is_transposed(self))
        W = W.transpose(1, 2)
        if active is not None:
            if lora is not None:
                A, B, s = lora
                lora = (_select_experts(A, active), _select_experts(B, active), s)
            bias = bias.index_select(0, active) if bias is not None else None
        return W, lora, bias

    W1, l1, b1 = weights(up_name, l1, b1)
    sei, ssi, offs = sort_tokens(idx, a)
    x = hidden_states.to(dt)
    A1, B1, s1 = l1 if l1 is not None else (None, None, 0.0)
    h = ops.scattered_experts(x, W1, k, sei, ssi, offs, A1, B1, s1, b1, grouped_in=False, grouped_out=True)
    del W1
    W2, l2, b2 = weights("down_proj", l2, b2)
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


def _bucket(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def _time(fn, args, backward: bool) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(2):
        if backward:
            x = args[0].detach().requires_grad_(True)
            out = fn(x, *args[1:])
            torch.autograd.grad(out.float().sum(), [x])  # no .grad accumulation into the LoRA leaves
        else:
            with torch.no_grad():
                fn(*args)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / 2


def choose(self, hidden_states, top_k_index) -> str:
    """The strategy for this call (see module doc)."""
    strategy = SETTINGS["strategy"]
    if strategy != "auto":
        return strategy
    if not hidden_states.is_cuda:
        # CPU: B is the torch reference on all dequantized experts (or the Triton interpreter, a
        # test vehicle); A dequantizes only the routed experts, so it is never slower here
        return "selective"
    E = self.num_experts
    active = E if _dense_routing(self, top_k_index) else int(torch.unique(top_k_index).numel())
    w1 = loading.get_weights(self, loading.quantized_names(self)[0])
    per_expert = 2 * sum(loading.get_weights(self, n).shape[1] * loading.get_weights(self, n).shape[2] for n in loading.quantized_names(self))
    if active * per_expert > AUTO_MAX_DEQUANT_BYTES:
        return "fused"
    key = (tuple(w1.shape), _bucket(top_k_index.numel()), round(8 * active / E))
    if key not in _AUTO_CACHE:
        args = (hidden_states.detach(), top_k_index, top_k_weights_stub(top_k_index, hidden_states))
        grad = torch.is_grad_enabled()
        timings = {
            "selective": _time(lambda *a: selective_forward(self, *a), args, grad),
            "fused": _time(lambda *a: fused_forward(self, *a), args, grad),
        }
        _AUTO_CACHE[key] = min(timings, key=timings.get)
        log.info("mxfp4 auto: %s -> %s (%s)", key, _AUTO_CACHE[key], {k: f"{v * 1e3:.2f} ms" for k, v in timings.items()})
    return _AUTO_CACHE[key]


def top_k_weights_stub(top_k_index, hidden_states):
    return torch.full(top_k_index.shape, 1.0 / top_k_index.shape[-1], dtype=hidden_states.dtype, device=hidden_states.device)


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
