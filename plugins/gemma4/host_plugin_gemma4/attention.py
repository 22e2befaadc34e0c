"""A Gemma 4 text-attention forward that the plugin installs per module (never on the class).

It is transformers' own computation (5.17 and 5.23 agree on it; tests compare outputs bit for bit),
with two switches:

* ``shared_kv_states`` may be absent from the call: it is then read from the side-channel store
  (``shared_kv.py``);
* ``module._gemma4_fused_norm_rope``: q/k RMSNorm + RoPE and the scale-less v RMSNorm run as one
  Triton kernel each (``rms_norm_rope.py``) instead of the eager composition.
"""

from __future__ import annotations

import types
from typing import Any

from host.errors import HostError


def forward(self, hidden_states, position_embeddings, attention_mask, shared_kv_states=None,
            past_key_values=None, **kwargs) -> tuple[Any, Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.gemma4.modeling_gemma4 import apply_rotary_pos_emb, eager_attention_forward

    from host_plugin_gemma4 import shared_kv

    if shared_kv_states is None:
        shared_kv_states = shared_kv.get_store()
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    cos, sin = position_embeddings
    fused = getattr(self, "_gemma4_fused_norm_rope", False)
    if fused:
        from host_plugin_gemma4.rms_norm_rope import fused_rms_norm, fused_rms_norm_rope

        def norm_rope(x, norm):
            return fused_rms_norm_rope(x, norm.weight if norm.with_scale else None, cos, sin, _eps(norm))
    else:
        def norm_rope(x, norm):
            return apply_rotary_pos_emb(norm(x), cos, sin, unsqueeze_dim=2)

    query_states = norm_rope(self.q_proj(hidden_states).view(hidden_shape), self.q_norm).transpose(1, 2)

    if self.is_kv_shared_layer:
        if shared_kv_states is None:
            raise HostError(
                f"gemma4: layer {self.layer_idx} reuses shared K/V but none were passed or stored; "
                "run the whole model forward (not a single layer) or disable gemma4_shared_kv_side_channel."
            )
        key_states, value_states = shared_kv_states[self.layer_type]
        key_states = key_states.to(query_states.device)
        value_states = value_states.to(query_states.device)
    else:
        key_states = self.k_proj(hidden_states).view(hidden_shape)
        value_states = self.v_proj(hidden_states).view(hidden_shape) if self.v_proj is not None else key_states
        key_states = norm_rope(key_states, self.k_norm).transpose(1, 2)
        if fused:
            value_states = fused_rms_norm(value_states, None, _eps(self.v_norm))
        else:
            value_states = self.v_norm(value_states)
        value_states = value_states.transpose(1, 2)
        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

    if self.store_full_length_kv:
        if shared_kv_states is None:
            raise HostError(f"gemma4: layer {self.layer_idx} stores shared K/V but has no container to store them in.")
        shared_kv_states[self.layer_type] = key_states, value_states

    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    attn_output, attn_weights = attention_interface(
        self,
        query_states,
        key_states,
        value_states,
        attention_mask,
        dropout=self.attention_dropout if self.training else 0.0,
        scaling=self.scaling,
        sliding_window=self.sliding_window,
        **kwargs,
    )
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    attn_output = self.o_proj(attn_output)
    return attn_output, attn_weights


def patch(module, fused: bool | None = None) -> None:
    """Give ``module`` (a Gemma4TextAttention) this forward; ``fused`` sets the kernel switch."""
    module.forward = types.MethodType(forward, module)
    if fused is not None:
        module._gemma4_fused_norm_rope = bool(fused)


def unpatch(module) -> None:
    module.__dict__.pop("forward", None)
    module.__dict__.pop("_gemma4_fused_norm_rope", None)


def _eps(norm) -> float:
    """The RMSNorm's epsilon: ``eps`` up to transformers 5.2x, ``variance_epsilon`` in later releases."""
    eps = getattr(norm, "eps", None)
    return norm.variance_epsilon if eps is None else eps
