"""Shared-KV side channel for Gemma 4 under activation checkpointing.

transformers passes ``shared_kv_states`` (a mutable container of the K/V that "store" layers produce
and "reuse" layers read) as a keyword argument to every decoder layer. Gradient checkpointing wraps
that call in ``partial(forward, **kwargs)``, so every checkpointed layer's partial references the
container, and through it the K/V tensors, for as long as autograd keeps the checkpoint frame. Under
FSDP2 + activation checkpointing the seed measured those K/V outliving the step (+0.47 GiB/step).

The fix keeps the container out of the captured arguments:

* each decoder layer's class gets a thin subclass whose ``__call__`` pops ``shared_kv_states`` before
  anything else sees the call (before transformers forms the checkpoint partial, and before FSDP2's
  hooks) and puts it in a module-level store (one slot, overwritten by every call);
* the attention forward (``attention.py``) reads the store when its kwarg is absent, so the backward
  recompute, which autograd may run on a worker thread, finds it: a module-level slot is visible to
  every thread (a ``threading.local`` is not; that was the seed's first, broken, fix);
* the slot is released when the gradient of the first decoder layer's input is computed (the end of
  this step's backward, after every recompute), and overwritten by the next forward anyway.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("host.gemma4")

#: First transformers version measured clean: FSDP2 (2 x H200, NCCL) + activation checkpointing on 5.17 and
#: plain / FSDP2 (2 gloo ranks) checkpointing on 5.23 keep no K/V of an earlier step alive and show no
#: per-step growth without this fix (README). The seed saw the leak on transformers 5.5.
CLEAN_SINCE = (5, 17)


def version_affected(version: str | None = None) -> bool:
    """Whether ``gemma4_shared_kv_side_channel: auto`` installs the side channel for this transformers."""
    import re

    import transformers

    m = re.match(r"(\d+)\.(\d+)", version or transformers.__version__)
    return (int(m.group(1)), int(m.group(2))) < CLEAN_SINCE if m else True

#: The single slot: the current forward's shared K/V container (or None).
_STORE: dict[str, Any] = {"kv": None}


def get_store() -> Any:
    return _STORE["kv"]


def set_store(kv: Any) -> None:
    _STORE["kv"] = kv


def _release_if(kv_id: int):
    def hook(grad):
        if id(_STORE["kv"]) == kv_id:
            _STORE["kv"] = None
        return grad

    return hook


class _SideChannelLayer:
    """Mixin placed before the transformers decoder-layer class in the MRO."""

    _gemma4_side_channel = True
    _gemma4_first_layer = False

    def __call__(self, *args, **kwargs):
        kv = kwargs.pop("shared_kv_states", None)
        set_store(kv)  # unconditional: a call without the kwarg must not see a stale container
        if kv is not None and self._gemma4_first_layer and args and torch_is_grad_enabled():
            hidden = args[0]
            if getattr(hidden, "requires_grad", False):
                hidden.register_hook(_release_if(id(kv)))
        return super().__call__(*args, **kwargs)


def torch_is_grad_enabled() -> bool:
    import torch

    return torch.is_grad_enabled()


_SUBCLASSES: dict[type, type] = {}


def _side_channel_class(cls: type) -> type:
    if getattr(cls, "_gemma4_side_channel", False):
        return cls
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(f"SideChannel{cls.__name__}", (_SideChannelLayer, cls), {"__module__": __name__})
    return _SUBCLASSES[cls]


def install(model: Any) -> int:
    """Route ``shared_kv_states`` of every Gemma 4 decoder layer through the store. Idempotent.

    Needs the attention forward of ``attention.py`` (which reads the store); ``install`` puts it in place.
    Returns the number of decoder layers converted.
    """
    from host_plugin_gemma4 import attention, model_utils

    layers = model_utils.decoder_layers(model)
    for i, layer in enumerate(layers):
        layer.__class__ = _side_channel_class(type(layer))
        layer._gemma4_first_layer = i == 0
    for attn in model_utils.attention_modules(model):
        attention.patch(attn)
    log.info("gemma4: shared-KV side channel installed on %d decoder layers", len(layers))
    return len(layers)


def uninstall(model: Any) -> None:
    from host_plugin_gemma4 import model_utils

    for layer in model_utils.decoder_layers(model):
        cls = type(layer)
        if getattr(cls, "_gemma4_side_channel", False):
            layer.__class__ = next(b for b in cls.__mro__[1:] if not getattr(b, "_gemma4_side_channel", False) and b is not _SideChannelLayer)
    set_store(None)
