"""Find the Gemma 4 parts of a (possibly peft-wrapped) model. No side effects."""

from __future__ import annotations

from typing import Any

GEMMA4_TYPES = ("gemma4", "gemma4_text")


def unwrap(model: Any) -> Any:
    """The transformers model under peft / DDP / compile wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft PeftModel
            model = model.get_base_model()
        elif hasattr(model, "module") and not hasattr(model, "config"):  # DDP
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
    return model


def model_type(model: Any) -> str | None:
    return getattr(getattr(unwrap(model), "config", None), "model_type", None)


def is_gemma4(model: Any) -> bool:
    return model_type(model) in GEMMA4_TYPES


def text_model(model: Any) -> Any:
    """The ``Gemma4TextModel`` (the module owning ``layers`` and ``rotary_emb``)."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextModel

    for mod in unwrap(model).modules():
        if isinstance(mod, Gemma4TextModel):
            return mod
    raise LookupError("no Gemma4TextModel inside this model")


def decoder_layers(model: Any) -> list:
    return list(text_model(model).layers)


def attention_modules(model: Any) -> list:
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextAttention

    return [m for m in unwrap(model).modules() if isinstance(m, Gemma4TextAttention)]
