"""host plugin ``qlora``: LoRA on a base model quantised by bitsandbytes while it loads.

``adapter: qlora`` + ``load_in_4bit`` (NF4/FP4 ``Linear4bit``) or ``adapter: lora`` + ``load_in_8bit``
(``Linear8bitLt``), with axolotl's key names and defaults. The plugin hands transformers a
``BitsAndBytesConfig`` (``model_init_kwargs``), prepares the quantised model for peft
(``post_model_load``), and optionally quantises 3-D MoE expert parameters, which bitsandbytes'
``nn.Linear`` replacement leaves alone (``quantize_moe_experts``). Under FSDP the packed 4-bit data is stored in the dtype FSDP gathers
parameters in, so FSDP shards it like any other weight (``fsdp.py``). See README.md.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from host import hookimpl
from host.config import StrictModel
from host.errors import ConfigError

log = logging.getLogger("host.qlora")

#: BitsAndBytesConfig arguments ``bnb_config_kwargs`` may set (axolotl passes the dict through).
BNB_ARGS = (
    "load_in_8bit", "load_in_4bit", "llm_int8_threshold", "llm_int8_skip_modules",
    "llm_int8_enable_fp32_cpu_offload", "llm_int8_has_fp16_weight", "bnb_4bit_compute_dtype",
    "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_quant_storage",
)
DTYPES = Literal["bfloat16", "float16", "float32"]


class QloraConfig(StrictModel):
    """Config keys of the qlora plugin (axolotl's names, meanings and defaults)."""

    load_in_4bit: bool = Field(False, description="Quantise the base model's linear layers to 4 bits (needs adapter: qlora).")
    load_in_8bit: bool = Field(False, description="Quantise the base model's linear layers to int8 (needs adapter: lora).")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_compute_dtype: DTYPES | None = Field(
        None, description="dtype of the dequantised weights in the matmul; unset: the training dtype (bf16 or fp32)."
    )
    bnb_4bit_use_double_quant: bool = Field(True, description="Quantise the per-block scales too (~0.4 bit/weight less).")
    bnb_4bit_quant_storage: DTYPES | Literal["uint8"] | None = Field(
        None,
        description="dtype the packed 4-bit data is stored as (matters only for sharding; uint8 is bnb's own). "
        "Unset: bfloat16 (axolotl's), or under FSDP the dtype FSDP gathers parameters in.",
    )
    bnb_config_kwargs: dict[str, Any] | None = Field(
        None, description="axolotl's overrides passed to BitsAndBytesConfig (keys: " + ", ".join(BNB_ARGS) + ")."
    )
    quantize_moe_experts: bool = Field(
        False,
        description="Also quantise 3-D MoE expert parameters to 4 bits (bitsandbytes parametrization, same "
        "bnb_4bit_quant_type). Needs adapter: qlora with load_in_4bit.",
    )


@hookimpl
def config_model():
    return QloraConfig


@hookimpl
def adapter_kinds():
    return ["qlora"]


@hookimpl
def validate_config(cfg):
    quantized = cfg.load_in_4bit or cfg.load_in_8bit
    extra = cfg.bnb_config_kwargs or {}
    unknown = sorted(set(extra) - set(BNB_ARGS))
    if unknown:
        raise ConfigError(
            f"bnb_config_kwargs: unknown BitsAndBytesConfig argument(s) {', '.join(unknown)}; known: {', '.join(BNB_ARGS)}."
        )
    twice = sorted(k for k in extra if k in QloraConfig.model_fields and k in cfg.model_fields_set)
    if twice:
        raise ConfigError(f"bnb_config_kwargs: {', '.join(twice)} also set as top-level key(s); set each once.")
    if cfg.load_in_4bit and cfg.load_in_8bit:
        raise ConfigError("load_in_4bit/load_in_8bit: set one of them, not both.")
    if quantized and cfg.adapter is None:
        raise ConfigError(
            "load_in_4bit/load_in_8bit: a quantised base model can only be trained through an adapter; set "
            "adapter: qlora (4-bit) or adapter: lora (8-bit), or turn the quantisation off for full fine-tuning."
        )
    if cfg.adapter == "qlora" and cfg.load_in_8bit:
        raise ConfigError("adapter: qlora is 4-bit; for an int8 base set adapter: lora with load_in_8bit: true.")
    if cfg.adapter == "qlora" and not cfg.load_in_4bit:
        raise ConfigError("adapter: qlora needs load_in_4bit: true (the 4-bit base is what makes it QLoRA).")
    if cfg.quantize_moe_experts and not (cfg.adapter == "qlora" and cfg.load_in_4bit):
        raise ConfigError(
            "quantize_moe_experts: true quantises the experts with bitsandbytes' 4-bit parametrization (it has no "
            "int8 one), so it needs adapter: qlora with load_in_4bit: true. For MXFP4/NVFP4 experts use the mxfp4 "
            "plugin's quantize_moe_experts: mxfp4 instead."
        )
    if quantized and cfg.fsdp_enabled:
        from host_plugin_qlora import fsdp

        fsdp.check(cfg)
    warnings = []
    if cfg.adapter == "lora" and cfg.load_in_4bit:
        warnings.append(
            "load_in_4bit: with adapter: lora the base is not quantised (axolotl quantises to 4 bits only for "
            "adapter: qlora); it loads in the training dtype. Set adapter: qlora for a 4-bit base."
        )
    if not quantized:
        warnings.append("qlora: neither load_in_4bit nor load_in_8bit is set, so the plugin does nothing.")
    experts = _expert_count(cfg.base_model)
    if quantized and experts and not cfg.quantize_moe_experts:
        warnings.append(
            f"qlora: {cfg.base_model} is a MoE model ({experts} experts per layer); bitsandbytes quantises nn.Linear "
            "layers only, so its 3-D expert parameters stay in the training dtype (LoRA on them through "
            "lora_target_parameters still trains). Set quantize_moe_experts: true to quantise them as well."
        )
    return warnings


def _expert_count(base_model: str) -> int | None:
    """Experts per layer from a local ``config.json`` (no transformers import at validation)."""
    path = Path(base_model) / "config.json"
    if not path.is_file():
        return None
    try:
        conf = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    conf = conf.get("text_config", conf) if isinstance(conf.get("text_config"), dict) else conf
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if isinstance(conf.get(key), int) and conf[key] > 1:
            return conf[key]
    return None


def _training_dtype(cfg) -> str:
    from host.model import use_bf16

    return "bfloat16" if use_bf16(cfg) else "float32"


def quant_storage(cfg) -> str:
    """``bnb_4bit_quant_storage`` for this run: the key, or bfloat16 (axolotl's), or under FSDP the
    dtype FSDP gathers parameters in (a packed weight stored otherwise would be cast, i.e. destroyed)."""
    if cfg.fsdp_enabled:
        from host_plugin_qlora import fsdp

        return fsdp.storage_dtype(cfg)
    return cfg.bnb_4bit_quant_storage or "bfloat16"


def bnb_config(cfg):
    """The ``BitsAndBytesConfig`` for this run (axolotl's defaults, then ``bnb_config_kwargs``)."""
    import torch
    from transformers import BitsAndBytesConfig

    if cfg.load_in_8bit:
        args: dict[str, Any] = {"load_in_8bit": True}
    else:
        args = {
            "load_in_4bit": True,
            "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False,
            "bnb_4bit_compute_dtype": cfg.bnb_4bit_compute_dtype or _training_dtype(cfg),
            "bnb_4bit_use_double_quant": cfg.bnb_4bit_use_double_quant,
            "bnb_4bit_quant_type": cfg.bnb_4bit_quant_type,
            "bnb_4bit_quant_storage": quant_storage(cfg),
        }
    args.update(cfg.bnb_config_kwargs or {})
    for key in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
        if isinstance(args.get(key), str):
            args[key] = getattr(torch, args[key])
    return BitsAndBytesConfig(**args)


def _device_map() -> dict[str, Any] | None:
    """bitsandbytes quantises as the weights reach their device, and the Trainer never moves a
    quantised model: load it straight onto this process's GPU (``LOCAL_RANK`` under torchrun)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return {"": int(os.environ.get("LOCAL_RANK", "0"))}


@hookimpl
def model_init_kwargs(cfg, purpose):
    if not (cfg.load_in_4bit or cfg.load_in_8bit) or cfg.adapter is None:
        return None
    if cfg.adapter == "lora" and not cfg.load_in_8bit:
        return None  # axolotl: 4-bit only with adapter: qlora (validate_config warned)
    if purpose == "merge":
        if cfg.quantize_moe_experts and cfg.lora_target_parameters:
            raise ConfigError(
                "quantize_moe_experts: merge-lora of LoRA trained on 4-bit experts is not supported: peft nests the "
                "expert LoRA wrappers in another order on quantised experts than on the dense base, so the saved "
                "adapter would not load onto it. Use the adapter unmerged (PeftModel on the base model)."
            )
        # merge-lora folds LoRA into dense weights: load the base unquantised, as axolotl does
        return None
    kwargs = {"quantization_config": bnb_config(cfg)}
    device_map = _device_map()
    if device_map is not None:
        kwargs["device_map"] = device_map
    return kwargs


@hookimpl
def post_model_load(cfg, model):
    """Deal with the MoE experts bitsandbytes skipped in a quantised base.

    peft's ``prepare_model_for_kbit_training`` is deliberately not called: it upcasts every
    unquantised weight to fp32, which only matters for fp16 weights, and the host loads them in
    bf16 or fp32. In a bf16 run it would double the embeddings' and lm_head's memory and turn the
    norms' outputs fp32 (axolotl casts them back for bf16). Freezing the base and input gradients
    for gradient checkpointing are the host's adapter step.
    """
    if not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
        return  # not quantised by this plugin: off, 4-bit with adapter: lora (warned), or merge-lora's dense base
    from host_plugin_qlora import experts, fsdp

    if cfg.fsdp_enabled:
        fsdp.keep_packed_layout(model)

    if cfg.quantize_moe_experts:
        n, gib = experts.quantize_experts(model, quant_type=cfg.bnb_4bit_quant_type,
                                          double_quant=cfg.bnb_4bit_use_double_quant, storage=quant_storage(cfg))
        if not n:
            raise ConfigError(
                f"quantize_moe_experts: {cfg.base_model!r} has no 3-D MoE expert parameters; remove quantize_moe_experts."
            )
        log.info("qlora: quantised %d MoE expert parameters to 4 bits (%.2f GiB before)", n, gib)
        experts.plain_state_dict_keys(model)  # so FSDP2 can save (see its docstring)
        if cfg.lora_target_parameters:
            # the host builds LoraConfig from this key right after this hook
            cfg.lora_target_parameters = experts.expand_targets(model, cfg.lora_target_parameters)
        return
    n, gib = experts.dense_expert_params(model)
    if n:
        log.warning(
            "qlora: %d 3-D MoE expert parameters (%.2f GiB) stay in %s: bitsandbytes quantises nn.Linear only "
            "(set quantize_moe_experts: true to quantise them too).", n, gib, _training_dtype(cfg),
        )


@hookimpl
def patched_targets(cfg):
    """With 4-bit experts, peft's expert LoRA wrapper gets its own parametrization removal (see
    ``experts.fix_lora_proxy_removal``)."""
    if cfg.quantize_moe_experts and cfg.load_in_4bit:
        return {"peft.tuners.lora.layer.ParamWrapper._remove_parametrizations": "quantize_moe_experts"}
    return None


@hookimpl
def post_model_build(cfg, model):
    if cfg.quantize_moe_experts:
        from host_plugin_qlora import experts

        experts.fix_lora_proxy_removal(model)  # a no-op where no expert is quantised (merge-lora)
