"""axolotl's model-side keys: which weights train, config overrides, quantization config, legacy switches.

- ``unfrozen_parameters``: regexes of parameter names that train; every other parameter is frozen.
  Written as axolotl reads them: a ``.`` is a literal dot unless followed by ``+``; a pattern matches
  from the start of the name (``re.match``); an optional ``[start:end]`` suffix trains only those rows
  (dim 0) of the matched parameter, by zeroing the other rows' gradients. With an adapter the names
  are the base model's (no peft ``base_model.model.`` prefix) and the patterns limit which adapter
  weights train; base weights stay frozen (the saved adapter holds only adapter weights).
- ``freeze_mm_modules``: freeze every module outside the language model (vision/audio towers,
  projectors), found through transformers' ``get_decoder()`` and the input/output embeddings, with no
  list of family names; with an adapter, LoRA is not attached there either.
- ``overrides_of_model_config`` (axolotl also spells it ``model_config``): set on the model's config
  before the model is built; an attribute the config does not have is an error (a typo would
  otherwise change nothing).
- ``model_quantization_config`` + ``..._kwargs``: a transformers quantization-config class, built
  with the kwargs and passed to ``from_pretrained`` as ``quantization_config``.
- ``flash_attention: true``: axolotl's legacy spelling of ``attn_implementation: flash_attention_2``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from host.errors import ConfigError

log = logging.getLogger("host.model_keys")

_RANGE = re.compile(r"^(.+)\[([0-9]*)(?::([0-9]*))?\]$")


class ParamPattern:
    """One ``unfrozen_parameters`` entry (axolotl's syntax, see the module docstring)."""

    def __init__(self, raw: str):
        self.raw = raw
        body, self.rows = raw, None
        found = _RANGE.match(raw)
        if found:
            body, start, end = found.groups()
            if end is None and start.isdecimal():
                self.rows = (int(start), int(start) + 1)
            else:
                self.rows = (int(start) if start else 0, int(end) if end else None)
                if self.rows[1] is not None and self.rows[0] >= self.rows[1]:
                    raise ValueError(f"{raw!r}: the row range [{start}:{end}] is empty (end must be above start)")
        try:
            self.regex = re.compile(re.sub(r"\.(?!\+)", r"\\.", body))
        except re.error as exc:
            raise ValueError(f"{raw!r} is not a valid regular expression ({exc})") from None

    def match(self, name: str) -> bool:
        return self.regex.match(name) is not None


class ModelKeys(BaseModel):
    """The keys of this module, as fields of the host's config (``HostConfig`` inherits them)."""

    model_config = ConfigDict(extra="forbid", validate_default=True, protected_namespaces=())

    unfrozen_parameters: list[str] | None = Field(
        None, description="Regexes of parameter names that train (axolotl's syntax); all others are frozen."
    )
    freeze_mm_modules: bool = Field(False, description="Freeze the vision/audio towers and projectors of a multimodal model.")
    overrides_of_model_config: dict[str, Any] | None = Field(
        None, description="Attributes set on the model's config before it is built (axolotl: model_config)."
    )
    model_quantization_config: str | None = Field(
        None, description="A transformers quantization-config class (e.g. Mxfp4Config), passed as quantization_config."
    )
    model_quantization_config_kwargs: dict[str, Any] | None = Field(None, description="Arguments of that class.")

    @field_validator("unfrozen_parameters")
    @classmethod
    def _patterns(cls, value):
        for raw in value or []:
            ParamPattern(raw)
        return value

    @field_validator("model_quantization_config")
    @classmethod
    def _quant_class(cls, value):
        if value:
            quant_class(value)
        return value

    @field_validator("model_quantization_config_kwargs")
    @classmethod
    def _quant_kwargs(cls, value, info):
        name = info.data.get("model_quantization_config")
        if value and not name:
            raise ValueError("set model_quantization_config too (the class these arguments are for)")
        if name:
            build_quant_config(quant_class(name), value or {})
        return value


def quant_class(name: str):
    """The transformers quantization-config class called ``name`` (imports transformers: only when the key
    is set); ``ValueError`` listing the known ones otherwise."""
    import transformers

    cls = getattr(transformers, name, None)
    if not _is_quant_config(cls):
        from transformers.utils import quantization_config as module  # listing transformers itself would import every model

        exported = set(dir(transformers))
        known = sorted(n for n in dir(module) if n in exported and _is_quant_config(getattr(module, n)))
        raise ValueError(f"transformers {transformers.__version__} has no quantization-config class {name!r}; known: {', '.join(known)}")
    return cls


def build_quant_config(cls, kwargs: dict[str, Any]):
    """``cls(**kwargs)``; an argument ``cls`` does not declare is a ``ValueError`` (these classes take
    ``**kwargs`` and drop what they don't know, so a typo would change nothing)."""
    import inspect

    params = [p.name for p in inspect.signature(cls.__init__).parameters.values()
              if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(f"{cls.__name__} takes no argument {', '.join(map(repr, unknown))}; its arguments: {', '.join(params)}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) fails: {exc}") from None


def _is_quant_config(obj) -> bool:
    from transformers.utils.quantization_config import QuantizationConfigMixin

    return isinstance(obj, type) and issubclass(obj, QuantizationConfigMixin) and obj is not QuantizationConfigMixin


# --- before validation: axolotl's other spellings ------------------------------------------------


def normalize(data: dict[str, Any]) -> tuple[dict[str, Any], list[str], list[str]]:
    """``(data, warnings, errors)``: axolotl's ``model_config`` read as ``overrides_of_model_config`` and
    ``flash_attention: true`` as ``attn_implementation: flash_attention_2``, each with one warning."""
    data, warnings, errors = dict(data), [], []
    if data.get("model_config") is not None:
        alias = data.pop("model_config")
        if not isinstance(alias, dict):
            errors.append(f"model_config: expected a mapping of config attributes (e.g. output_router_logits: true), got {alias!r}.")
        elif data.get("overrides_of_model_config") not in (None, alias):
            errors.append("model_config/overrides_of_model_config: two spellings of one key with different values; keep one.")
        else:
            data["overrides_of_model_config"] = alias
    else:
        data.pop("model_config", None)
    if data.get("flash_attention") is True:
        data.pop("flash_attention")
        impl = data.get("attn_implementation")
        if impl not in (None, "flash_attention_2"):
            errors.append(
                f"flash_attention: true means attn_implementation: flash_attention_2, but attn_implementation is "
                f"{impl!r}; remove flash_attention (axolotl's legacy switch)."
            )
        else:
            data["attn_implementation"] = "flash_attention_2"
            warnings.append("flash_attention: read as attn_implementation: flash_attention_2 (axolotl's legacy switch).")
    return data, warnings, errors


def rule_errors(cfg) -> list[str]:
    """Rules across keys, checked by ``host validate``."""
    errors = []
    if cfg.unfrozen_parameters and (cfg.gradient_checkpointing_kwargs or {}).get("use_reentrant") is True:
        errors.append(
            "gradient_checkpointing_kwargs.use_reentrant: must be false with unfrozen_parameters (reentrant "
            "checkpointing gives frozen inputs no gradient); set it to false or remove it."
        )
    ranged = [raw for raw in cfg.unfrozen_parameters or [] if ParamPattern(raw).rows is not None]
    if ranged and (cfg.fsdp_enabled or cfg.deepspeed):
        errors.append(
            f"unfrozen_parameters: the row range of {', '.join(map(repr, ranged))} is applied by a gradient hook on the "
            "parameter, which FSDP/DeepSpeed replace with sharded ones; drop the [start:end] suffix or train without them."
        )
    if cfg.overrides_of_model_config and Path(cfg.base_model).is_dir():
        try:
            model_config(cfg)
        except ConfigError as exc:
            errors.append(str(exc))
        except Exception:  # noqa: BLE001 - an unreadable config is reported when the model loads
            pass
    return errors


# --- loading --------------------------------------------------------------------------------------


def model_config(cfg):
    """The base model's transformers config with ``overrides_of_model_config`` applied, or ``None`` when
    no override is set. An attribute that neither the config nor its text config has is an error."""
    if not cfg.overrides_of_model_config:
        return None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(cfg.base_model, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"base_model: cannot read the model config of {cfg.base_model!r}: {exc}") from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key, value in cfg.overrides_of_model_config.items():
        if _has(config, key):
            setattr(config, key, value)
        elif text is not config and _has(text, key):
            setattr(text, key, value)  # e.g. output_router_logits of a multimodal MoE lives in text_config
        else:
            raise ConfigError(
                f"overrides_of_model_config (model_config): {type(config).__name__} has no attribute {key!r}; "
                f"check the spelling against the model's config.json (nothing would change otherwise)."
            )
    return config


def _has(obj, key: str) -> bool:
    try:
        getattr(obj, key)
    except Exception:  # noqa: BLE001 - e.g. per-layer attributes that raise on plain access
        return False
    return True


def host_kwarg_keys(cfg) -> dict[str, str]:
    """``{from_pretrained argument: the key that sets it}`` for this config (a plugin may not set them too)."""
    out = {}
    if cfg.overrides_of_model_config:
        out["config"] = "overrides_of_model_config (model_config)"
    if cfg.model_quantization_config:
        out["quantization_config"] = "model_quantization_config"
    return out


def init_kwargs(cfg) -> dict[str, Any]:
    """``from_pretrained`` arguments these keys add: ``config`` and ``quantization_config``."""
    out = {}
    config = model_config(cfg)
    if config is not None:
        out["config"] = config
    if cfg.model_quantization_config:
        try:
            cls = quant_class(cfg.model_quantization_config)
            out["quantization_config"] = build_quant_config(cls, cfg.model_quantization_config_kwargs or {})
        except ValueError as exc:
            raise ConfigError(f"model_quantization_config: {exc}") from None
    return out


# --- after the model (and adapter) is built -------------------------------------------------------


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def language_params(model) -> set[int]:
    """ids of the parameters of the language model: ``get_decoder()``, input and output embeddings."""
    base = _base(model)
    keep = [m for m in (getattr(base, "get_decoder", lambda: None)(), base.get_input_embeddings(), base.get_output_embeddings())
            if m is not None]
    return {id(p) for m in keep for p in m.parameters()}


def multimodal_modules(model) -> list[str]:
    """Names (relative to the base model) of the outermost modules that hold no language-model parameter:
    vision/audio towers and projectors. Empty for a text-only model."""
    base = _base(model)
    keep = language_params(base)
    out = []

    def walk(module, prefix):
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            ids = {id(p) for p in child.parameters()}
            if not ids:
                continue
            if ids.isdisjoint(keep):
                out.append(full)
            elif not ids <= keep:
                walk(child, full + ".")

    walk(base, "")
    return out


def lora_exclude(cfg, model) -> str | None:
    """peft's ``exclude_modules`` (a full-match regex) keeping LoRA off the multimodal modules."""
    if not cfg.freeze_mm_modules:
        return None
    names = multimodal_modules(model)
    return rf"^({'|'.join(re.escape(n) for n in names)})(\..*)?$" if names else None


def apply_freezing(cfg, model) -> None:
    """``unfrozen_parameters`` then ``freeze_mm_modules`` (axolotl's order), on the built model."""
    if not (cfg.unfrozen_parameters or cfg.freeze_mm_modules):
        return
    if cfg.unfrozen_parameters:
        _unfreeze_only(cfg, model)
    if cfg.freeze_mm_modules:
        names = multimodal_modules(model)
        if not names:
            log.warning("freeze_mm_modules: %s has no modules outside its language model; nothing frozen.", type(_base(model)).__name__)
        keep = language_params(model)
        frozen = 0
        for p in model.parameters():
            if id(p) not in keep and p.requires_grad:
                p.requires_grad_(False)
                frozen += p.numel()
        log.info("freeze_mm_modules: froze %s (%d trainable parameters)", ", ".join(names) or "nothing", frozen)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("unfrozen_parameters/freeze_mm_modules: no trainable parameter is left; widen the patterns.")
    _inputs_need_grad(cfg, model)


def _unfreeze_only(cfg, model) -> None:
    patterns = [ParamPattern(raw) for raw in cfg.unfrozen_parameters]
    base = _base(model)
    adapter = base is not model
    names: dict[int, list[str]] = {}
    params = {}
    for name, p in base.named_parameters(remove_duplicate=False):  # tied weights answer to every name
        names.setdefault(id(p), []).append(name)
        params[id(p)] = p
    hits = {pat.raw: [] for pat in patterns}
    for pid, p in params.items():
        matched = [pat for pat in patterns if any(pat.match(n) for n in names[pid])]
        for pat in matched:
            hits[pat.raw].append(pid)
        if adapter:  # base weights stay frozen: only what the adapter made trainable may train
            p.requires_grad_(bool(matched) and p.requires_grad)
        else:
            p.requires_grad_(bool(matched))
        rows = [pat.rows for pat in matched if pat.rows is not None]
        if p.requires_grad and rows and len(rows) == len(matched):
            _train_rows_only(p, rows, names[pid][0])
    all_names = [n for ns in names.values() for n in ns]
    for raw, pids in hits.items():
        if not pids:
            sample = ", ".join(all_names[:3] + all_names[-2:])
            raise ConfigError(
                f"unfrozen_parameters: {raw!r} matches no parameter of {type(base).__name__} (names look like: {sample}). "
                "A '.' is a literal dot (write '.+' for any text); a pattern matches from the start of the name."
            )
        if adapter and not any(params[pid].requires_grad for pid in pids):
            log.warning(
                "unfrozen_parameters: %r matches only base weights, which stay frozen with adapter: %s (the adapter is "
                "what trains); list the module in lora_modules_to_save to train it fully.", raw, cfg.adapter,
            )


def _train_rows_only(param, ranges, name: str) -> None:
    """Zero the gradient of every row of ``param`` outside ``ranges`` (axolotl's ``[start:end]``)."""
    size = param.shape[0]
    spans = sorted((start, size if end is None else end) for start, end in ranges)
    for start, end in spans:
        if start < 0 or end > size or start >= end:
            raise ConfigError(f"unfrozen_parameters: rows [{start}:{end}] are outside {name} ({size} rows).")
    frozen, at = [], 0
    for start, end in spans:
        if start > at:
            frozen.append((at, start))
        at = max(at, end)
    if at < size:
        frozen.append((at, size))

    def hook(grad):
        grad = grad.clone()
        for start, end in frozen:
            grad[start:end] = 0
        return grad

    param.register_hook(hook)


def _inputs_need_grad(cfg, model) -> None:
    """With gradient checkpointing, frozen input embeddings must still pass a gradient into the layers."""
    if not cfg.gradient_checkpointing:
        return
    emb = _base(model).get_input_embeddings()
    if emb is not None and not any(p.requires_grad for p in emb.parameters()):
        model.enable_input_require_grads()
