"""host plugin ``liger``: liger-kernel's fused RMSNorm, RoPE, SwiGLU/GeGLU, LayerNorm, cross-entropy
and fused linear cross-entropy, with axolotl's key names.

``validate_config`` reads the model's ``config.json`` (never the weights) and refuses any family or
key liger-kernel cannot honour for it, naming the key, the family and what to use instead.
``pre_model_load`` runs liger-kernel's ``apply_liger_kernel_to_<family>`` before the model is built
and checks that every declared patch happened. ``post_model_build`` checks the built model uses
the kernels and points fused linear cross-entropy at the weight a peft-wrapped ``lm_head`` applies.
The patches are process-wide (that is how liger-kernel works) and are undone when training ends.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from pydantic import Field

from host import hookimpl
from host.config import StrictModel
from host.errors import ConfigError, HostError
from host_plugin_liger.families import FAMILIES, KEYS, TARGETED, Family, supported_keys, targets

log = logging.getLogger("host.liger")


class LigerConfig(StrictModel):
    """axolotl's liger keys; unset (null) means off."""

    liger_rope: bool | None = Field(None, description="Fused RoPE kernel (q and k in one launch).")
    liger_rms_norm: bool | None = Field(None, description="Fused RMSNorm kernel for every RMSNorm of the family.")
    liger_glu_activation: bool | None = Field(
        None, description="Fused SwiGLU/GeGLU MLP (dense families) or liger's fused MoE experts (Mixtral, Qwen3-MoE, Qwen3.5-MoE)."
    )
    liger_layer_norm: bool | None = Field(None, description="Fused LayerNorm (families that have LayerNorms: Gemma 3's vision tower).")
    liger_cross_entropy: bool | None = Field(None, description="Liger's cross-entropy kernel on materialised logits.")
    liger_fused_linear_cross_entropy: bool | None = Field(
        None, description="Loss computed chunk by chunk from the last hidden states: the [tokens, vocab] logits never exist."
    )


@hookimpl
def config_model():
    return LigerConfig


def enabled_keys(cfg) -> dict[str, bool]:
    return {k: bool(getattr(cfg, k, None)) for k in KEYS}


def read_model_type(base_model: str) -> str | None:
    """``model_type`` from ``config.json`` of a local model dir or the hub cache; None if neither has it."""
    path = Path(base_model) / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(base_model, "config.json")
        except Exception:  # not a repo id, no cache
            cached = None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None


def check_family(model_type: str | None, on: dict[str, bool], where: str) -> Family | None:
    """The family's table entry, or a ConfigError naming the key, the family and the alternative."""
    keys = [k for k, v in on.items() if v]
    if model_type is None:
        return None
    family = FAMILIES.get(model_type)
    if family is None:
        raise ConfigError(
            f"{where}: {', '.join(keys)}: liger-kernel has no patches for model_type {model_type!r} "
            f"(families supported here: {', '.join(sorted(FAMILIES))}). Set the liger_* keys to false or remove "
            f"liger from plugins."
        )
    for key in keys:
        if key in family.unsupported:
            usable = ", ".join(supported_keys(family))
            raise ConfigError(
                f"{where}: {key}: not available for model_type {model_type!r}: {family.unsupported[key]}. "
                f"Set {key}: false (keys liger-kernel supports for {model_type}: {usable})."
            )
    return family


@hookimpl
def validate_config(cfg):
    on = enabled_keys(cfg)
    if not any(on.values()):
        return [
            "liger: the plugin is enabled but no liger_* key is true, so it patches nothing; set e.g. "
            "liger_fused_linear_cross_entropy: true, or remove liger from plugins."
        ]
    if on["liger_cross_entropy"] and on["liger_fused_linear_cross_entropy"]:
        raise ConfigError(
            "liger_cross_entropy and liger_fused_linear_cross_entropy: set one of them, not both (the fused loss "
            "never materialises the logits that liger_cross_entropy would read). Keep liger_fused_linear_cross_entropy."
        )
    import torch

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(
            f"{', '.join(k for k, v in on.items() if v)}: liger-kernel's kernels are Triton and need a CUDA GPU "
            "(or TRITON_INTERPRET=1 for tests); set the liger_* keys to false on this machine."
        )
    warnings = []
    model_type = read_model_type(cfg.base_model)
    check_family(model_type, on, "liger")
    if model_type is None:
        warnings.append(
            f"liger: cannot read config.json of {cfg.base_model!r} without loading it; the family check runs "
            "when the model config is loaded."
        )
    elif model_type not in TARGETED:
        warnings.append(f"liger: model_type {model_type!r} is supported by liger-kernel but not tested by this plugin.")
    if on["liger_fused_linear_cross_entropy"] and cfg.adapter == "lora" and cfg.lora_dropout and _lm_head_has_lora(cfg):
        raise ConfigError(
            f"lora_dropout: {cfg.lora_dropout} with LoRA on lm_head and liger_fused_linear_cross_entropy: the fused loss "
            "reads lm_head's effective weight W + B·A, which a dropout on lm_head's input cannot be folded into. Set "
            "lora_dropout: 0, or remove lm_head from lora_target_modules."
        )
    return warnings


def _lm_head_has_lora(cfg) -> bool:
    targets_ = cfg.lora_target_modules
    if isinstance(targets_, str):
        return "lm_head" in targets_ and targets_ != "all-linear"
    return any(t == "lm_head" or t.endswith(".lm_head") for t in (targets_ or []))


def _family(cfg) -> tuple[Family | None, str | None]:
    return FAMILIES.get(read_model_type(cfg.base_model) or ""), read_model_type(cfg.base_model)


@hookimpl
def patched_targets(cfg):
    on = enabled_keys(cfg)
    family, _ = _family(cfg)
    if family is None or not any(on.values()):
        return {}
    return targets(family, on)


@hookimpl
def pre_model_load(cfg):
    from host_plugin_liger import patching

    on = enabled_keys(cfg)
    if not any(on.values()):
        return
    model_type = read_model_type(cfg.base_model)
    if model_type is None:  # a hub id not cached yet: its config is small, fetch it now (no weights)
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(cfg.base_model, trust_remote_code=cfg.trust_remote_code).model_type
    family = check_family(model_type, on, "liger")
    patching.restore()  # a previous run in this process that did not reach on_train_end
    changed = patching.apply(family, on)
    missing = [t for t in targets(family, on) if t.startswith(("transformers.", "torch.")) and t not in changed]
    if missing:
        patching.restore()
        raise HostError(
            f"liger: liger-kernel's {family.apply_fn} did not patch {', '.join(missing)} in this transformers version; "
            "refusing to train without the kernels you asked for. Turn those keys off."
        )
    if on["liger_fused_linear_cross_entropy"] and cfg.torch_compile:
        _keep_flce_out_of_compile(patching)
    log.info("liger: %s patched %s", family.apply_fn, ", ".join(sorted(changed)))


def _keep_flce_out_of_compile(patching) -> None:
    """Dynamo must not trace into liger's chunked loss (it launches Triton kernels in a Python loop)."""
    import torch
    from liger_kernel.ops import fused_linear_cross_entropy as ops

    for name in ("fused_linear_cross_entropy_forward", "fused_linear_cross_entropy_backward"):
        patching.wrap(ops, name, torch.compiler.disable(getattr(ops, name)))


def _causal_lm(model):
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner


@hookimpl
def post_model_build(cfg, model):
    from host_plugin_liger import lm_head as lm_head_mod

    on = enabled_keys(cfg)
    if not any(on.values()):
        return
    inner = _causal_lm(model)
    names = {type(m).__name__ for m in inner.modules()}
    liger_classes = {n for n in names if n.startswith("Liger")}
    if on["liger_rms_norm"] and not any("RMSNorm" in n for n in liger_classes):
        raise HostError("liger_rms_norm: the built model has no liger RMSNorm; was it built before the liger plugin ran?")
    if on["liger_glu_activation"] and not (liger_classes - {n for n in liger_classes if "Norm" in n}):
        raise HostError("liger_glu_activation: the built model has no liger MLP/experts module.")
    if on["liger_fused_linear_cross_entropy"]:
        forward = type(inner).forward
        if not getattr(forward, "__module__", "").startswith("liger_kernel."):
            raise HostError(
                f"liger_fused_linear_cross_entropy: {type(inner).__name__}.forward is not liger-kernel's fused loss "
                "forward (the model class was not patched); turn the key off for this model class."
            )
        head = inner.get_output_embeddings()
        kind = lm_head_mod.expose_effective_weight(head)
        if kind != "plain":
            log.info("liger: fused linear cross-entropy reads lm_head's effective weight (%s)", kind)


@hookimpl
def trainer_callbacks(cfg):
    from transformers import TrainerCallback

    class RestoreLiger(TrainerCallback):
        """Undo liger-kernel's process-wide patches when training ends."""

        def on_train_end(self, args, state, control, **kw):
            from host_plugin_liger import patching

            patching.restore()

    return [RestoreLiger()]
