"""Hybrid attention for Gemma 4: full-attention (global, head_dim 512) layers on SDPA, sliding layers on
the configured implementation.

Flash attention kernels stop at head_dim 256, and Gemma 4's global layers use ``global_head_dim``
(512). Each global layer's attention gets its own shallow config copy with ``_attn_implementation =
"sdpa"``; the sliding layers keep the model's. Masks follow: transformers builds one mask per layer
type from the *model's* config, so the full-attention mask would have the sliding implementation's
format (``None``/2-D for flash, a BlockMask for flex), which SDPA cannot use. The mask builders that
Gemma 4's modeling module calls are wrapped so that, for a hybrid model's config only, the
``full_attention`` mask is built with the SDPA copy. Other models are untouched.
"""

from __future__ import annotations

import copy
import functools
import logging
from typing import Any

log = logging.getLogger("host.gemma4")

#: id(text config of a hybrid model) -> (that config, its SDPA copy)
_HYBRID: dict[int, tuple[Any, Any]] = {}
_SUSPEND = [0]
_PATCHED = {"done": False}


def _sdpa_copy(cfg):
    c = copy.copy(cfg)
    c._attn_implementation_internal = "sdpa"
    return c


def _lookup(cfg):
    hit = _HYBRID.get(id(cfg)) if cfg is not None else None
    return hit[1] if hit is not None and hit[0] is cfg else None


def _wrap_causal(orig):
    @functools.wraps(orig)
    def create_causal_mask(*args, **kwargs):
        sd = None if _SUSPEND[0] else _lookup(kwargs.get("config"))
        if sd is not None:
            kwargs["config"] = sd
        return orig(*args, **kwargs)

    create_causal_mask._gemma4_orig = orig
    return create_causal_mask


def _wrap_mapping(orig):
    @functools.wraps(orig)
    def build(*args, **kwargs):
        _SUSPEND[0] += 1
        try:
            out = orig(*args, **kwargs)
            sd = _lookup(kwargs.get("config"))
            if sd is not None and isinstance(out, dict) and "full_attention" in out:
                out = dict(out)
                out["full_attention"] = orig(*args, **{**kwargs, "config": sd})["full_attention"]
        finally:
            _SUSPEND[0] -= 1
        return out

    build._gemma4_orig = orig
    return build


def _patch_mask_builders() -> None:
    if _PATCHED["done"]:
        return
    from transformers.models.gemma4 import modeling_gemma4 as mg

    mg.create_causal_mask = _wrap_causal(mg.create_causal_mask)
    for name in ("create_masks_for_generate", "create_masks_for_vision_model"):
        if hasattr(mg, name):
            setattr(mg, name, _wrap_mapping(getattr(mg, name)))
    _PATCHED["done"] = True


def apply(model: Any, global_impl: str = "sdpa") -> int:
    """Put every non-sliding attention layer of ``model`` on ``global_impl``; returns how many."""
    from host_plugin_gemma4 import model_utils

    text = model_utils.text_model(model)
    cfg = text.config
    if global_impl != "sdpa":
        raise ValueError("gemma4 hybrid attention: only 'sdpa' is supported for the global layers")
    sd = _sdpa_copy(cfg)
    n = 0
    for layer in text.layers:
        attn = layer.self_attn
        if attn.layer_type != "sliding_attention":
            attn.config = sd
            n += 1
    _HYBRID[id(cfg)] = (cfg, sd)
    _patch_mask_builders()
    log.info(
        "gemma4: hybrid attention: %d global layers on sdpa, %d sliding layers on %s",
        n, len(text.layers) - n, cfg._attn_implementation,
    )
    return n


def remove(model: Any) -> None:
    from host_plugin_gemma4 import model_utils

    text = model_utils.text_model(model)
    for layer in text.layers:
        layer.self_attn.config = text.config
    _HYBRID.pop(id(text.config), None)
