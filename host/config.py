"""The host's config schema, merged per run with each enabled plugin's own keys.

Keys follow axolotl's names and meanings for the subset the host supports. Unknown keys are
errors (with the closest valid key suggested); wrong types name the key path.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, create_model, field_validator

from host.errors import ConfigError, PluginError
from host.paths import check_paths

log = logging.getLogger("host.config")


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, defaults are validated."""

    model_config = ConfigDict(extra="forbid", validate_default=True, protected_namespaces=())

    @field_validator("*", mode="before")
    @classmethod
    def _strict_ints(cls, value, info):
        """An integer key takes an integer: YAML's ``true`` or ``"7"`` there is a mistake, not 1 or 7.
        Applies to plugins' keys too (the merged model inherits it); float keys still accept ints."""
        if isinstance(value, (bool, str)) and info.field_name in cls.model_fields:
            kinds = _scalar_kinds(cls.model_fields[info.field_name].annotation)
            if int in kinds and type(value) not in kinds and not (isinstance(value, str) and kinds & {float, Literal}):
                raise ValueError(f"expected an integer, got {type(value).__name__} {value!r}")
        return value


def _scalar_kinds(annotation) -> set:
    """The scalar types a field annotation admits (``int | None`` -> {int, NoneType})."""
    args = getattr(annotation, "__args__", None)
    if args is None:
        return {annotation}
    if getattr(annotation, "__origin__", None) is Literal:
        return {Literal} | {type(a) for a in args}
    return set().union(*(_scalar_kinds(a) for a in args))


class DatasetConfig(StrictModel):
    """One ``datasets:`` entry; a dataset type's model subclasses this to add its own keys."""

    path: str = Field(description="Local file, directory of files, saved dataset dir, or hub id.")
    type: str = Field(description="Dataset type, owned by the host or a plugin.")
    split: str = "train"
    data_files: str | list[str] | None = None
    name: str | None = Field(None, description="Dataset config name (hub datasets).")


class FSDPConfig(StrictModel):
    """``fsdp_config:`` keys (axolotl's, without the ``fsdp_`` prefix), passed to accelerate."""

    auto_wrap_policy: Literal["TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP"] = "TRANSFORMER_BASED_WRAP"
    transformer_layer_cls_to_wrap: list[str] | str | None = Field(
        None, description="Layer classes to shard as units (default: the model's _no_split_modules)."
    )
    min_num_params: int = 0
    activation_checkpointing: bool = False
    cpu_offload: bool = False
    cpu_ram_efficient_loading: bool = False
    state_dict_type: Literal["FULL_STATE_DICT", "SHARDED_STATE_DICT"] = "SHARDED_STATE_DICT"
    reshard_after_forward: bool | str = True
    # FSDP1 only
    backward_prefetch: str | None = None
    forward_prefetch: bool | None = None
    use_orig_params: bool | None = None
    sync_module_states: bool | None = None
    limit_all_gathers: bool | None = None


FSDP1_ONLY = ("backward_prefetch", "forward_prefetch", "use_orig_params", "sync_module_states", "limit_all_gathers")


class HostConfig(StrictModel):
    """Keys the host itself understands."""

    base_model: str
    tokenizer: str | None = None
    processor_type: str | None = None
    trust_remote_code: bool = False
    plugins: list[str] = []

    datasets: list[SerializeAsAny[DatasetConfig]] = []  # dumps each entry's type-specific keys too
    val_set_size: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of rows held out for evaluation.")
    dataset_prepared_path: str | None = None
    sequence_len: int = Field(512, gt=0)
    excess_length_strategy: Literal["drop", "truncate", "raise"] = "drop"
    pad_to_sequence_len: bool = False
    sample_packing: bool = Field(False, description="Pack rows into sequence_len bins (documents kept apart).")
    eval_sample_packing: bool | None = Field(None, description="Pack the eval set too; default: sample_packing.")

    adapter: str | None = Field(
        None, description="lora, a kind an enabled plugin adds (adapter_kinds hook), or unset for full fine-tuning."
    )
    lora_r: int = Field(8, gt=0)
    lora_alpha: float = 16
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    lora_target_modules: list[str] | str | None = None
    lora_target_parameters: list[str] | None = None
    lora_modules_to_save: list[str] | None = None

    micro_batch_size: int = Field(1, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    num_epochs: float = Field(1.0, gt=0)
    max_steps: int | None = None
    learning_rate: float = Field(2e-4, ge=0.0)
    lr_scheduler: str = "cosine"
    warmup_ratio: float | None = None
    warmup_steps: int | None = None
    optimizer: str = "adamw_torch"
    weight_decay: float = 0.0
    bf16: bool | Literal["auto"] = "auto"
    fp16: bool = False
    gradient_checkpointing: bool = False

    logging_steps: int = Field(1, gt=0)
    save_steps: int | None = None
    saves_per_epoch: int | None = None
    eval_steps: int | None = None
    evals_per_epoch: int | None = None
    output_dir: str = "./outputs/run"
    resume_from_checkpoint: bool | str | None = None
    seed: int = 42

    fsdp: bool | list[Literal["full_shard", "shard_grad_op", "hybrid_shard", "no_shard", "auto_wrap", "offload"]] | None = None
    fsdp_version: Literal[1, 2] = 2
    fsdp_config: FSDPConfig | None = None
    ddp_find_unused_parameters: bool | None = None
    ddp_bucket_cap_mb: int | None = None
    ddp_broadcast_buffers: bool | None = None
    ddp_timeout: int = 1800

    torch_compile: bool | Literal["auto"] = False
    torch_compile_mode: str | None = None
    experts_implementation: str | None = None
    attn_implementation: str | None = Field(None, description="e.g. sdpa, eager, flash_attention_2, flex_attention")

    @property
    def eval_packing(self) -> bool:
        """axolotl's meaning: eval follows ``sample_packing`` unless ``eval_sample_packing`` is set."""
        return self.sample_packing if self.eval_sample_packing is None else self.eval_sample_packing

    @property
    def fsdp_enabled(self) -> bool:
        return bool(self.fsdp) or self.fsdp_config is not None

    def config_hash(self) -> str:
        """A stable hash of the resolved config (for summaries and cache keys)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file into a dict (bounded, duplicate keys refused: :mod:`host.yaml_io`)."""
    from host.yaml_io import read_yaml as read

    return read(path)


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _format_errors(source: str, exc: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    lines = []
    for err in exc.errors():
        loc = err["loc"]
        key = prefix + _loc(loc)
        if err["type"] == "extra_forbidden":
            valid = _fields_at(model, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else " Remove it or enable the plugin that owns it."
            lines.append(f"{source}: unknown key {key!r}.{hint}")
        elif err["type"] == "missing":
            lines.append(f"{source}: missing required key {key!r}.")
        else:
            lines.append(f"{source}: key {key!r}: {err['msg']} (got {err.get('input')!r}).")
    return "\n".join(lines)


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (nested) model at ``loc``, for 'did you mean' hints."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        inner = getattr(ann, "__args__", (ann,))
        model = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields)


def merged_model(pm) -> type[HostConfig]:
    """HostConfig extended with every enabled plugin's config model; collisions are errors."""
    owners: dict[str, str] = {name: "host" for name in HostConfig.model_fields}
    bases: list[type[BaseModel]] = []
    for impl in reversed(pm.hook.config_model.get_hookimpls()):  # plugins: order
        model = impl.function()
        if model is None:
            continue
        for key in model.model_fields:
            if key in owners:
                raise PluginError(
                    f"plugins: config key {key!r} is claimed by both {owners[key]!r} and "
                    f"{impl.plugin_name!r}; one of them must rename it."
                )
            owners[key] = impl.plugin_name
        bases.append(model)
    if not bases:
        return HostConfig
    return create_model("Config", __base__=(HostConfig, *bases))


def dataset_type_models(pm) -> dict[str, tuple[str, type[DatasetConfig]]]:
    """``{type: (owning plugin, entry model)}``; two owners of one type is an error."""
    types: dict[str, tuple[str, type[DatasetConfig]]] = {}
    for impl in reversed(pm.hook.dataset_types.get_hookimpls()):
        for name, model in (impl.function() or {}).items():
            if name in types:
                owners = sorted({types[name][0], impl.plugin_name})
                fix = (f"it is built into the host, so plugin {owners[1 - owners.index('host')]!r} must give its type "
                       f"another name" if "host" in owners else "disable one of them")
                raise PluginError(
                    f"plugins: dataset type {name!r} is claimed by both {types[name][0]!r} and "
                    f"{impl.plugin_name!r}; {fix}."
                )
            types[name] = (impl.plugin_name, model)
    return types


def adapter_kind_owners(pm) -> dict[str, str]:
    """``{adapter kind: owner}``: the host's ``lora`` and every enabled plugin's kinds."""
    owners = {"lora": "host"}
    for impl in reversed(pm.hook.adapter_kinds.get_hookimpls()):
        for kind in impl.function() or []:
            if kind in owners:
                raise PluginError(
                    f"plugins: adapter kind {kind!r} is claimed by both {owners[kind]!r} and "
                    f"{impl.plugin_name!r}; disable one of them."
                )
            owners[kind] = impl.plugin_name
    return owners


def check_adapter_kind(cfg: HostConfig, pm, source: str) -> None:
    """``adapter:`` must be ``lora`` or a kind an enabled plugin declares."""
    kinds = adapter_kind_owners(pm)
    if cfg.adapter is not None and cfg.adapter not in kinds:
        raise ConfigError(
            f"{source}: adapter: unknown adapter kind {cfg.adapter!r}. Known: {', '.join(sorted(kinds))}; "
            f"other kinds come from plugins: enable the plugin that provides it, or use lora."
        )


def validate(data: dict[str, Any], pm, source: str = "config") -> HostConfig:
    """Validate raw YAML data: merged schema, dataset entries, host rules and plugin rules
    (whose warnings are logged). Raises ConfigError."""
    cfg, warnings = validate_with_warnings(data, pm, source)
    for w in warnings:
        log.warning(w)
    return cfg


def validate_with_warnings(data: dict[str, Any], pm, source: str = "config") -> tuple[HostConfig, list[str]]:
    """:func:`validate`, returning the plugins' warnings instead of logging them."""
    model = merged_model(pm)
    entries = data.get("datasets") or []
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: key 'datasets' must be a list of entries, got {type(entries).__name__}.")
    if "datasets" in data and not entries:
        raise ConfigError(f"{source}: datasets: the list is empty; add at least one entry (path and type).")
    try:
        cfg = model.model_validate({**data, "datasets": []})
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc, model)) from None
    types = dataset_type_models(pm)
    for i, entry in enumerate(entries):
        kind = entry.get("type") if isinstance(entry, dict) else None
        if kind not in types:
            close = difflib.get_close_matches(str(kind), list(types), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{source}: datasets[{i}].type: unknown dataset type {kind!r}.{hint} "
                f"Known types: {', '.join(sorted(types))} (plugins add more)."
            )
        entry_model = types[kind][1]
        try:
            cfg.datasets.append(entry_model.model_validate(entry))
        except ValidationError as exc:
            raise ConfigError(_format_errors(source, exc, entry_model, prefix=f"datasets[{i}].")) from None
    check_adapter_kind(cfg, pm, source)
    check_host_rules(cfg, source)
    check_paths(cfg, source)
    warnings = [w for ws in pm.hook.validate_config(cfg=cfg) for w in (ws or [])]
    check_patch_overlaps(pm, cfg, source)
    return cfg, warnings


def check_host_rules(cfg: HostConfig, source: str) -> None:
    """Rules that span several host keys (plugins add theirs through ``validate_config``)."""
    if cfg.warmup_ratio is not None and cfg.warmup_steps is not None:
        raise ConfigError(f"{source}: warmup_ratio/warmup_steps: set one of them, not both.")
    if cfg.save_steps and cfg.saves_per_epoch:
        raise ConfigError(f"{source}: save_steps/saves_per_epoch: set one of them, not both.")
    if cfg.eval_steps and cfg.evals_per_epoch:
        raise ConfigError(f"{source}: eval_steps/evals_per_epoch: set one of them, not both.")
    if not cfg.fsdp_enabled:
        return
    fc = cfg.fsdp_config or FSDPConfig()
    if cfg.fsdp_version == 2:
        used = [k for k in FSDP1_ONLY if getattr(fc, k) is not None]
        strategies = [s for s in (cfg.fsdp if isinstance(cfg.fsdp, list) else []) if s in ("hybrid_shard", "no_shard")]
        if used or strategies:
            raise ConfigError(
                f"{source}: fsdp_config: {', '.join(used + strategies)} exist only in FSDP1, but fsdp_version is 2. "
                f"Remove them (FSDP2 prefetches on its own), or set fsdp_version: 1 (deprecated in transformers)."
            )
        if not isinstance(fc.reshard_after_forward, bool):
            raise ConfigError(f"{source}: fsdp_config.reshard_after_forward must be true or false with fsdp_version 2.")
    if cfg.gradient_checkpointing:
        raise ConfigError(
            f"{source}: gradient_checkpointing with FSDP adds a redundant all-gather in backward; set "
            f"fsdp_config.activation_checkpointing: true instead and gradient_checkpointing: false."
        )
    if cfg.ddp_find_unused_parameters or cfg.ddp_bucket_cap_mb or cfg.ddp_broadcast_buffers is not None:
        raise ConfigError(f"{source}: ddp_* options apply to DDP, not FSDP; remove them or disable fsdp.")


def load_config(path: str | Path, overrides: dict[str, Any] | None = None):
    """Read, build the plugin manager for, and validate a config file.

    Returns ``(cfg, pm, warnings)``. ``overrides`` replace top-level keys (used by tests).
    """
    from host.plugins import build_plugin_manager

    data = read_yaml(path)
    data.update(overrides or {})
    plugins = data.get("plugins") or []
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise ConfigError(f"{path}: key 'plugins' must be a list of plugin names, got {plugins!r}.")
    pm = build_plugin_manager(plugins)
    cfg, warnings = validate_with_warnings(data, pm, source=str(path))
    return cfg, pm, warnings


def check_patch_overlaps(pm, cfg: HostConfig, source: str) -> None:
    """Two plugins declaring the same ``patched_targets`` target is an error naming both."""
    owners: dict[str, tuple[str, str]] = {}
    for impl in reversed(pm.hook.patched_targets.get_hookimpls()):  # plugins: order
        for target, keys in (impl.function(*[cfg for _ in impl.argnames]) or {}).items():
            if target in owners:
                claims = [owners[target], (impl.plugin_name, keys)]
                who = " and ".join(f"{p!r} ({k or 'always'})" for p, k in claims)
                fixes = " or ".join(f"set {k} to false" if k else f"remove {p!r} from plugins" for p, k in claims)
                raise ConfigError(f"{source}: plugins {who} both patch {target}. Turn one off: {fixes}.")
            owners[target] = (impl.plugin_name, keys)
