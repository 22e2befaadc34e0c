"""liger-kernel's fused MoE (``LigerFusedMoEFunction``, liger-kernel >= 0.8.3) as a transformers experts
implementation, so the block bench can time it beside grouped_mm + PEFT and scattermoe.

What it is: Triton grouped GEMMs with the gather and SwiGLU fused into the up-projection and the
weighted combine into the token aggregation; the backward recomputes ``dO·W2ᵀ`` instead of caching
the expert outputs and **always computes the full weight gradients** ``dW1``, ``dW2`` (no LoRA
factors; the base weights are its parameters). So it is a peer for the *base* GEMMs only: its row
in the table is a full fine-tune of the experts without LoRA, which does two more weight-sized
GEMMs than a LoRA step. Only the SiLU-gated ``[gate | up]`` layout (Qwen3-MoE, OLMoE, Mixtral,
Qwen3.5); not gpt-oss (transposed, biased, clamped GLU).

``LIGER_FUSED_MOE_AUTOTUNE=0`` (set by ``register`` unless the caller set it; it must be set before
``liger_kernel`` is first imported) pins liger's one
default config per kernel: its autotuner tries 32 configs for each of five GEMM kernels, minutes of
compiling per shape.
"""

from __future__ import annotations

import os

NAME = "liger"


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def register() -> None:
    os.environ.setdefault("LIGER_FUSED_MOE_AUTOTUNE", "0")
    import torch
    from liger_kernel.ops.fused_moe import LigerFusedMoEFunction
    from transformers.integrations.moe import ExpertsInterface

    def liger_experts(self, hidden_states, top_k_index, top_k_weights):
        if getattr(self, "is_transposed", False) or getattr(self, "has_bias", False):
            raise NotImplementedError("liger's fused MoE takes the [gate | up] SiLU layout without biases")
        return LigerFusedMoEFunction.apply(
            hidden_states, self.gate_up_proj, self.down_proj, top_k_index.to(torch.int32), top_k_weights
        )

    ExpertsInterface.register(NAME, liger_experts)
