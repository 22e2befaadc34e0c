"""Logged-loss normalisation under gradient accumulation.

HF Trainer decides whether the model normalises its loss by ``num_items_in_batch`` itself from the
model's ``accepts_loss_kwargs`` attribute, else from whether ``forward`` has ``**kwargs``. A forward
that takes ``**kwargs`` but does not pass ``num_items_in_batch`` to its loss (the seed's Gemma 4) makes
the Trainer skip its own division by ``gradient_accumulation_steps``: the logged loss is inflated by
that factor. Signatures lie, so this probes behaviour: two forwards on a 2-token batch, with and
without ``num_items_in_batch``; if the loss does not follow it, ``accepts_loss_kwargs = False`` is set
on the transformers model (the attribute the Trainer reads first). If it does follow, nothing changes.
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any

log = logging.getLogger("host.gemma4")


def consumes_num_items_in_batch(model: Any) -> bool:
    """Does ``model(..., labels=..., num_items_in_batch=N)`` divide its summed loss by N?"""
    import torch

    base = model
    params = inspect.signature(base.forward).parameters
    if "num_items_in_batch" not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return False
    dev = next(base.parameters()).device
    ids = torch.tensor([[1, 2, 3]], device=dev)
    was_training = base.training
    base.eval()
    try:
        with torch.no_grad():
            plain = base(input_ids=ids, labels=ids).loss.float()
            scaled = base(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(4, device=dev)).loss.float()
    except TypeError:
        return False
    finally:
        base.train(was_training)
    # 2 predicted tokens: a consumer returns sum/4 = plain * 2/4
    return math.isclose(scaled.item(), plain.item() * 0.5, rel_tol=1e-3, abs_tol=1e-6)


def fix(model: Any) -> bool:
    """Set ``accepts_loss_kwargs = False`` when the model ignores ``num_items_in_batch``; True if set."""
    from host_plugin_gemma4 import model_utils

    base = model_utils.unwrap(model)
    declared = getattr(base, "accepts_loss_kwargs", None)
    if declared is False:
        return False
    if consumes_num_items_in_batch(base):
        return False
    base.accepts_loss_kwargs = False
    log.info("gemma4: %s.forward ignores num_items_in_batch; accepts_loss_kwargs=False so the Trainer "
             "normalises the logged loss by gradient_accumulation_steps", type(base).__name__)
    return True
