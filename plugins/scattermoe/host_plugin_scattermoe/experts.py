"""The ``scattermoe`` experts implementation for transformers' ``ExpertsInterface``.

``experts_forward(self, hidden_states, top_k_index, top_k_weights)`` replaces the forward of any
``@use_experts_implementation`` experts module (Qwen3-MoE, Qwen3.5-MoE, OLMoE, Mixtral, Gemma 4,
gpt-oss, ...): it reads the module's layout flags (``is_transposed``, ``has_bias``, ``has_gate``,
``has_post_expert_norm``) and its own ``_apply_gate`` / ``act_fn``, so every family's activation
(SiLU/GELU GLU, gpt-oss's interleaved clamped sigmoid-GLU) is the model's own code.

``register()`` adds it to ``transformers.integrations.moe.ExpertsInterface`` under ``"scattermoe"``
(the same call works on transformers 5.17 and 5.23).
"""

from __future__ import annotations

import functools

import torch

from host_plugin_scattermoe import fused, graphs, ops
from host_plugin_scattermoe.lora import transpose_for_kernel, weight_and_lora
from host_plugin_scattermoe.routing import sort_tokens

NAME = "scattermoe"


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    if graphs.applies(self, hidden_states):
        return graphs.run(self, _experts_eager, hidden_states, top_k_index, top_k_weights)
    return _experts_eager(self, hidden_states, top_k_index, top_k_weights)


def _experts_eager(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    E = self.num_experts
    k = top_k_index.shape[-1]
    transposed = bool(getattr(self, "is_transposed", False))
    has_gate = bool(getattr(self, "has_gate", True))
    has_bias = bool(getattr(self, "has_bias", False))
    up_name = "gate_up_proj" if has_gate else "up_proj"
    W1, l1 = weight_and_lora(self, up_name)
    W2, l2 = weight_and_lora(self, "down_proj")
    b1 = getattr(self, f"{up_name}_bias") if has_bias else None
    b2 = getattr(self, "down_proj_bias") if has_bias else None
    _require_unsharded(W1, W2, *(l1[:2] if l1 is not None else ()), *(l2[:2] if l2 is not None else ()))
    W1k, W2k = transpose_for_kernel(W1, transposed), transpose_for_kernel(W2, transposed)

    sei, ssi, offs = sort_tokens(top_k_index, E)
    x = hidden_states if hidden_states.dtype == W1.dtype else hidden_states.to(W1.dtype)
    merged = merged_kwargs(self, x, b1, b2)
    if merged is not None:
        # the GLU MLP (SiLU or gpt-oss's clamped gate, biases or not) as one autograd node: same kernels, fewer nodes
        # (host time; ops.glu_experts)
        out = ops.glu_experts(x, W1k, W2k, k, sei, ssi, offs, l1, l2, top_k_weights, **merged)
        return out.to(hidden_states.dtype)
    A1, B1, s1 = l1 if l1 is not None else (None, None, 0.0)
    A2, B2, s2 = l2 if l2 is not None else (None, None, 0.0)
    h = ops.scattered_experts(x, W1k, k, sei, ssi, offs, A1, B1, s1, b1, grouped_in=False, grouped_out=True)
    if fused.applies(self, b2):
        # GLU + down projection + combine as one node: its backward is one GEMM launch (see fused.py)
        out = fused.glu_down_combine(h, W2k, k, sei, ssi, offs, A2, B2, s2, top_k_weights)
        return out.to(hidden_states.dtype)
    h = apply_gate(self, h)
    y = ops.scattered_experts(h, W2k, 1, sei, ssi, offs, A2, B2, s2, b2, grouped_in=True, grouped_out=False)
    if getattr(self, "has_post_expert_norm", False):
        y = self.post_expert_norm(y)
    # Routing weights keep their dtype (fp32 from the routers): the gradient to the router is
    # accumulated and returned in fp32, as transformers' grouped_mm path does by type promotion.
    out = ops.combine(y, top_k_weights)
    return out.to(hidden_states.dtype)


def merged_kwargs(module, x: torch.Tensor, b1: torch.Tensor | None = None, b2: torch.Tensor | None = None):
    """The one dispatch of the merged experts node, for this plugin's experts forward and for plugins that build on it
    (mxfp4): ``None`` when the call keeps the separate nodes (see :func:`_merged_applies`), else the keyword arguments
    of ``ops.glu_experts`` for this module: ``{"b1": b1, "b2": b2, "clamp": None}`` for transformers' default SiLU
    gate, ``clamp=(alpha, limit)`` for gpt-oss's clamped sigmoid-GLU. ``x`` the experts' input in the weights'
    dtype, ``b1``/``b2`` the up / down projections' biases (``[E, 2I]`` / ``[E, H]``) or None."""
    if not _merged_applies(module, x):
        return None
    clamp = None if _is_default_silu_gate(module) else (float(module.alpha), float(module.limit))
    return {"b1": b1, "b2": b2, "clamp": clamp}


def _merged_applies(module, x: torch.Tensor) -> bool:
    """The experts call runs as one autograd node (``ops.glu_experts``): ``scattermoe_merged`` on (env
    ``SCATTERMOE_MERGED=0`` turns it off), the Triton path, fused gates on, a gate with a fused kernel (transformers'
    default SiLU gate, or gpt-oss's clamped sigmoid-GLU; with or without the projections' biases), no post-expert
    norm, not the opt-in fused tail; no saved-tensor hooks (non-reentrant checkpointing, offloading: the merged node
    holds its activations on ctx, out of the hooks' reach); and no CUDA graph capture but graphs.py's (whose replays
    the merged node's captured forward serves by keeping its activations; another capture's handling of them is
    unknown). Everything else keeps the separate nodes."""
    S = ops.SETTINGS
    return (
        S.get("merged", True)
        and S.get("fused_gates", True)
        and not S.get("fused_tail", False)
        and not getattr(module, "has_post_expert_norm", False)
        and bool(getattr(module, "has_gate", True))
        and ops._use_triton(x, None)
        and (_is_default_silu_gate(module) or _is_clamped_glu_gate(module))
        and (graphs.capturing() or not (x.is_cuda and torch.cuda.is_current_stream_capturing()))
        and not graphs._saved_tensor_hooks_active()
    )


@functools.lru_cache(maxsize=None)
def _dtensor_cls():
    """``DTensor``, or None on a torch built without distributed (imported once: this runs every experts call)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def _require_unsharded(*tensors: torch.Tensor) -> None:
    """The kernels index whole expert weights; a DTensor here would be a local shard used as if it
    were the full weight. FSDP2 all-gathers a unit's parameters before its forward, so this only
    happens when the experts run outside their FSDP unit."""
    DTensor = _dtensor_cls()
    if DTensor is None:  # torch built without distributed
        return
    if any(isinstance(t, DTensor) for t in tensors):
        raise RuntimeError(
            "scattermoe: an expert weight or its LoRA factor is a sharded DTensor in forward. Shard whole decoder "
            "layers with FSDP2 (fsdp_config.transformer_layer_cls_to_wrap: [<DecoderLayer class>]) so their "
            "parameters are all-gathered before the experts run; never wrap or shard the experts module on its own."
        )


def apply_gate(module, h: torch.Tensor) -> torch.Tensor:
    """The module's activation on the up projection's output: a fused Triton kernel for transformers' default
    SiLU gate and for gpt-oss's clamped sigmoid-GLU (checked numerically against the module's own
    ``_apply_gate``), the module's own code otherwise."""
    if not bool(getattr(module, "has_gate", True)):
        return module.act_fn(h)
    if not ops.SETTINGS.get("fused_gates", True):
        return module._apply_gate(h)
    if _is_default_silu_gate(module):
        return ops.silu_glu(h)
    if _is_clamped_glu_gate(module):
        return ops.clamped_glu(h, float(module.alpha), float(module.limit))
    return module._apply_gate(h)


_CLAMPED_GLU_CLASSES: dict = {}


def _is_clamped_glu_gate(module) -> bool:
    """The module's ``_apply_gate`` is gpt-oss's interleaved clamped sigmoid-GLU with its ``alpha``/``limit``:
    decided once per class by running it on values spanning the clamp (not by name, so a changed gate in a
    later transformers release falls back to the module's own code). Inherited gates count: plugins subclass
    the experts module (mxfp4's ``FP4GptOssExperts``), and a check of the class's own ``__dict__`` sent those to
    the torch gate and the separate nodes."""
    from host_plugin_scattermoe import reference

    cls = type(module)
    if not (hasattr(module, "alpha") and hasattr(module, "limit") and callable(getattr(module, "_apply_gate", None))):
        return False
    key = (cls, float(module.alpha), float(module.limit))
    ok = _CLAMPED_GLU_CLASSES.get(key)
    if ok is None:
        lim = float(module.limit)
        probe = torch.linspace(-2 * lim, 2 * lim, 64, dtype=torch.float64).reshape(4, 16)
        probe = torch.cat([probe, probe.flip(1)], 0)
        try:
            with torch.no_grad():
                got = module._apply_gate(probe)
            want = reference.gpt_oss_glu(probe, float(module.alpha), lim)
            ok = got.shape == want.shape and torch.allclose(got, want, rtol=1e-9, atol=1e-12)
        except Exception:  # noqa: BLE001 - any other gate: keep the module's own
            ok = False
        _CLAMPED_GLU_CLASSES[key] = ok
    return ok


def _is_default_silu_gate(module) -> bool:
    """The module uses transformers' default ``act(gate) * up`` with SiLU (fused kernel applies)."""
    from transformers.integrations.moe import _default_apply_gate

    if getattr(type(module), "_apply_gate", None) is not _default_apply_gate:
        return False
    act = getattr(module, "act_fn", None)
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


def register() -> None:
    """Register ``"scattermoe"`` with transformers' experts registry (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    ExpertsInterface.register(NAME, experts_forward)
    if NAME not in ALL_EXPERTS_FUNCTIONS:  # pragma: no cover - defensive for API drift
        ALL_EXPERTS_FUNCTIONS[NAME] = experts_forward
