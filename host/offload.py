"""Activation offloading: the tensors autograd saves during the forward wait in CPU memory until backward.

axolotl's keys: ``activation_offloading: true | legacy | hidden_states`` (and the older
``gradient_checkpointing: offload``, which axolotl reads as ``gradient_checkpointing: true`` +
``activation_offloading: true``). Both require gradient checkpointing, as in axolotl, so what autograd
saves is mostly each checkpointed layer's input (the hidden states) plus the few tensors outside the
layers; those are copied to (pinned) CPU memory as they are saved and copied back when backward needs
them. Parameters (and views of them), tensors under 1 KiB and the output head's inputs stay where they
are: moving them saves nothing. The math is unchanged: a copy out and back is exact.

Host's copies are synchronous (axolotl's ``legacy``); axolotl's ``true`` overlaps them with compute on
CUDA streams, which is faster, not smaller. axolotl's LoRA runs skip the recompute when offloading;
host keeps checkpointing on, so its GPU memory is at most axolotl's. ``disk`` is refused.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("host.train")

MIN_BYTES = 1024  # smaller tensors are not worth a copy (TRL's threshold, which axolotl uses)
MODES = (True, "legacy", "hidden_states")


def enabled(cfg) -> bool:
    return cfg.activation_offloading in MODES or cfg.gradient_checkpointing == "offload"


def errors(cfg) -> list[str]:
    """Validation rules, axolotl's: offloading needs checkpointing; disk offloading is not in host."""
    out = []
    if cfg.gradient_checkpointing == "offload_disk" or cfg.activation_offloading == "disk":
        key = "gradient_checkpointing: offload_disk" if cfg.gradient_checkpointing == "offload_disk" else "activation_offloading: disk"
        out.append(f"{key}: offloading activations to disk is not in host; use activation_offloading: true (CPU memory).")
    if cfg.activation_offloading and not cfg.gradient_checkpointing:
        out.append("activation_offloading: needs gradient_checkpointing: true (as in axolotl), or remove activation_offloading.")
    return out


class Offloader:
    """Saved-tensor hooks that move what autograd saves to CPU and back; counts what it moved."""

    def __init__(self, min_bytes: int = MIN_BYTES):
        import torch

        self.min_bytes = min_bytes
        self.offloaded = 0
        self.offloaded_bytes = 0
        self.kept = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._keep = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)

    def _stays(self, tensor) -> bool:
        import torch

        base = tensor._base if tensor._base is not None else tensor
        if isinstance(tensor, torch.nn.Parameter) or isinstance(base, torch.nn.Parameter):
            return True  # a weight (or its transpose): it stays on the device anyway
        if type(tensor) is not torch.Tensor or tensor.layout is not torch.strided:
            return True  # tensor subclasses (DTensor, quantized) and sparse tensors: not copied blindly
        return tensor.numel() * tensor.element_size() < self.min_bytes

    def pack(self, tensor):
        import torch

        if self._stays(tensor):
            self.kept += 1
            return tensor
        pinned = tensor.is_cuda and torch.cuda.is_available()
        host = torch.empty_like(tensor, device="cpu", pin_memory=pinned)
        host.copy_(tensor, non_blocking=pinned)  # stream-ordered: whatever reuses the GPU block runs after the copy
        self.offloaded += 1
        self.offloaded_bytes += host.numel() * host.element_size()
        return (tensor.device, host)

    @staticmethod
    def unpack(packed):
        if isinstance(packed, tuple):
            device, host = packed
            return host.to(device, non_blocking=True)
        return packed

    # forward hooks: offload during the model's forward only (not eval, not the backward's recompute)
    def enter(self, *_: Any) -> None:
        self._hooks.__enter__()

    def exit(self, *_: Any) -> None:
        self._hooks.__exit__(None, None, None)

    def keep_enter(self, *_: Any) -> None:
        self._keep.__enter__()

    def keep_exit(self, *_: Any) -> None:
        self._keep.__exit__(None, None, None)


def attach(model, min_bytes: int = MIN_BYTES) -> Offloader:
    """Offload what ``model``'s forward saves for backward, except its output head's inputs (needed first)."""
    off = Offloader(min_bytes)
    model.register_forward_pre_hook(off.enter)
    model.register_forward_hook(off.exit, always_call=True)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        head.register_forward_pre_hook(off.keep_enter)
        head.register_forward_hook(off.keep_exit, always_call=True)
    return off


def callback(off: Offloader):
    """A TrainerCallback logging, after the first step, how much was offloaded (so a run shows it works)."""
    from transformers import TrainerCallback

    class OffloadReport(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                log.info("activation_offloading: step 1 moved %d saved tensors (%.1f MiB) to CPU memory; %d stayed "
                         "(parameters, tensors < %d bytes, the output head's inputs)",
                         off.offloaded, off.offloaded_bytes / 2**20, off.kept, off.min_bytes)

    return OffloadReport()
