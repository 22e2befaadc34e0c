"""``optim_args``: extra settings for the optimizer (axolotl's key, transformers' ``TrainingArguments.optim_args``).

axolotl accepts a mapping (``{bf16_stochastic_round: true}``) or transformers' own ``"k=v,k=v"`` string
and hands it to transformers, whose optimizer factory reads the settings it knows for the chosen
``optimizer`` (e.g. ``block_size``/``bf16_stochastic_round`` for ``adamw_torch_8bit``, torchao's AdamW8bit;
``momentum``/``nesterov`` for ``sgd``). Some optimizers read none (``adamw_torch``): a setting that does not
reach the optimizer is named in one warning when training starts.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

log = logging.getLogger("host.train")

#: transformers optimizer names -> the package they need (checked at validation, before any weights load)
PACKAGES = {
    "adamw_torch_4bit": ("torchao", "torchao"),
    "adamw_torch_8bit": ("torchao", "torchao"),
    **dict.fromkeys(
        ("adamw_bnb_8bit", "adamw_8bit", "paged_adamw", "paged_adamw_8bit", "paged_adamw_32bit", "lion_8bit",
         "lion_32bit", "paged_lion", "paged_lion_8bit", "paged_lion_32bit", "ademamix", "ademamix_8bit",
         "paged_ademamix", "paged_ademamix_8bit", "paged_ademamix_32bit", "rmsprop_bnb", "rmsprop_bnb_8bit",
         "rmsprop_bnb_32bit"),
        ("bitsandbytes", "bitsandbytes"),
    ),
}


def package_for(optimizer: str) -> tuple[str, str] | None:
    """``(module, pip name)`` an optimizer of transformers needs, or None."""
    return PACKAGES.get(optimizer)


def parse(value: str | dict[str, Any] | None) -> dict[str, str]:
    """``{key: value}`` as transformers will read them; ValueError (naming what is wrong) for a bad value."""
    if value is None:
        return {}
    if isinstance(value, str):
        pairs = {}
        for part in value.replace(" ", "").split(","):
            if not part:
                continue
            if part.count("=") != 1 or not part.split("=")[0]:
                raise ValueError(f"{part!r} is not key=value; write a mapping (optim_args: {{key: value}}) or 'k1=v1,k2=v2'")
            k, v = part.split("=")
            pairs[k] = v
        return pairs
    out = {}
    for k, v in value.items():
        if isinstance(v, (dict, list, tuple)) or v is None:
            raise ValueError(f"{k}: {v!r} is not a single value (a number, true/false or a word)")
        text = str(v)
        if any(c in text for c in ",= ") or any(c in str(k) for c in ",= "):
            raise ValueError(f"{k}: {v!r} holds ',', '=' or a space, which transformers' k=v,k=v format cannot carry")
        out[str(k)] = text
    return out


def errors(cfg) -> list[str]:
    """Validation rule: a readable ``optim_args``."""
    try:
        parse(cfg.optim_args)
    except ValueError as exc:
        return [f"optim_args: {exc}."]
    return []


def missing_package(cfg) -> str | None:
    """The message when the ``optimizer`` needs a package that is not installed here, else None."""
    need = package_for(cfg.optimizer)
    if need and importlib.util.find_spec(need[0]) is None:
        return f"optimizer: {cfg.optimizer} needs the {need[0]} package, which is not installed here; pip install {need[1]}, or pick another optimizer."
    return None


def environment_warnings(cfg) -> list[str]:
    """At validation a missing package is a warning: the config is right, this machine lacks the package
    (``validate`` may run where training will not); ``host train`` stops on it before anything loads."""
    message = missing_package(cfg)
    return [f"{message} `host train` stops here until it is installed."] if message else []


def require_package(cfg) -> None:
    """At train start: a missing optimizer package stops the run before data or weights load."""
    from host.errors import ConfigError

    message = missing_package(cfg)
    if message:
        raise ConfigError(message)


def training_argument(cfg) -> dict:
    """``{"optim_args": "k=v,..."}`` for TrainingArguments when set."""
    pairs = parse(cfg.optim_args)
    return {"optim_args": ",".join(f"{k}={v}" for k, v in pairs.items())} if pairs else {}


def unread(optimizer, keys) -> list[str]:
    """The ``optim_args`` keys that the built optimizer does not carry (in its defaults, a param group,
    or as an attribute), i.e. that transformers did not pass to it for this optimizer."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    found = set(getattr(inner, "defaults", {})) | {k for g in getattr(inner, "param_groups", []) for k in g}
    return [k for k in keys if k not in found and not hasattr(inner, k)]


def check_callback(cfg):
    """A TrainerCallback warning once, when training starts, about settings the optimizer did not get."""
    from transformers import TrainerCallback

    keys = list(parse(cfg.optim_args))

    class OptimArgsCheck(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            missing = unread(optimizer, keys) if optimizer is not None else []
            if missing:
                log.warning("optim_args: %s did not reach the optimizer (%s, optimizer: %s); transformers passes "
                            "optim_args only to the optimizers that read them (e.g. sgd, adamw_torch_8bit)",
                            ", ".join(missing), type(getattr(optimizer, "optimizer", optimizer)).__name__, cfg.optimizer)

    return OptimArgsCheck()
