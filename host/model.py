"""Load tokenizer, processor and model with transformers, and attach a peft adapter."""

from __future__ import annotations

import logging
from typing import Any

from host import model_keys
from host.errors import ConfigError, PluginError

log = logging.getLogger("host.model")


def use_bf16(cfg) -> bool:
    import torch

    if cfg.bf16 == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(cfg.bf16)


def load_tokenizer_and_processor(cfg) -> tuple[Any, Any]:
    """The processor (when ``processor_type`` is set) and its tokenizer, or a plain tokenizer."""
    import transformers

    source = cfg.tokenizer or cfg.base_model
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    processor = None
    try:
        if cfg.processor_type:
            cls = getattr(transformers, cfg.processor_type, None)
            if cls is None:
                raise ConfigError(f"processor_type: transformers has no class {cfg.processor_type!r}; try AutoProcessor.")
            processor = cls.from_pretrained(cfg.base_model, **kwargs)
            tokenizer = getattr(processor, "tokenizer", None) or transformers.AutoTokenizer.from_pretrained(source, **kwargs)
        else:
            tokenizer = transformers.AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"tokenizer/base_model: cannot load a tokenizer from {source!r}: {exc}") from None
    from host.tokens import apply_to_tokenizer

    apply_to_tokenizer(cfg, tokenizer)  # chat_template, special_tokens, eot_tokens, tokens
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, processor


def plugin_init_kwargs(cfg, pm, purpose: str) -> dict[str, Any]:
    """The plugins' ``model_init_kwargs`` answers, merged; a key given twice is an error naming both."""
    host_keys = model_keys.host_kwarg_keys(cfg)
    owners: dict[str, str] = {}
    merged: dict[str, Any] = {}
    for impl in reversed(pm.hook.model_init_kwargs.get_hookimpls()):  # plugins: order
        args = {"cfg": cfg, "purpose": purpose}
        answer = impl.function(**{a: args[a] for a in impl.argnames})
        for key, value in (answer or {}).items():
            if key in host_keys:
                raise PluginError(
                    f"plugins: {impl.plugin_name!r} sets from_pretrained argument {key!r}, which {host_keys[key]} "
                    f"sets too; remove {host_keys[key]} or disable {impl.plugin_name!r}."
                )
            if key in owners:
                raise PluginError(
                    f"plugins: from_pretrained argument {key!r} is set by both {owners[key]!r} and "
                    f"{impl.plugin_name!r}; disable one of them."
                )
            owners[key] = impl.plugin_name
            merged[key] = value
    return merged


def load_model(cfg, extra_kwargs: dict[str, Any] | None = None):
    """Build the model from ``base_model`` (a local dir or hub id) in the training dtype.

    ``extra_kwargs`` (the plugins' ``model_init_kwargs``) may not override the host's own arguments.
    """
    import torch
    import transformers

    kwargs: dict[str, Any] = {
        "trust_remote_code": cfg.trust_remote_code,
        "dtype": torch.bfloat16 if use_bf16(cfg) else torch.float32,
    }
    for key in ("experts_implementation", "attn_implementation"):
        if getattr(cfg, key):
            kwargs[key] = getattr(cfg, key)
    for key in extra_kwargs or {}:
        if key in ("trust_remote_code", "dtype", "experts_implementation", "attn_implementation"):
            raise PluginError(
                f"plugins: from_pretrained argument {key!r} is the host's (set it through its config key, "
                f"not model_init_kwargs)."
            )
    kwargs.update(extra_kwargs or {})
    kwargs.update(model_keys.init_kwargs(cfg))  # overrides_of_model_config, model_quantization_config
    # A processor means a vision-language model: try the image-text class first.
    classes = [transformers.AutoModelForCausalLM, transformers.AutoModelForImageTextToText]
    if cfg.processor_type:
        classes.reverse()
    errors = []
    for cls in classes:
        try:
            return cls.from_pretrained(cfg.base_model, **kwargs)
        except ValueError as exc:  # "Unrecognized configuration class" for this auto class
            errors.append(str(exc).splitlines()[0])
        except OSError as exc:
            raise ConfigError(f"base_model: cannot load a model from {cfg.base_model!r}: {exc}") from None
    raise ConfigError(f"base_model: {cfg.base_model!r} is neither a causal LM nor an image-text model: {errors}")


def linear_module_names(model) -> list[str]:
    """Leaf names of every linear layer but the output head: what ``lora_target_linear`` targets."""
    import torch

    head = model.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear) and mod is not head}
    return sorted(names)


def attach_adapter(cfg, model, tokenizer=None):
    """Wrap ``model`` with LoRA when ``adapter`` is set (``lora`` or a plugin's LoRA-based kind), fresh
    or loaded from ``lora_model_dir`` (trainable); leave it for full fine-tuning otherwise. Tokens the
    config added to ``tokenizer`` train their embedding rows (see host.tokens)."""
    if cfg.adapter is None:
        return model
    from peft import LoraConfig, PeftModel, get_peft_model

    from host.tokens import save_token_rows_only, trainable_token_indices

    targets = cfg.lora_target_modules or []
    if cfg.lora_target_linear and targets != "all-linear":
        targets = sorted(set(linear_module_names(model)) | set([targets] if isinstance(targets, str) else targets))
    if not targets and not cfg.lora_target_parameters and not cfg.lora_model_dir:
        raise ConfigError(
            f"lora_target_modules: adapter is {cfg.adapter} but no targets are set; set lora_target_linear: true, "
            "lora_target_modules (e.g. [q_proj, v_proj] or all-linear) and/or lora_target_parameters."
        )
    token_rows = trainable_token_indices(cfg, model, tokenizer) if tokenizer is not None else None
    try:
        if cfg.lora_model_dir:
            log.info("loading LoRA adapter from %s (trainable)", cfg.lora_model_dir)
            model = PeftModel.from_pretrained(model, cfg.lora_model_dir, is_trainable=True)
        else:
            lora = LoraConfig(
                exclude_modules=model_keys.lora_exclude(cfg, model),  # freeze_mm_modules: no LoRA on vision/audio towers
                r=cfg.lora_r,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                target_modules=targets,
                target_parameters=cfg.lora_target_parameters or None,
                modules_to_save=cfg.lora_modules_to_save,
                trainable_token_indices=token_rows,
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(model, lora)
    except ValueError as exc:
        raise ConfigError(f"lora_target_modules/lora_target_parameters/lora_model_dir: {exc}") from None
    if token_rows and not cfg.lora_model_dir:
        save_token_rows_only(model)
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def load_tokenizer_phase(cfg, pm) -> tuple[Any, Any]:
    """The first half of the model phase: ``pre_model_load``, then tokenizer and processor (no
    weights yet), so data can be prepared and checked before the slow part."""
    pm.hook.pre_model_load(cfg=cfg)
    return load_tokenizer_and_processor(cfg)


def load_model_phase(cfg, pm, tokenizer):
    """The second half: load the weights (with the plugins' model_init_kwargs), resize embeddings
    for added tokens, ``post_model_load``, attach the adapter, ``post_model_build``, then freeze what
    ``unfrozen_parameters``/``freeze_mm_modules`` say."""
    from host.tokens import fit_embeddings

    model = load_model(cfg, plugin_init_kwargs(cfg, pm, "train"))
    fit_embeddings(model, tokenizer)
    pm.hook.post_model_load(cfg=cfg, model=model)
    model = attach_adapter(cfg, model, tokenizer)
    pm.hook.post_model_build(cfg=cfg, model=model)
    model_keys.apply_freezing(cfg, model)  # unfrozen_parameters, freeze_mm_modules
    return model


def build(cfg, pm):
    """Run the model phase of the lifecycle: pre_model_load, tokenizer, load (with the plugins'
    model_init_kwargs), post_model_load, adapter, post_model_build."""
    tokenizer, processor = load_tokenizer_phase(cfg, pm)
    return load_model_phase(cfg, pm, tokenizer), tokenizer, processor
