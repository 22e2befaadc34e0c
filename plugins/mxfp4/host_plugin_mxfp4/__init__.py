"""host plugin ``mxfp4``: LoRA training on MoE models whose expert weights stay 4-bit.

Expert parameters are held as packed FP4 (MXFP4, or NVFP4) in :class:`formats.FP4Weights`
containers, quantized layer by layer while the model loads (or loaded straight from gpt-oss-format
``*_blocks``/``*_scales`` checkpoints); LoRA adapters (peft ``target_parameters``) train on top
through the ``scattermoe`` plugin's routing, LoRA helpers and kernels. See README.md.
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import Field, field_validator

from host import hookimpl
from host.config import StrictModel
from host.errors import ConfigError

REQUIRES = ["scattermoe"]

log = logging.getLogger("host.mxfp4")


class Mxfp4Config(StrictModel):
    """Config keys of the mxfp4 plugin."""

    quantize_moe_experts: Literal["mxfp4", "nvfp4"] | None = Field(
        None,
        description="Keep MoE expert weights in this 4-bit format (quantized layer by layer at load; gpt-oss "
        "MXFP4 checkpoints load packed as they are). None: leave the experts alone.",
    )
    mxfp4_strategy: Literal["auto", "selective", "fused"] = Field(
        "auto",
        description="auto: selective whenever its dequantized experts fit 4 GiB per layer, else fused (a rule "
        "measured on an H200/H100: fused was 4.5-6.6x slower at every benchmarked shape); selective: dequantize the routed experts, then scattermoe's bf16 kernels; "
        "fused: dequantize inside the Triton K loop (lowest memory: no bf16 weight tile is ever written).",
    )

    @field_validator("quantize_moe_experts", mode="before")
    @classmethod
    def _axolotl_bool(cls, value):
        """axolotl's boolean form means bitsandbytes-quantised experts: that is the qlora plugin's."""
        if value is True:
            raise ValueError(
                "true is axolotl's bitsandbytes expert quantisation, which the qlora plugin provides (enable it "
                "instead of mxfp4); with mxfp4, set quantize_moe_experts: mxfp4 or nvfp4"
            )
        return None if value is False else value


@hookimpl
def config_model():
    return Mxfp4Config


@hookimpl
def validate_config(cfg):
    if cfg.quantize_moe_experts is None:
        return ["mxfp4: quantize_moe_experts is not set, so the plugin does nothing (set it to mxfp4 or nvfp4)."]
    if cfg.adapter != "lora":
        raise ConfigError(
            f"quantize_moe_experts: {cfg.quantize_moe_experts} freezes the experts in 4 bits, so they cannot be fully "
            f"fine-tuned (adapter is {cfg.adapter!r}). Set adapter: lora (with lora_target_parameters: "
            "[experts.gate_up_proj, experts.down_proj] to train LoRA on the experts)."
        )
    if cfg.fsdp_enabled:
        raise ConfigError(
            f"quantize_moe_experts: {cfg.quantize_moe_experts} cannot be combined with FSDP (fsdp / fsdp_config): "
            "FSDP would shard the packed 4-bit expert blocks and their scales as plain tensors, and the FP4 kernels "
            "would dequantize a local shard as if it were the whole expert. Remove fsdp/fsdp_config and launch the "
            "same config with torchrun for DDP: 4-bit experts are 3.8x smaller than bf16, so a model that needs FSDP "
            "in bf16 usually fits on each GPU."
        )
    warnings = []
    targets = cfg.lora_target_parameters or []
    if not any(t.endswith(("gate_up_proj", "down_proj", "up_proj")) for t in targets):
        warnings.append(
            "mxfp4: lora_target_parameters names no expert parameter; the 4-bit experts stay frozen without LoRA "
            "(add experts.gate_up_proj / experts.down_proj to train them)."
        )
    if cfg.mxfp4_strategy != "fused" and not cfg.gradient_checkpointing:
        warnings.append(
            f"mxfp4: mxfp4_strategy {cfg.mxfp4_strategy} trains on decoded experts (in the training dtype), which "
            "each layer keeps from its forward until its backward, so without gradient checkpointing the step's peak "
            "holds every layer's decoded experts, as bf16 experts would (Qwen3-30B-A3B: ~1.1 GiB per layer, 48 "
            "layers). Set gradient_checkpointing: true (one layer's at a time) or mxfp4_strategy: fused (none, slower)."
        )
    return warnings


@hookimpl
def pre_model_load(cfg):
    if cfg.quantize_moe_experts is None:
        return
    from host_plugin_mxfp4 import experts, loading

    experts.SETTINGS["strategy"] = cfg.mxfp4_strategy
    loading.begin(cfg.quantize_moe_experts, source=cfg.base_model)


@hookimpl
def post_model_build(cfg, model):
    if cfg.quantize_moe_experts is None:
        return
    from host_plugin_mxfp4 import experts, loading

    plan = loading.end()
    found = loading.finalize(model)
    if not found:
        raise ConfigError(
            f"quantize_moe_experts: {cfg.base_model!r} has no MoE experts module with 3-D gate_up_proj/down_proj "
            "parameters, so nothing was quantized. Remove quantize_moe_experts (or the mxfp4 plugin) for this model."
        )
    if plan is not None:
        loading._LAST_EVENTS = list(plan.events)
        loading._LAST_PLAN_COUNTS = (plan.quantized, plan.prequantized)
        peak = max((b for _, b in plan.events), default=0)
        log.info(
            "mxfp4: %d experts modules in %s (%d tensors quantized at load, %d loaded packed); peak high-precision "
            "expert bytes during load: %.1f MiB",
            found, cfg.quantize_moe_experts, plan.quantized, plan.prequantized, peak / 2**20,
        )
    if _peft_inference_mode(model):
        # `host merge-lora`: peft loaded the adapter for inference and will fold it into the base.
        # Give it real (dequantized) expert tensors so merge_and_unload writes a valid bf16 model.
        for m in model.modules():
            if loading.is_quantized(m):
                loading.dequantize_module(m)
        _forget_mxfp4_checkpoint_format(model)
        log.info("mxfp4: experts dequantized for merging; the merged model is written in the training dtype")
        return
    experts.install(model)


def _forget_mxfp4_checkpoint_format(model) -> None:
    """After dequantizing: save as a plain model. Drop the gpt-oss ``quantization_config`` and the
    loader's MXFP4 weight conversion, whose reverse would write dense tensors under ``*_blocks``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for c in {id(x): x for x in (getattr(model, "config", None), getattr(base, "config", None)) if x is not None}.values():
        if getattr(c, "quantization_config", None) is not None:
            del c.quantization_config
    convs = getattr(base, "_weight_conversions", None)
    if convs:
        def is_mxfp4(conv):
            ops = list(getattr(conv, "operations", []) or []) + [getattr(conv, "quantization_operation", None)]
            return any(op is not None and "Mxfp4" in type(op).__name__ for op in ops) or any(
                str(p).endswith(("_blocks", "_scales")) for p in getattr(conv, "source_patterns", []) or []
            )

        base._weight_conversions = [c for c in convs if not is_mxfp4(c)]
    if getattr(base, "hf_quantizer", None) is not None:
        base.hf_quantizer = None
    if getattr(base, "is_quantized", False):
        try:
            base.is_quantized = False
        except AttributeError:  # read-only property on some versions
            pass


def _peft_inference_mode(model) -> bool:
    peft_config = getattr(model, "peft_config", None)
    if not peft_config:
        return False
    return all(getattr(c, "inference_mode", False) for c in peft_config.values())
