"""host plugin ``gemma4``: Gemma 4 training fixes and a fused RMSNorm+RoPE Triton kernel.

Acts only on Gemma 4 models (``model_type`` gemma4 / gemma4_text); any other model passes through
``post_model_build`` untouched. Each fix is gated on the installed transformers actually having the
problem (see README, "Which fix applies where").
"""

from __future__ import annotations

import logging
import os
from typing import Literal

from pydantic import Field, model_validator

from host import hookimpl
from host.config import StrictModel
from host.errors import ConfigError

log = logging.getLogger("host.gemma4")

ATTN_IMPLS = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")


class Gemma4Config(StrictModel):
    gemma4_attn_implementation: str | None = Field(
        None, description="Attention implementation to set on the Gemma 4 model after load (default: as loaded, sdpa)."
    )
    gemma4_hybrid_attention: bool = Field(
        False, description="Run global (full-attention, head_dim 512) layers on SDPA; sliding layers keep the configured implementation."
    )
    gemma4_fused_norm_rope: bool = Field(
        False, description="Fused RMSNorm+RoPE Triton kernel for q/k (and the scale-less v norm) in every Gemma 4 attention layer."
    )
    gemma4_shared_kv_side_channel: bool | Literal["auto"] = Field(
        "auto", description="Route shared K/V through a module-level store under gradient checkpointing (auto: only on transformers < 5.17, where the leak was not measured absent; true: whenever gradient_checkpointing is on)."
    )
    gemma4_text_only_mm_token_type_ids: bool | Literal["auto"] = Field(
        "auto", description="Add zero mm_token_type_ids to text-only batches (auto: only if this transformers requires them)."
    )
    gemma4_fix_logged_loss: bool = Field(
        True, description="If the model ignores num_items_in_batch, make the Trainer normalise the logged loss (probed, no-op otherwise)."
    )
    gemma4_packed_sequence_masks: bool = Field(
        True, description="Per-document causal masks when position_ids restart inside a row (packed sequences)."
    )
    gemma4_hybrid_attn_impl: bool | None = Field(
        None, description="axolotl's name for gemma4_hybrid_attention (true turns it on); an axolotl config "
        "setting it turns this plugin on by itself."
    )

    @model_validator(mode="after")
    def _axolotl_hybrid_name(self):
        if self.gemma4_hybrid_attn_impl:
            self.gemma4_hybrid_attention = True
        return self


@hookimpl
def config_model():
    return Gemma4Config


@hookimpl
def validate_config(cfg):
    warnings = []
    impl = cfg.gemma4_attn_implementation
    if impl is not None and impl not in ATTN_IMPLS and not impl.startswith("kernels-community/"):
        raise ConfigError(
            f"gemma4_attn_implementation: unknown implementation {impl!r}; use one of {', '.join(ATTN_IMPLS)}."
        )
    if cfg.gemma4_hybrid_attention and impl in (None, "sdpa"):
        warnings.append(
            "gemma4_hybrid_attention: the sliding layers already use sdpa (gemma4_attn_implementation is "
            f"{impl!r}), so hybrid attention changes nothing; set gemma4_attn_implementation: flash_attention_2 "
            "(or flex_attention)."
        )
    if cfg.gemma4_fused_norm_rope:
        import torch

        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError(
                "gemma4_fused_norm_rope: the fused kernel is Triton and needs a CUDA GPU (or TRITON_INTERPRET=1 "
                "for tests); set gemma4_fused_norm_rope: false on this machine."
            )
        try:
            import triton  # noqa: F401
        except ImportError:
            raise ConfigError("gemma4_fused_norm_rope: triton is not installed; pip install triton or set it to false.") from None
    fsdp_ac = getattr(cfg, "fsdp_enabled", False) and cfg.fsdp_config is not None and cfg.fsdp_config.activation_checkpointing
    if fsdp_ac and cfg.gemma4_shared_kv_side_channel is not False:
        from host_plugin_gemma4 import shared_kv

        why = (
            "under fsdp_config.activation_checkpointing, accelerate wraps each decoder layer in torch's "
            "checkpoint_wrapper, which stores the shared K/V keyword argument before the plugin can route it"
        )
        if cfg.gemma4_shared_kv_side_channel is True:
            raise ConfigError(
                f"gemma4_shared_kv_side_channel: true cannot act here: {why}. On transformers >= 5.17 the leak it "
                "prevents was measured absent (also under FSDP2 + activation checkpointing): set it to auto."
            )
        if shared_kv.version_affected():
            warnings.append(
                f"gemma4_shared_kv_side_channel: not installed: {why}; this transformers version may keep each "
                "step's shared K/V alive. Upgrade transformers to >= 5.17 (leak measured absent)."
            )
    if cfg.gemma4_shared_kv_side_channel is True and not cfg.gradient_checkpointing and not fsdp_ac:
        warnings.append(
            "gemma4_shared_kv_side_channel: true without gradient_checkpointing: the side channel only "
            "matters for checkpointed training and is not installed."
        )
    return warnings


@hookimpl
def patched_targets(cfg):
    """The fused kernel takes over the q/k/v RMSNorms and RoPE of every Gemma 4 attention layer."""
    if not cfg.gemma4_fused_norm_rope:
        return {}
    mod = "transformers.models.gemma4.modeling_gemma4"
    return {f"{mod}.{name}": "gemma4_fused_norm_rope" for name in ("Gemma4RMSNorm", "apply_rotary_pos_emb", "Gemma4TextAttention.forward")}


def side_channel_wanted(cfg) -> bool:
    """Only for checkpointed training; ``auto`` only where the leak was not measured absent."""
    from host_plugin_gemma4 import shared_kv

    if not cfg.gradient_checkpointing or cfg.gemma4_shared_kv_side_channel is False:
        return False
    return cfg.gemma4_shared_kv_side_channel is True or shared_kv.version_affected()


@hookimpl
def post_model_build(cfg, model):
    from host_plugin_gemma4 import attention, hybrid, inputs, loss, model_utils, shared_kv

    if not model_utils.is_gemma4(model):
        log.info("gemma4: model_type %r is not Gemma 4; plugin inactive", model_utils.model_type(model))
        return
    base = model_utils.unwrap(model)
    if cfg.gemma4_attn_implementation:
        try:
            base.set_attn_implementation(cfg.gemma4_attn_implementation)
        except (ImportError, ValueError) as exc:
            raise ConfigError(
                f"gemma4_attn_implementation: {cfg.gemma4_attn_implementation!r} cannot be used here: "
                f"{str(exc).splitlines()[0]} Install it or choose sdpa / flex_attention / eager."
            ) from None
    if cfg.gemma4_hybrid_attention:
        hybrid.apply(base)
    if cfg.gemma4_fused_norm_rope:
        for attn in model_utils.attention_modules(base):
            attention.patch(attn, fused=True)
    if side_channel_wanted(cfg):
        shared_kv.install(base)
    mm = cfg.gemma4_text_only_mm_token_type_ids
    need_mm = inputs.needs_mm_token_type_ids() if mm == "auto" else bool(mm)
    if need_mm and model_utils.model_type(model) != "gemma4":
        need_mm = False  # text-only Gemma4ForCausalLM has no mm_token_type_ids input
    inputs.install(base, mm_token_type_ids=need_mm, packing=cfg.gemma4_packed_sequence_masks)
    if cfg.gemma4_fix_logged_loss:
        loss.fix(base)


@hookimpl
def trainer_callbacks(cfg):
    from transformers import TrainerCallback

    class ReleaseSharedKV(TrainerCallback):
        """Drop the side channel's last K/V container when training ends."""

        def on_train_end(self, args, state, control, **kw):
            from host_plugin_gemma4 import shared_kv

            shared_kv.set_store(None)

    return [ReleaseSharedKV()]
