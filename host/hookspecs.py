"""The plugin API: every hook a plugin may implement, grouped by lifecycle phase.

This module is the whole contract between the host and its plugins. A plugin is a module
(named by a ``host.plugins`` entry point) whose functions carry ``@host.hookimpl`` and whose
names match the specs below. Implement only the hooks you need; arguments may be omitted from
an implementation's signature (pluggy passes only those it asks for).

Call order: hooks are called in the order of the config's ``plugins:`` list, then the host's
built-in plugin. Broadcast hooks run every implementation; "firstresult" hooks stop at the
first non-``None`` answer.

A plugin module may also define ``REQUIRES = ["other_plugin", ...]``: plugins that must be
enabled (and listed before it) for it to work. The host checks this before anything loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import pluggy

if TYPE_CHECKING:
    from pydantic import BaseModel

    from host.config import DatasetConfig, HostConfig

hookspec = pluggy.HookspecMarker("host")


# --- configuration -------------------------------------------------------------------------


@hookspec
def config_model() -> type[BaseModel] | None:
    """Return a pydantic model whose fields are this plugin's top-level config keys.

    Called once per run, before the YAML is validated. The host merges the models of all enabled
    plugins with its own; a key declared by two plugins (or by a plugin and the host) is an error
    naming both. Unknown keys in the YAML remain errors, so a plugin that owns keys must declare
    them here. Give every field a default so configs without the plugin's keys still validate.
    """


@hookspec
def dataset_types() -> dict[str, type[BaseModel]] | None:
    """Return ``{type_name: entry_model}`` for every ``datasets[].type`` this plugin owns.

    ``entry_model`` subclasses :class:`host.config.DatasetConfig` and declares the entry's extra
    keys; the host validates each ``datasets:`` entry against its type's model at config time (so
    ``host validate`` catches a bad entry without loading a tokenizer). Two plugins declaring the
    same type is an error naming both.
    """


@hookspec
def validate_config(cfg: HostConfig) -> list[str] | None:
    """Check rules that span several keys, after pydantic validation and before any model loads.

    Raise :class:`host.errors.ConfigError` naming the key and the fix for an invalid combination;
    return a list of warning strings for allowed-but-risky ones (the host logs them). Exists
    because a plugin's rules often depend on host keys (``torch_compile``, ``datasets``) that its
    own config model cannot see.
    """


@hookspec
def patched_targets(cfg: HostConfig) -> dict[str, str] | None:
    """Declare what this plugin will replace in the model for this config: ``{target: keys}``.

    ``target`` names the computation patched: the dotted name of the transformers class,
    function or method replaced (``"transformers.models.gemma4.modeling_gemma4.Gemma4RMSNorm"``),
    or, for a patch that applies to whatever family loads, one of these shared names:
    ``"moe.experts.forward"`` (the expert MLPs of an MoE layer). ``keys`` names the config key(s)
    that turn the patch on (``"gemma4_fused_norm_rope"``), so the user knows what to switch off;
    ``""`` means enabling the plugin is what patches it.

    Called after ``validate_config``, before any model loads, with the validated config. When two
    enabled plugins declare the same target the host raises a ``ConfigError`` naming both plugins
    and their keys: two patches of one module are never applied silently in some order. Declare
    only what this config actually patches (return ``None`` or ``{}`` when the plugin is inactive).
    """


@hookspec
def adapter_kinds() -> list[str] | None:
    """Return the ``adapter:`` values this plugin adds to the host's ``lora``.

    Called once per run, before the YAML is validated. A plugin kind is peft LoRA (built from
    the ``lora_*`` keys, like ``lora``) on a base model that the plugin changes while it loads
    (``model_init_kwargs``) and before the adapter is attached (``post_model_load``); the plugin
    owns the kind's rules in ``validate_config``. A kind declared by two plugins (or ``lora``) is
    an error naming both; an ``adapter:`` value that no enabled plugin declares is a config error.
    Exists so that e.g. ``adapter: qlora`` validates only when the plugin that implements it is on.
    """


# --- model ---------------------------------------------------------------------------------


@hookspec
def pre_model_load(cfg: HostConfig) -> None:
    """Called before the model is built (and before the tokenizer/processor are loaded).

    Broadcast, in ``plugins:`` order. Use it for patches that must precede construction:
    registering an experts implementation, setting Inductor flags, planning quantization.
    """


@hookspec
def model_init_kwargs(cfg: HostConfig, purpose: str) -> dict[str, Any] | None:
    """Return extra keyword arguments for the base model's ``from_pretrained``.

    Called after ``pre_model_load``, each time the host loads the base model; ``purpose`` is
    ``"train"`` or ``"merge"`` (``host merge-lora``, which folds LoRA into dense weights, so a
    plugin may leave a training-only option such as quantization out). Answers are merged; a key
    given by two plugins, or one the host sets itself (``dtype``, ``trust_remote_code``,
    ``experts_implementation``, ``attn_implementation``; ``quantization_config`` when
    ``model_quantization_config`` is set, ``config`` when ``overrides_of_model_config`` is), is an
    error naming both. Exists because
    loading options (``quantization_config``, ``device_map``) must be known when the weights are
    read: patching the model afterwards would hold it in full precision first.
    """


@hookspec
def post_model_load(cfg: HostConfig, model: Any) -> None:
    """Called once the base model is loaded, before the adapter is attached (train and merge-lora).

    Broadcast, in ``plugins:`` order; mutate ``model`` in place. Use it for what peft needs done
    before ``get_peft_model``/``PeftModel.from_pretrained``: e.g. preparing a quantized model for
    k-bit training (freezing, upcasting the weights that stay unquantized). Gradient checkpointing
    is the host's (``gradient_checkpointing``): don't enable it here.
    """


@hookspec
def post_model_build(cfg: HostConfig, model: Any) -> None:
    """Called once the model (and its peft adapter, when ``adapter`` is set) exists.

    Broadcast, in ``plugins:`` order. Mutate ``model`` in place: swap modules, wrap weights,
    convert LoRA layouts. It runs before the Trainer is created, so optimizer groups see the
    result.
    """


# --- data ----------------------------------------------------------------------------------


@runtime_checkable
class DatasetStrategy(Protocol):
    """What ``dataset_strategy`` returns: turns one ``datasets:`` entry into tokenized rows.

    **Rows.** ``load()`` returns a ``datasets.Dataset`` (the host caches it) or a
    ``datasets.IterableDataset`` (streamed, not cached). Every row must have:

    - ``input_ids``: a non-empty list of ints, each in ``[0, len(tokenizer))``;
    - ``labels``: a list of ints of the same length: the token to learn at that position (the
      same id as ``input_ids``; the model shifts labels itself), or ``-100`` for "no loss here"
      (prompts, padding, image tokens);
    - optionally ``attention_mask`` (0/1, same length; all ones when absent) and other
      per-token columns (``position_ids``, ``token_type_ids``) of the same length. Other columns
      (e.g. image references) are kept as they are for your collator.

    **What the host does with them, for every type** (so a strategy must not do it itself):
    it checks each row against the rules above and raises :class:`host.errors.DataError` naming
    the plugin, the ``datasets[i]`` entry and the row when one breaks them; it applies
    ``sequence_len`` with ``excess_length_strategy`` (``drop`` / ``truncate`` / ``raise``, on the
    per-token columns) and refuses a dataset with no trainable (non ``-100``) label left.

    **Bad input.** Raise :class:`host.errors.DataError` for a row or file you cannot use, with a
    message naming the entry (``datasets[i] (path)``), the file, the row number (counted from 0)
    and the field, and the fix. :func:`host.data.load_raw` loads an entry's local files or hub
    dataset with errors of that kind (special files, bad UTF-8/JSON, a model directory given as
    data); :func:`host.data.require_columns` checks columns.

    **Caching.** The prepared-data cache key covers the entry's keys (its subclass fields
    included), its files' contents, the tokenizer, ``sequence_len``, the length policy, the
    enabled plugins' versions, the source code of the package that defines your strategy class,
    and :meth:`fingerprint`.
    """

    def fingerprint(self) -> dict[str, Any]:
        """Anything beyond the entry, its files, the tokenizer, ``sequence_len`` and your code that
        changes the output (e.g. a processor's settings). JSON-serialisable."""

    def load(self) -> Any:
        """Return a ``datasets.Dataset`` or ``datasets.IterableDataset`` of rows as described above."""


@hookspec(firstresult=True)
def dataset_strategy(
    cfg: HostConfig, dataset_cfg: DatasetConfig, tokenizer: Any, processor: Any
) -> DatasetStrategy | None:
    """Return the :class:`DatasetStrategy` that turns one ``datasets:`` entry into tokenized rows,
    or ``None`` when ``dataset_cfg.type`` is not yours.

    Called once per entry, after ``dataset_types`` proved that exactly one plugin owns the type,
    and before the model's weights are loaded (so data errors appear early). ``tokenizer`` already
    holds the config's added tokens (``special_tokens``, ``eot_tokens``, ``tokens``) and its
    ``chat_template``; ``processor`` is ``None`` unless ``processor_type`` is set. See
    README "Writing a dataset type" for a complete example.
    """


@hookspec(firstresult=True)
def collator(cfg: HostConfig, tokenizer: Any, processor: Any) -> Any | None:
    """Return a data collator (a callable from a list of rows to a batch dict) or ``None``.

    The first plugin (in ``plugins:`` order) that answers wins; the host's padding collator is
    used when none does. With ``sample_packing`` (or ``eval_sample_packing``) on, the host batches
    packed rows with its own collator and an answer here is an error: return ``None`` when
    ``cfg.sample_packing`` is set, or refuse packing in ``validate_config``.
    """


# --- training ------------------------------------------------------------------------------


@hookspec
def trainer_callbacks(cfg: HostConfig) -> list[Any] | None:
    """Return a list of ``transformers.TrainerCallback`` instances for this run.

    Every plugin's lists are concatenated in ``plugins:`` order, after the host's own callbacks.
    Use ``on_train_begin`` / ``on_train_end`` to apply and undo process-wide settings around
    training. Gradient norms: in ``on_log``, ``logs["grad_norm"]`` is the total norm *before*
    clipping and ``logs["grad_norm_clipped"]`` the norm the optimizer step uses (after clipping to
    ``max_grad_norm``); in ``on_pre_optimizer_step`` the gradients on ``kwargs["model"]`` are
    already clipped. Import transformers inside this hook (or in a submodule it imports), not at
    the plugin's top level: ``host validate`` imports the plugin and should stay fast.
    """
