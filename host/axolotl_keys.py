"""What host does with each axolotl config key it does not own: the one table to extend.

Keys that the host's or an enabled plugin's config model declares are simply supported; this
table covers the rest of axolotl's keys (the full list, with defaults, is generated into
:mod:`host.axolotl_schema` from axolotl's wheel). Each entry is one of:

- ``ignored(why)``: harmless here whatever its value (one warning line names it);
- ``refused(why)``: axolotl does something host does not; an error with the reason;
- ``plugin(name)``: a host plugin answers it; an error naming the plugin when it is not enabled;
- ``Key("alias", why, plugin=name, target=key)``: read as ``target``, a key of that plugin (one warning).
- ``suggest(name, why)``: answered by plugin ``name`` when it is enabled; otherwise ignored with one warning
  that points at the plugin (a speed switch that needs no plugin in axolotl).

Any axolotl key at a value where axolotl itself does nothing (null, empty, its default, ``false``
for an off-by-default switch, or an entry's ``noop`` values) is dropped with one warning line,
whatever its entry. Keys of axolotl that have no entry are refused with a generic reason.
Installed plugins add to the ``plugin`` entries through the ``host.axolotl`` entry-point group
(see :func:`declared_names`), so a third-party plugin never needs an edit here.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable

from host import axolotl_schema

ENTRY_POINT_GROUP = "host.axolotl"


@dataclass(frozen=True)
class Key:
    status: str  # "ignored" | "refused" | "plugin"
    why: str = ""
    plugin: str | None = None
    noop: tuple | Callable[[Any], bool] = ()  # extra values (or a test) at which the key does nothing here
    target: str | None = None  # "alias": the key of ``plugin`` that means the same


def ignored(why: str, noop: tuple = ()) -> Key:
    return Key("ignored", why, noop=noop)


def refused(why: str, noop: tuple = ()) -> Key:
    return Key("refused", why, noop=noop)


def plugin(name: str, noop: tuple = ()) -> Key:
    return Key("plugin", plugin=name, noop=noop)


def suggest(name: str, why: str) -> Key:
    return Key("suggest", why, plugin=name)


_SPEED_ONLY = "a speed-only kernel switch of axolotl; host trains the same model with peft's LoRA layers"
_NO_HUB = "host never pushes to or pulls from the hub; nothing is uploaded"

# key -> decision. Sorted by topic; add a line to teach host about another key.
TABLE: dict[str, Key] = {
    # --- harmless: no effect on what is trained ------------------------------------------------
    "strict": ignored("axolotl's switch for CLI overrides; host has none"),
    "lora_mlp_kernel": ignored(_SPEED_ONLY),
    "lora_qkv_kernel": ignored(_SPEED_ONLY),
    "lora_o_kernel": ignored(_SPEED_ONLY),
    "lora_embedding_kernel": ignored(_SPEED_ONLY),
    "skip_prepare_dataset": ignored("host tokenizes datasets once before training (cached under dataset_prepared_path)"),
    "experimental_skip_move_to_device": ignored("a loading-speed switch; host loads the model as transformers does"),
    "loss_watchdog_threshold": ignored("host has no loss watchdog; watch loss.png or the logs"),
    "loss_watchdog_patience": ignored("host has no loss watchdog; watch loss.png or the logs"),
    "wandb_watch": refused("host does not log gradients/parameters to wandb (wandb.watch)"),
    "wandb_log_model": refused("host does not upload checkpoints to wandb; they stay in output_dir"),
    "push_dataset_to_hub": refused(_NO_HUB),
    "hub_model_id": refused(_NO_HUB),
    "hub_strategy": refused(_NO_HUB),
    "save_safetensors": ignored("host always saves safetensors", noop=(True,)),
    "remove_unused_columns": refused("host keeps every column the dataset type produces", noop=(False,)),
    "dataloader_pin_memory": ignored("a loader-speed switch"),
    "dataloader_prefetch_factor": ignored("a loader-speed switch"),
    "dataloader_num_workers": ignored("host loads batches in the main process"),
    "tokenizer_type": ignored("host loads tokenizers with AutoTokenizer", noop=("AutoTokenizer",)),
    "tokenizer_use_fast": ignored("host always uses the fast tokenizer", noop=(True,)),
    "model_type": refused(  # a concrete *ForCausalLM class is what the auto class picks anyway
        "host loads with AutoModelForCausalLM (or AutoModelForImageTextToText when processor_type is set); "
        "other heads (sequence/token classification) are not supported",
        noop=lambda v: str(v).endswith(("ForCausalLM", "ForConditionalGeneration", "AutoModelForImageTextToText")),
    ),
    "sdp_attention": refused("axolotl's legacy switch; write attn_implementation: sdpa"),
    "eager_attention": refused("axolotl's legacy switch; write attn_implementation: eager"),
    "flex_attention": refused("axolotl's legacy switch; write attn_implementation: flex_attention"),
    "gptq": refused("GPTQ-quantized base models are not supported"),
    "gptq_groupsize": refused("GPTQ-quantized base models are not supported"),
    "gptq_model_v1": refused("GPTQ-quantized base models are not supported"),
    "torchdistx_path": refused("torchdistx deferred init is not supported"),
    "device_map": refused("host places the model itself (one GPU per process, or FSDP/DeepSpeed)"),
    "max_memory": refused("host places the model itself (one GPU per process, or FSDP/DeepSpeed)"),
    "group_by_length": refused("host does not reorder samples by length"),
    "fused_attn_kernel": ignored(
        "a speed-only kernel switch of axolotl (one fused RMSNorm+RoPE Triton launch for q/k; the same math); "
        "host runs transformers' attention (for Gemma 4 the gemma4 plugin's gemma4_fused_norm_rope fuses it)"
    ),
    "use_otel_metrics": ignored(
        "axolotl's OpenTelemetry metrics export; host reports metrics through wandb/TensorBoard (report_to), "
        "its logs and run_summary.json"
    ),
    "otel_metrics_host": ignored("axolotl's OpenTelemetry metrics export (see use_otel_metrics)"),
    "otel_metrics_port": ignored("axolotl's OpenTelemetry metrics export (see use_otel_metrics)"),
    # --- not in host ---------------------------------------------------------------------------
    "rl": refused("preference/RL training (DPO, ORPO, KTO, GRPO) is not in host; it trains SFT and pretraining"),
    "tensor_parallel_size": refused("tensor parallelism is not in host; use FSDP or DeepSpeed ZeRO-3"),
    "context_parallel_size": refused("context parallelism is not in host"),
    "expert_parallel_size": refused("expert parallelism is not in host; use FSDP, or DDP with the scattermoe plugin"),
    "qat": refused("quantization-aware training is not in host"),
    "llama4_linearized_experts": refused("Llama 4 expert linearization is not in host"),
    "tokenizer_use_mistral_common": refused("mistral-common tokenizers are not supported; host loads the HF tokenizer"),
    "use_sonicmoe": refused("sonicmoe kernels are not in host; use plugins: [scattermoe] (MoE kernels with LoRA fused in)"),
    # the same loss without materialised logits: liger's fused linear cross-entropy stands in for it
    "cut_cross_entropy": Key("alias", "liger's fused linear cross-entropy computes the same loss without "
                             "materialising the logits", plugin="liger", target="liger_fused_linear_cross_entropy"),
    "max_packed_sequence_len": refused("axolotl's legacy packing key; use sample_packing with sequence_len"),
    "pretraining_dataset": plugin("mmcpt"),
    # --- answered by first-party plugins (installed plugins can declare more) ------------------
    "use_kernels": suggest(
        "scattermoe", "axolotl's switch for transformers' hub kernels (kernelize), which only change speed; host loads no "
        "code from the hub. For fused MoE expert kernels with LoRA add plugins: [scattermoe]"
    ),
    "use_scattermoe": plugin("scattermoe"),
    "torch_compile_options": plugin("compile_opts"),
    "load_in_4bit": plugin("qlora"),
    "load_in_8bit": plugin("qlora"),
    "bnb_4bit_quant_type": plugin("qlora"),
    "bnb_4bit_use_double_quant": plugin("qlora"),
    "bnb_4bit_compute_dtype": plugin("qlora"),
    "bnb_4bit_quant_storage": plugin("qlora"),
    "bnb_config_kwargs": plugin("qlora"),
    "quantize_moe_experts": plugin("qlora"),
    "qlora_sharded_model_loading": refused(
        "FSDP-sharded QLoRA loading: the qlora plugin refuses FSDP; use DDP (each GPU loads its own 4-bit copy)"
    ),
    "nf4_backend": refused("NF4 comes from bitsandbytes only (plugins: [qlora])", noop=("bitsandbytes",)),
    "embeddings_skip_upcast": ignored("the qlora plugin never upcasts the embeddings to fp32"),
    "liger_rms_norm": plugin("liger"),
    "liger_rms_norm_gated": plugin("liger"),
    "liger_glu_activation": plugin("liger"),
    "liger_rope": plugin("liger"),
    "liger_layer_norm": plugin("liger"),
    "liger_fused_linear_cross_entropy": plugin("liger"),
    "liger_cross_entropy": plugin("liger"),
}

# ``adapter:`` values of axolotl that a host plugin provides (its ``adapter_kinds`` hook).
ADAPTERS: dict[str, Key] = {
    "qlora": plugin("qlora"),
}

# axolotl plugin class path (``plugins:``) -> host plugin name, or a refusal.
PLUGINS: dict[str, Key] = {
    "axolotl.integrations.kernels.KernelsPlugin": plugin("scattermoe"),
    "axolotl.integrations.liger.LigerPlugin": plugin("liger"),
    "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin": plugin("liger"),  # with cut_cross_entropy below
}

# ``datasets:`` entry keys of axolotl that host does not own (host and plugins declare the rest).
DATASET_TABLE: dict[str, Key] = {
    "ds_type": ignored("host infers the file format from the extension"),
    "trust_remote_code": ignored("dataset loading scripts are not run"),
    "shards": refused("dataset sharding is not in host"),
    "preprocess_shards": refused("dataset sharding is not in host"),
    "weight": refused("dataset weighting is not in host", noop=(1, 1.0)),
}


def enabling_keys() -> dict[str, str]:
    """``{axolotl key: host plugin}`` for keys that turn an installed plugin on by themselves, because
    axolotl acts on them without any plugin (``load_in_4bit`` -> ``qlora``). A plugin declares them
    under ``[project.entry-points."host.axolotl_enables"]`` (``load_in_4bit = "<its module>"``)."""
    by_module = {ep.value.split(":")[0]: ep.name for ep in entry_points(group="host.plugins")}
    return {ep.name: by_module[ep.value.split(":")[0]] for ep in entry_points(group="host.axolotl_enables")
            if ep.value.split(":")[0] in by_module}


def enabled_by_keys(data: dict[str, Any], plugins: list[str]) -> tuple[list[str], list[str]]:
    """``(plugins, notes)``: ``plugins`` plus every installed plugin that a key set to a real value in
    ``data`` turns on (see :func:`enabling_keys`), each with one note."""
    out, notes = list(plugins), []
    for key, name in enabling_keys().items():
        if key in data and name not in out and not is_noop(data[key], top_default(key)):
            out.append(name)
            notes.append(f"plugins: `{key}` turns on host plugin `{name}` (axolotl needs no plugin for it); "
                         f"list {name} under `plugins:` to say so.")
    return out, notes


def declared_names() -> dict[str, str]:
    """``{axolotl key or plugin class path: host plugin}`` declared by installed plugins.

    A plugin distribution declares them without any import, next to its ``host.plugins`` entry:
    ``[project.entry-points."host.axolotl"]`` with ``"axolotl.integrations.x.XPlugin" = "<its module>"``
    or ``use_x = "<its module>"``; the value names the same module as its ``host.plugins`` entry.
    """
    by_module = {ep.value.split(":")[0]: ep.name for ep in entry_points(group="host.plugins")}
    out = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        name = by_module.get(ep.value.split(":")[0])
        if name:
            out[ep.name] = name
    return out


def is_axolotl_key(key: str) -> bool:
    return key in axolotl_schema.TOP or key in TABLE


def is_noop(value: Any, default: Any = "?", extra: tuple | Callable[[Any], bool] = ()) -> bool:
    """True when axolotl does nothing with ``value``: null/empty, its default, or ``false`` for a switch
    that is off by default."""
    if value is None or value == "" or value == [] or value == {}:
        return True
    if callable(extra):
        if extra(value):
            return True
    elif any(value == v and type(value) is type(v) for v in extra):
        return True
    if default != "?" and type(value) is type(default) and value == default:
        return True
    return value is False and default in (None, False)


def decide(key: str, declared: dict[str, str] | None = None, table: dict[str, Key] | None = None) -> Key:
    """The decision for an axolotl key host does not own (installed plugins' declarations first)."""
    declared = declared_names() if declared is None else declared
    table = TABLE if table is None else table
    if key in table and table[key].status == "suggest":
        return table[key]
    if key in declared:
        return plugin(declared[key], noop=table[key].noop if key in table else ())
    if key in table:
        return table[key]
    owner = axolotl_schema.TOP.get(key, (None, ""))[1]
    if owner.startswith("integration:"):
        return refused(f"it belongs to axolotl's {owner.split(':')[1]} integration, which host has no plugin for")
    return refused("host does not implement it")


def top_default(key: str) -> Any:
    return axolotl_schema.TOP.get(key, ("?", ""))[0]


def dataset_default(key: str) -> Any:
    return axolotl_schema.DATASET.get(key, "?")


def resolve_plugins(names: list[str], installed: set[str]) -> tuple[list[str], list[str], list[str]]:
    """``(names, errors, notes)``: axolotl plugin class paths in ``plugins:`` replaced by the host plugin
    that stands for each (declared by installed plugins, else :data:`PLUGINS`); the others refused."""
    declared = declared_names()
    out, errors, notes = [], [], []
    for name in names:
        if not name.startswith("axolotl."):
            out.append(name)
            continue
        decision = plugin(declared[name]) if name in declared else PLUGINS.get(name)
        if decision is None:
            errors.append(f"axolotl plugin `{name}` has no host counterpart; remove it (host plugins: host plugins list).")
        elif decision.status != "plugin":
            errors.append(f"axolotl plugin `{name}` is not supported by host: {decision.why}.")
        elif decision.plugin in installed:
            notes.append(f"plugins: axolotl's {name} is host plugin `{decision.plugin}` here.")
            out.append(decision.plugin)
        else:
            dist = f"host-plugin-{decision.plugin.replace('_', '-')}"
            errors.append(
                f"axolotl plugin `{name}` is host plugin `{decision.plugin}`: pip install {dist} "
                f"and write `{decision.plugin}` under `plugins:`."
            )
    return list(dict.fromkeys(out)), errors, notes
