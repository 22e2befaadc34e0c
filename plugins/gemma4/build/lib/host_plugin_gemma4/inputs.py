"""Batch-input fixes, as a forward pre-hook on the Gemma 4 base model (``model.model``).

The hook sits on the inner base model because peft calls the outer model's ``forward`` directly
(bypassing hooks there), and because the multimodal ``Gemma4Model`` builds its masks itself.

* text-only batches: ``mm_token_type_ids`` zeros when the installed transformers requires them
  (``needs_mm_token_type_ids``) and the batch has none and carries no image/audio/video inputs;
* packed sequences: when ``position_ids`` restart inside a row and a 2-D ``attention_mask`` is given,
  transformers skips its packed-sequence detection (it runs only when the mask is ``None``) and builds
  one causal mask over all documents. The hook drops the mask (padding positions get position 0, so
  each is its own one-token "document" that no real token can see) so transformers builds
  per-document causal (and sliding-window) masks. ``use_cache`` is set to False too: with a cache
  (``Gemma4ForCausalLM`` creates an empty DynamicCache whenever use_cache is on) the detection is
  skipped as well.
"""

from __future__ import annotations

import inspect
import logging
import re
from typing import Any

log = logging.getLogger("host.gemma4")

_MM_KEYS = ("pixel_values", "pixel_values_videos", "input_features", "image_position_ids", "video_position_ids")


def needs_mm_token_type_ids() -> bool:
    """True when this transformers' Gemma4Model.forward refuses a batch without mm_token_type_ids.

    Read from the installed source (the check that raised in the seed's transformers: a ``raise``
    whose message names ``mm_token_type_ids``); 5.17 and 5.23 have none (tests confirm by running the
    unpatched model on a text-only batch in train and eval mode).
    """
    from transformers.models.gemma4.modeling_gemma4 import Gemma4Model

    src = inspect.getsource(Gemma4Model.forward)
    return bool(re.search(r"raise\s+\w+\((?:[^()]|\([^()]*\))*mm_token_type_ids", src))


def restarts(position_ids) -> bool:
    """True when some row's positions do not simply count up by one (packed documents)."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[-1] < 2:
        return False
    return bool((position_ids[:, 1:] - position_ids[:, :-1] != 1).any())


def make_hook(*, mm_token_type_ids: bool, packing: bool):
    def pre_hook(module, args, kwargs):
        changed = False
        if mm_token_type_ids and kwargs.get("mm_token_type_ids") is None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is not None and not any(kwargs.get(k) is not None for k in _MM_KEYS):
                import torch

                kwargs["mm_token_type_ids"] = torch.zeros_like(ids)
                changed = True
        if packing and kwargs.get("past_key_values") is None:
            mask, pos = kwargs.get("attention_mask"), kwargs.get("position_ids")
            if pos is not None and getattr(mask, "dim", lambda: 0)() == 2 and restarts(pos):
                if not bool(mask.all()):
                    pos = pos.expand(mask.shape[0], -1).masked_fill(mask == 0, 0)
                    kwargs["position_ids"] = pos
                kwargs["attention_mask"] = None
                # a fresh DynamicCache (use_cache defaults to True) also disables the detection
                kwargs["use_cache"] = False
                changed = True
        return (args, kwargs) if changed else None

    return pre_hook


def install(model: Any, *, mm_token_type_ids: bool, packing: bool):
    """Register the pre-hook on the base model; returns the handle (or None when nothing to do)."""
    from host_plugin_gemma4 import model_utils

    if not (mm_token_type_ids or packing):
        return None
    base = model_utils.unwrap(model)
    inner = getattr(base, "model", base)
    handle = inner.register_forward_pre_hook(
        make_hook(mm_token_type_ids=mm_token_type_ids, packing=packing), with_kwargs=True
    )
    log.info("gemma4: input hook on %s (mm_token_type_ids=%s, packing=%s)", type(inner).__name__,
             mm_token_type_ids, packing)
    return handle
