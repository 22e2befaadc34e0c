"""The host's config schema, merged per run with each enabled plugin's own keys.

Keys follow axolotl's names and meanings for the subset the host supports. Unknown keys are
errors (with the closest valid key suggested); wrong types name the key path.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, create_model, field_validator, model_validator

from host import model_keys, offload, optim_args, parallel_sizes
from host.errors import ConfigError, HostError, PluginError
from host.model_keys import ModelKeys
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
    """``fsdp_config:`` keys, passed to accelerate. axolotl's legacy ``fsdp_``-prefixed names and
    ``offload_params`` (= ``cpu_offload``) are read as their plain names."""

    @model_validator(mode="before")
    @classmethod
    def _axolotl_names(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out: dict[str, Any] = {}
        for key, value in data.items():
            bare = key[len("fsdp_"):] if key.startswith("fsdp_") else key
            name = bare if bare in cls.model_fields or bare in FSDP_ALIASES else key
            name = FSDP_ALIASES.get(name, name)
            if name in out and out[name] != value:
                raise ValueError(f"{key!r} and another spelling of {name!r} disagree; keep one")
            out[name] = value
        return out

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
    # axolotl's names for host behaviour
    final_state_dict_type: Literal["FULL_STATE_DICT"] | None = Field(
        None, description="The final save is always gathered into one full state dict (loadable on one device)."
    )
    version: Literal[1, 2] | None = Field(None, description="axolotl's fsdp_config.fsdp_version; same as top-level fsdp_version.")


FSDP_ALIASES = {"offload_params": "cpu_offload"}

FSDP1_ONLY = ("backward_prefetch", "forward_prefetch", "use_orig_params", "sync_module_states", "limit_all_gathers")


class HostConfig(StrictModel, ModelKeys):
    """Keys the host itself understands (axolotl's model-side keys come from :class:`host.model_keys.ModelKeys`)."""

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
    sample_packing_sequentially: bool = Field(False, description="Pack rows into bins in data order (next fit), not longest first.")
    curriculum_sampling: bool = Field(False, description="Train on rows (or bins) in data order: no shuffling, no shuffled eval split.")
    dataset_exact_deduplication: bool = Field(False, description="Drop rows that repeat an earlier row exactly (before the eval split).")

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
    optim_args: str | dict[str, Any] | None = Field(None, description="Optimizer settings: {key: value} or 'k=v,k=v' (transformers' optim_args).")
    weight_decay: float = 0.0
    bf16: bool | Literal["auto"] = "auto"
    fp16: bool = False
    gradient_checkpointing: bool | Literal["offload", "offload_disk"] = Field(
        False, description="Recompute each layer's activations in backward; offload: also activation_offloading (axolotl's older spelling)."
    )
    activation_offloading: bool | Literal["legacy", "hidden_states", "disk"] = Field(
        False, description="Keep what autograd saves in CPU memory until backward (needs gradient_checkpointing); see host/offload.py."
    )

    logging_steps: int = Field(1, gt=0)
    logging_nan_inf_filter: bool = Field(
        True, description="Log a NaN/Inf step's loss as the running average (the Trainer's default); false saves two GPU waits per step."
    )
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
    dp_shard_size: int | None = Field(None, gt=0, description="axolotl's FSDP shard group size; host accepts the world size (FSDP shards over every rank).")
    dp_replicate_size: int | None = Field(None, gt=0, description="axolotl's replica count; host accepts the world size without FSDP (DDP).")

    # axolotl's training keys (the README's "axolotl compatibility" lists what is supported and why)
    lora_target_linear: bool | None = Field(None, description="LoRA on every linear layer but the output head (with lora_target_modules: both).")
    lora_model_dir: str | None = Field(None, description="Start from this saved LoRA adapter (trained further) instead of a fresh one.")
    tf32: bool | Literal["auto"] = Field("auto", description="TF32 matmuls on Ampere+ GPUs; auto: on where supported. No effect on CPU.")
    gradient_checkpointing_kwargs: dict[str, Any] | None = Field(None, description="Passed to transformers, e.g. {use_reentrant: false}.")
    max_grad_norm: float | None = Field(None, ge=0, description="Gradient clipping norm (default 1.0, the Trainer's); 0 turns clipping off.")
    adam_beta1: float | None = Field(None, gt=0, lt=1)
    adam_beta2: float | None = Field(None, gt=0, lt=1)
    adam_epsilon: float | None = Field(None, gt=0)
    save_strategy: Literal["no", "steps", "epoch"] | None = Field(
        None, description="Unset: steps when save_steps/saves_per_epoch are set, else one checkpoint per epoch (axolotl's default)."
    )
    save_total_limit: int | None = Field(None, gt=0, description="Keep only the newest N checkpoints.")
    early_stopping_patience: int | None = Field(None, gt=0, description="Stop after N evaluations without a lower eval_loss.")
    deepspeed: str | None = Field(None, description="Path to a DeepSpeed ZeRO JSON (see examples/deepspeed/); GPUs only.")
    wandb_project: str | None = Field(None, description="Log to Weights & Biases under this project (needs host[logging]).")
    wandb_entity: str | None = None
    wandb_name: str | None = Field(None, description="The run's name (wandb and TensorBoard).")
    wandb_mode: Literal["online", "offline", "disabled"] | None = Field(None, description="offline writes the run under output_dir/wandb.")
    use_tensorboard: bool = Field(False, description="Write TensorBoard event files under output_dir/runs (needs host[logging]).")

    torch_compile: bool | Literal["auto"] = False
    torch_compile_mode: str | None = None
    experts_implementation: str | None = None
    attn_implementation: str | None = Field(None, description="e.g. sdpa, eager, flash_attention_2, flex_attention")

    @model_validator(mode="after")
    def _fsdp_version_from_fsdp_config(self):
        """axolotl may give the version inside fsdp_config; the top-level key wins when both are set."""
        if self.fsdp_config is not None and self.fsdp_config.version and "fsdp_version" not in self.model_fields_set:
            self.fsdp_version = self.fsdp_config.version
        return self

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


SUGGEST_CUTOFF = 0.75  # difflib ratio: 'lerning_rate'->'learning_rate' (0.96), 'image_dir'->'image_base_dir' (0.78), never 'deepspeed'->'seed' (0.62); axolotl's own keys (tokenizer_type) are answered by the axolotl table first


def _key_error(err: dict, model: type[BaseModel], prefix: str = "") -> str:
    loc = err["loc"]
    key = prefix + _loc(loc)
    if err["type"] == "extra_forbidden":
        valid = _fields_at(model, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=SUGGEST_CUTOFF)
        hint = f" Did you mean {close[0]!r}?" if close else " Remove it or enable the plugin that owns it."
        return f"unknown key {key!r}.{hint}"
    if err["type"] == "missing":
        return f"missing required key {key!r}."
    return f"key {key!r}: {err['msg']} (got {err.get('input')!r})."


def _format_errors(source: str, exc: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    return "\n".join(f"{source}: {_key_error(err, model, prefix)}" for err in exc.errors())


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
    from host import axolotl_keys

    kinds = adapter_kind_owners(pm)
    known = axolotl_keys.ADAPTERS.get(cfg.adapter)
    if cfg.adapter not in kinds and known is not None and known.status == "plugin":
        raise ConfigError(
            f"{source}: adapter: {cfg.adapter!r} needs host plugin `{known.plugin}`: add {known.plugin} to `plugins:` "
            f"(pip install host-plugin-{known.plugin.replace('_', '-')})."
        )
    if cfg.adapter is not None and cfg.adapter not in kinds:
        raise ConfigError(
            f"{source}: adapter: unknown adapter kind {cfg.adapter!r}. Known: {', '.join(sorted(kinds))}; "
            f"other kinds come from plugins: enable the plugin that provides it, or use lora."
        )


GROUPS = ("plugins", "keys", "datasets", "rules")


class Problems:
    """Every problem of one config, grouped, raised together as one :class:`ConfigError`."""

    def __init__(self, source: str):
        self.source = source
        self.groups: dict[str, list[str]] = {g: [] for g in GROUPS}
        self.errors: list[HostError] = []  # the original exceptions, for --debug's traceback
        self.warnings: list[str] = []

    def add(self, group: str, message: str, error: HostError | None = None) -> None:
        # PluginError's leading "plugins: " repeats the group; other messages start with their key
        self.groups[group].append(message.removeprefix("plugins: ") if group == "plugins" else message)
        if error is not None:
            self.errors.append(error)

    def __len__(self) -> int:
        return sum(len(v) for v in self.groups.values())

    def raise_if_any(self) -> None:
        """One problem reads as it always did (``<file>: <key>: ...``); several are listed by group."""
        n = len(self)
        if not n:
            return
        cause = next((e for e in self.errors if e.__cause__ is not None), None)
        notes = ["  warnings (not errors):", *(f"    - {w}" for w in self.warnings)] if self.warnings else []
        if n == 1:
            group, message = next((g, m[0]) for g, m in self.groups.items() if m)
            text = str(self.errors[0]) if len(self.errors) == 1 else f"{self.source}: {'plugins: ' if group == 'plugins' else ''}{message}"
            kind = type(self.errors[0]) if len(self.errors) == 1 else ConfigError
            raise kind("\n".join([text, *notes])) from (cause.__cause__ if cause else None)
        lines = [f"{self.source}: {n} problems; fix them all, then run again."]
        for group, messages in self.groups.items():
            if messages:
                lines.append(f"  {group}:")
                lines += [f"    - {m}" for m in messages]
        raise ConfigError("\n".join(lines + notes)) from (cause.__cause__ if cause else None)


def drop_nulls(value: Any) -> Any:
    """An explicit null means unset (as in axolotl): drop null values from mappings at any depth."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def screen_axolotl_keys(
    data: dict[str, Any], fields: set[str], enabled: list[str], problems: Problems, where: str = "", entry: bool = False
) -> dict[str, Any]:
    """Drop from ``data`` the axolotl keys that host does not own, reporting each as the table says
    (:mod:`host.axolotl_keys`); keys that are neither host's nor axolotl's stay for pydantic to reject."""
    from host import axolotl_keys as ax

    declared = ax.declared_names()
    table = ax.DATASET_TABLE if entry else ax.TABLE
    out, noops = {}, []
    for key, value in data.items():
        known = (key in ax.axolotl_schema.DATASET or key in table) if entry else (ax.is_axolotl_key(key) or key in declared)
        if key in fields or not known:
            out[key] = value
            continue
        decision = table[key] if entry and key in table else (
            ax.refused("host does not implement it") if entry else ax.decide(key, declared)
        )
        default = ax.dataset_default(key) if entry else ax.top_default(key)
        if decision.status == "alias" and decision.plugin in enabled:
            if decision.target not in data:
                out[decision.target] = value
            problems.warnings.append(f"{where}{key}: read as {decision.target} ({decision.why}).")
        elif ax.is_noop(value, default, decision.noop):
            noops.append(f"{where}{key}: {'(empty)' if value in (None, '') else json.dumps(value)}")
        elif decision.status == "ignored" or (decision.status == "suggest" and decision.plugin not in enabled):
            problems.warnings.append(f"{where}{key}: ignored ({decision.why}).")
        elif decision.status == "suggest":
            continue  # the enabled plugin answers it
        elif decision.status in ("plugin", "alias"):
            if decision.plugin in enabled:
                continue  # a switch that enabling the plugin already answers
            problems.add("keys", (
                f"axolotl key `{where}{key}` needs host plugin `{decision.plugin}`: add {decision.plugin} to "
                f"`plugins:` (pip install host-plugin-{decision.plugin.replace('_', '-')})."
            ))
        else:
            problems.add("datasets" if entry else "keys", f"axolotl key `{where}{key}` is not supported by host: {decision.why}.")
    if noops:
        problems.warnings.append(f"ignored axolotl keys that do nothing at these values: {', '.join(noops)}.")
    return out


def validate(data: dict[str, Any], pm, source: str = "config") -> HostConfig:
    """Validate raw YAML data: merged schema, dataset entries, host rules and plugin rules
    (whose warnings are logged). Raises one ConfigError listing every problem."""
    cfg, warnings = validate_with_warnings(data, pm, source)
    for w in warnings:
        log.warning(w)
    return cfg


def validate_with_warnings(
    data: dict[str, Any], pm, source: str = "config", problems: Problems | None = None
) -> tuple[HostConfig, list[str]]:
    """:func:`validate`, returning the warnings instead of logging them.

    Collects every problem before raising: keys (pydantic, with axolotl's keys classified by
    :mod:`host.axolotl_keys`), dataset entries, host rules and each plugin's ``validate_config``.
    Rules run on the keys that did validate, so a bad key does not hide a broken combination.
    """
    problems = Problems(source) if problems is None else problems
    model = merged_model(pm)
    enabled = [name for name, _ in pm.list_name_plugin()]
    entries = data.get("datasets") or []
    if not isinstance(entries, list):
        problems.add("keys", f"key 'datasets' must be a list of entries, got {type(entries).__name__}.")
        entries = []
    elif "datasets" in data and not entries:
        problems.add("datasets", "datasets: the list is empty; add at least one entry (path and type).")
    data, renamed, errors = model_keys.normalize(data)  # model_config, flash_attention: axolotl's other spellings
    problems.warnings += renamed
    for message in errors:
        problems.add("keys", message)
    top = drop_nulls(screen_axolotl_keys({k: v for k, v in data.items() if k != "datasets"}, set(model.model_fields), enabled, problems))
    try:
        cfg = model.model_validate({**top, "datasets": []})
    except ValidationError as exc:
        bad = set()
        for err in exc.errors():
            problems.add("keys", _key_error(err, model))
            if err["loc"]:
                bad.add(err["loc"][0])
        try:  # the rules still run on what is valid
            cfg = model.model_validate({k: v for k, v in top.items() if k not in bad} | {"datasets": []})
        except ValidationError:
            cfg = None
    types = dataset_type_models(pm)
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            problems.add("datasets", f"datasets[{i}]: each entry must be a mapping (path, type, ...), got {entry!r}.")
            continue
        kind = entry.get("type")
        if kind not in types:
            close = difflib.get_close_matches(str(kind), list(types), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            problems.add("datasets", (
                f"datasets[{i}].type: unknown dataset type {kind!r}.{hint} "
                f"Known types: {', '.join(sorted(types))} (plugins add more)."
            ))
            continue
        entry_model = types[kind][1]
        entry = drop_nulls(screen_axolotl_keys(entry, set(entry_model.model_fields), enabled, problems, f"datasets[{i}].", entry=True))
        try:
            validated = entry_model.model_validate(entry)
        except ValidationError as exc:
            for err in exc.errors():
                problems.add("datasets", _key_error(err, entry_model, prefix=f"datasets[{i}]."))
            continue
        if cfg is not None:
            cfg.datasets.append(validated)
    warnings = problems.warnings
    if cfg is not None:
        for message in host_rule_errors(cfg):
            problems.add("rules", message)
        problems.warnings += optim_args.environment_warnings(cfg)
        for check in (check_adapter_kind, check_paths):  # each raises its first finding
            try:
                check(cfg, pm, source) if check is check_adapter_kind else check(cfg, source)
            except ConfigError as exc:
                problems.add("rules", str(exc).removeprefix(f"{source}: "))
        warnings = _plugin_rules(pm, cfg, problems)
        try:
            check_patch_overlaps(pm, cfg, source)
        except ConfigError as exc:
            problems.add("rules", str(exc).removeprefix(f"{source}: "))
    problems.raise_if_any()
    return cfg, warnings


def _plugin_rules(pm, cfg, problems: Problems) -> list[str]:
    """Each plugin's ``validate_config``, called one by one so every plugin's error is reported."""
    for impl in reversed(pm.hook.validate_config.get_hookimpls()):  # plugins: order
        try:
            found = impl.function(**{a: cfg for a in impl.argnames})
        except ConfigError as exc:
            problems.add("rules", f"{exc} [plugin {impl.plugin_name}]" if impl.plugin_name != "host" else str(exc))
            continue
        problems.warnings.extend(found or [])
    return problems.warnings


def check_host_rules(cfg: HostConfig, source: str) -> None:
    """Raise the first broken host rule (see :func:`host_rule_errors`)."""
    errors = host_rule_errors(cfg)
    if errors:
        raise ConfigError(f"{source}: {errors[0]}")


def host_rule_errors(cfg: HostConfig) -> list[str]:
    """Rules that span several host keys (plugins add theirs through ``validate_config``); every
    broken rule is returned, each naming its keys and the fix."""
    errors = []
    if cfg.warmup_ratio is not None and cfg.warmup_steps is not None:
        errors.append("warmup_ratio/warmup_steps: set one of them, not both.")
    if cfg.save_steps and cfg.saves_per_epoch:
        errors.append("save_steps/saves_per_epoch: set one of them, not both.")
    if cfg.eval_steps and cfg.evals_per_epoch:
        errors.append("eval_steps/evals_per_epoch: set one of them, not both.")
    errors += _training_key_errors(cfg)
    for rules in (model_keys.rule_errors, optim_args.errors, parallel_sizes.errors, offload.errors):
        errors += rules(cfg)
    if not cfg.fsdp_enabled:
        return errors
    fc = cfg.fsdp_config or FSDPConfig()
    if cfg.fsdp_version == 2:
        used = [k for k in FSDP1_ONLY if getattr(fc, k) is not None]
        strategies = [s for s in (cfg.fsdp if isinstance(cfg.fsdp, list) else []) if s in ("hybrid_shard", "no_shard")]
        if used or strategies:
            errors.append(
                f"fsdp_config: {', '.join(used + strategies)} exist only in FSDP1, but fsdp_version is 2. "
                f"Remove them (FSDP2 prefetches on its own), or set fsdp_version: 1 (deprecated in transformers)."
            )
        if not isinstance(fc.reshard_after_forward, bool):
            errors.append("fsdp_config.reshard_after_forward must be true or false with fsdp_version 2.")
    if fc.version is not None and fc.version != cfg.fsdp_version and "fsdp_version" in cfg.model_fields_set:
        errors.append(f"fsdp_config.fsdp_version ({fc.version}) and fsdp_version ({cfg.fsdp_version}) disagree; keep one.")
    if cfg.ddp_find_unused_parameters or cfg.ddp_bucket_cap_mb or cfg.ddp_broadcast_buffers is not None:
        errors.append("ddp_* options apply to DDP, not FSDP; remove them or disable fsdp.")
    return errors


def _training_key_errors(cfg: HostConfig) -> list[str]:
    """Rules for axolotl's training keys (adapter targets, checkpoints, early stopping)."""
    errors = []
    if cfg.adapter and not (cfg.lora_target_modules or cfg.lora_target_parameters or cfg.lora_target_linear or cfg.lora_model_dir):
        errors.append(
            f"adapter: {cfg.adapter} has nothing to target; set lora_target_linear: true (every linear layer), "
            "lora_target_modules (e.g. [q_proj, v_proj]) and/or lora_target_parameters (MoE experts)."
        )
    if cfg.lora_model_dir:
        if not cfg.adapter:
            errors.append("lora_model_dir: set adapter (e.g. lora) to train a saved adapter further, or remove lora_model_dir.")
        elif not (Path(cfg.lora_model_dir) / "adapter_config.json").is_file():
            errors.append(
                f"lora_model_dir: {cfg.lora_model_dir!r} holds no adapter_config.json; point it at a saved peft "
                "adapter (an earlier run's output_dir), or remove it to start a fresh adapter."
            )
    if cfg.save_strategy == "no" and (cfg.save_steps or cfg.saves_per_epoch or cfg.save_total_limit):
        errors.append("save_strategy: 'no' writes no checkpoints; remove save_steps/saves_per_epoch/save_total_limit or the strategy.")
    if cfg.save_strategy == "epoch" and (cfg.save_steps or cfg.saves_per_epoch):
        errors.append("save_strategy: 'epoch' saves once per epoch; remove save_steps/saves_per_epoch or set save_strategy: steps.")
    if cfg.save_strategy == "steps" and not (cfg.save_steps or cfg.saves_per_epoch):
        errors.append("save_strategy: 'steps' needs save_steps or saves_per_epoch.")
    from host import deepspeed_json

    errors += deepspeed_json.errors(cfg)
    for key, package in (("wandb_project", "wandb"), ("use_tensorboard", "tensorboard")):
        if getattr(cfg, key) and cfg.wandb_mode != "disabled" and importlib.util.find_spec(package) is None:
            errors.append(f"{key}: the {package} package is not installed; pip install 'host[logging]' (or {package}).")
    if cfg.sample_packing_sequentially and not cfg.sample_packing:
        errors.append("sample_packing_sequentially: only orders sample_packing's bins; set sample_packing: true or remove it.")
    if cfg.early_stopping_patience and not cfg.val_set_size:
        errors.append("early_stopping_patience: needs evaluation; set val_set_size (e.g. 0.05) or remove it.")
    return errors


def build_plugins_collecting(names: list[str], problems: Problems):
    """``(manager, enabled names)``: each plugin that cannot load (unknown, failing import, missing or
    late requirement) is reported and left out, so the rest of the config is still checked against
    the plugins that do load."""
    import re

    from host.plugins import build_plugin_manager

    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        problems.add("plugins", f"{', '.join(dupes)} listed more than once; list each plugin once.")
    names = list(dict.fromkeys(names))
    while True:
        try:
            return build_plugin_manager(names), names
        except PluginError as exc:
            problems.add("plugins", str(exc), exc)
            culprit = next((n for n in re.findall(r"'([^']+)'", str(exc)) if n in names), None)
            if culprit is None:
                return build_plugin_manager([]), []
            names = [n for n in names if n != culprit]


def load_config(path: str | Path, overrides: dict[str, Any] | None = None):
    """Read, build the plugin manager for, and validate a config file.

    Returns ``(cfg, pm, warnings)``. ``overrides`` replace top-level keys (used by tests).
    """
    data = read_yaml(path)
    data.update(overrides or {})
    problems = Problems(str(path))
    plugins = data.get("plugins") or []
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        problems.add("plugins", f"key 'plugins' must be a list of plugin names, got {plugins!r}.")
        plugins = []
    from host.axolotl_keys import enabled_by_keys, resolve_plugins
    from host.plugins import _entry_points

    plugins, plugin_problems, notes = resolve_plugins(plugins, set(_entry_points()))
    plugins, enabled_notes = enabled_by_keys(data, plugins)
    problems.warnings += notes + enabled_notes
    for message in plugin_problems:
        problems.add("plugins", message)
    pm, plugins = build_plugins_collecting(plugins, problems)
    data = {**data, "plugins": plugins}
    cfg, warnings = validate_with_warnings(data, pm, source=str(path), problems=problems)
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
