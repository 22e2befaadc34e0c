"""Give fused linear cross-entropy the weight the ``lm_head`` actually applies.

liger-kernel's fused forward reads ``model.lm_head.weight`` and never calls ``lm_head``. With a
peft adapter on ``lm_head`` that attribute is the frozen base weight: the LoRA update (or the
trained copy of ``lora_modules_to_save``) would be silently dropped from the loss and get no
gradient. :func:`expose_effective_weight` gives that one module instance a subclass whose
``weight`` is what its forward applies, ``W + sum(scale * B @ A)`` over the active, unmerged LoRA
adapters (differentiable, so A and B get their gradients through liger's kernel), or the active
``modules_to_save`` copy. Parameter names, ``state_dict`` and saving are unchanged.

Under FSDP2, accelerate shards ``lm_head`` as an FSDP unit of its own, which all-gathers its weight in
its forward pre-hook; the fused loss never calls that forward, so it would read the local shard (a
DTensor) and fail. :func:`unsharding_head` gathers the unit first (``FSDPModule.unshard``, FSDP2's public
API); FSDP's end-of-backward callback then reduce-scatters any gradient and reshards it, as it does for
every unit whose backward hooks did not fire.
"""

from __future__ import annotations

import functools
from typing import Any

from host.errors import HostError


def _lora_weight(self):
    base = self.get_base_layer()
    weight = base.weight
    if getattr(self, "disable_adapters", False) or getattr(self, "merged", False):
        return weight
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        dropout = self.lora_dropout[name]
        if self.training and getattr(dropout, "p", 0.0):
            raise HostError(
                "liger_fused_linear_cross_entropy: LoRA on lm_head with lora_dropout > 0 cannot be folded into "
                "the weight the fused loss reads; set lora_dropout: 0."
            )
        if getattr(self, "use_dora", {}).get(name):
            raise HostError("liger_fused_linear_cross_entropy: DoRA on lm_head is not supported; remove lm_head from the targets.")
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        weight = weight + (b @ a).to(weight.dtype) * self.scaling[name]
    return weight


def _modules_to_save_weight(self):
    if getattr(self, "disable_adapters", False) or self.active_adapter not in self.modules_to_save:
        return self.original_module.weight
    return self.modules_to_save[self.active_adapter].weight


def expose_effective_weight(lm_head: Any) -> str:
    """Swap ``lm_head``'s class for one whose ``weight`` is its effective weight.

    Returns what it found: ``"plain"`` (nothing to do), ``"lora"`` or ``"modules_to_save"``.
    """
    kind = "plain"
    if hasattr(lm_head, "lora_A") and hasattr(lm_head, "get_base_layer"):
        kind, getter = "lora", _lora_weight
    elif hasattr(lm_head, "modules_to_save") and hasattr(lm_head, "original_module"):
        kind, getter = "modules_to_save", _modules_to_save_weight
    if kind == "plain" or getattr(type(lm_head), "_liger_effective_weight", False):
        return kind
    cls = type(lm_head)
    lm_head.__class__ = type(cls.__name__, (cls,), {"weight": property(getter), "_liger_effective_weight": True})
    return kind


def unsharding_head(forward):
    """The causal LM's fused-loss ``forward``, gathering an FSDP2-sharded ``lm_head`` before it reads the weight."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without distributed
        return forward

    @functools.wraps(forward)
    def wrapped(self, *args, **kwargs):
        head = self.get_output_embeddings()
        if self.training and isinstance(head, FSDPModule):
            head.unshard()
        return forward(self, *args, **kwargs)

    return wrapped
