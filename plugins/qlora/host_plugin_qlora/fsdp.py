"""QLoRA under FSDP: which combinations can shard, and the storage dtype that lets them.

FSDP shards and all-gathers parameters as plain tensors and, with mixed precision, casts them to
its parameter dtype on the way. A bitsandbytes 4-bit weight is packed bytes (``Params4bit``) whose
quantisation state (block scales, shape) stays on its ``Linear4bit`` module; stored as ``uint8``,
FSDP would cast the bytes to bf16 (FSDP2) or refuse a flat parameter of mixed dtypes (FSDP1).
Stored in the training dtype (``bnb_4bit_quant_storage``), the same bytes are an ordinary bf16/fp32
tensor to FSDP: it shards them, gathers them back bit-exact, and ``Linear4bit`` dequantises the
gathered tensor with the state its module kept. Int8 weights (``Linear8bitLt``) have no such
storage option: their row scales live on the parameter object, which FSDP replaces.
"""

from __future__ import annotations

from host.errors import ConfigError

FLOAT_STORAGE = ("bfloat16", "float32")


def explicit_storage(cfg) -> str | None:
    """``bnb_4bit_quant_storage`` as the user set it (key or ``bnb_config_kwargs``), else None."""
    extra = (cfg.bnb_config_kwargs or {}).get("bnb_4bit_quant_storage")
    if extra is not None:
        return str(extra).removeprefix("torch.")
    return cfg.bnb_4bit_quant_storage


def check(cfg) -> None:
    """Refuse what cannot shard, one line each (called from ``validate_config`` under FSDP)."""
    if cfg.load_in_8bit:
        raise ConfigError(
            "load_in_8bit: int8 weights cannot be sharded by FSDP (bitsandbytes keeps their row scales on the "
            "parameter object, which FSDP replaces, and int8 has no float storage option). Use adapter: qlora "
            "with load_in_4bit: true under FSDP, or keep load_in_8bit and launch with torchrun for DDP."
        )
    if cfg.fp16:
        raise ConfigError(
            "fp16: QLoRA under FSDP needs bf16 (or fp32) training: the packed 4-bit data is stored in the dtype "
            "of the model's other weights, which the host loads in float32 for fp16 runs, and FSDP would cast it "
            "to float16 when gathering. Set bf16: true (fp16: false)."
        )
    if cfg.quantize_moe_experts and cfg.fsdp_version == 1:
        raise ConfigError(
            "quantize_moe_experts: 4-bit experts under FSDP need fsdp_version: 2 (FSDP2 shards each parameter, "
            "including the packed experts under their bitsandbytes parametrization; FSDP1 would flatten them into "
            "its FlatParameter, which is not supported here). Set fsdp_version: 2."
        )
    storage = explicit_storage(cfg)
    if storage is not None and storage not in FLOAT_STORAGE:
        raise ConfigError(
            f"bnb_4bit_quant_storage: {storage} cannot be sharded by FSDP (it gathers and casts parameters as "
            "float tensors); remove the key (the plugin then stores the packed data in the training dtype) or "
            "set it to the training dtype (bfloat16)."
        )
    wanted = {True: "bfloat16", False: "float32"}.get(cfg.bf16) if isinstance(cfg.bf16, bool) else None
    if storage is not None and wanted is not None and storage != wanted:
        raise ConfigError(
            f"bnb_4bit_quant_storage: {storage} differs from the training dtype ({wanted}); under FSDP the packed "
            f"data must be stored in it (FSDP would cast it otherwise). Remove the key or set it to {wanted}."
        )


def storage_dtype(cfg) -> str:
    """The storage dtype under FSDP: the training dtype (bf16 or fp32), which ``check`` allowed."""
    from host.model import use_bf16

    wanted = "bfloat16" if use_bf16(cfg) else "float32"
    storage = explicit_storage(cfg)
    if storage is not None and storage != wanted:  # bf16: auto resolved only now
        raise ConfigError(
            f"bnb_4bit_quant_storage: {storage} differs from the training dtype here ({wanted}); under FSDP the "
            f"packed data must be stored in it. Remove the key or set it to {wanted}."
        )
    return wanted


def keep_packed_layout(model) -> int:
    """Keep the packed 4-bit bytes that FSDP shards as they are: bitsandbytes (0.50) repacks a ``Linear4bit``
    weight for its CPU kernel on the first no-grad forward in eval mode on a CPU, replacing the parameter's data,
    and the state that undoes it does not survive sharding (the next forward then fails). Returns how many
    modules had it on."""
    n = 0
    for m in model.modules():
        if getattr(m, "support_avx512bf16_for_cpu", False):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n
