"""host plugin ``scattermoe``: ScatterMoE Triton kernels with fused LoRA for MoE fine-tuning.

Registers a ``scattermoe`` experts implementation with transformers and selects it, so the
expert MLPs of Qwen3-MoE, Qwen3.5-MoE, OLMoE, Mixtral, Gemma 4 and gpt-oss run through
sorted-token grouped GEMMs (gather fused into the prologue, scatter into the epilogue) with peft's
``target_parameters`` LoRA consumed directly (never ``W + B·A``). CUDA runs the Triton kernels;
CPU runs the pure-torch reference of the same math, so one config trains anywhere.

Public modules (stable API, see their docstrings): ``routing`` (``sort_tokens``), ``lora``
(``expert_lora``), ``reference`` (torch reference), ``ops`` (``scattered_experts``, ``combine``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from host import hookimpl
from host.config import StrictModel
from host.errors import ConfigError

REQUIRES: list[str] = []


class ScatterMoEConfig(StrictModel):
    """Config keys of the scattermoe plugin (the defaults need no tuning)."""

    scattermoe_fused_lora: bool = Field(
        True,
        description="Fuse x·Aᵀ into the base GEMM's K loop (many small experts). False always uses the split path.",
    )
    scattermoe_split_threshold: int = Field(
        8_000_000,
        ge=0,
        description="Per-expert K*N at or above which (with E <= scattermoe_split_max_experts) the LoRA forward "
        "uses the split path: a rank-r grouped GEMM, then the base GEMM with ·Bᵀ in its epilogue.",
    )
    scattermoe_split_max_experts: int = Field(32, ge=1, description="Split path only for models with at most this many experts.")
    scattermoe_fused_tail: bool = Field(
        False,
        description="Run SiLU-GLU, the down projection and the combine as one autograd node whose backward is one "
        "GEMM launch (GLU backward, routing-weight gradient and gate scaling in its epilogue): 3 fewer launches and no "
        "[T*k, H] temporaries, but on an H200 that launch's heavier epilogue makes it slower than the separate kernels.",
    )
    scattermoe_light_tail: Literal["glu", "gemm", "off"] | None = Field(
        None,
        description="The one-node experts call's backward. glu: the combine backward folded into the launches around "
        "it, the [T*k, H] expert outputs not kept (0.12 GiB less per Qwen3-30B-A3B block, 0.2 ms less GPU time on an "
        "H100); off: the combine backward over the kept outputs (end to end on an H100 glu was as fast or faster: "
        "2.16-2.18x vs 2.08-2.15x grouped_mm + PEFT; set off to compare on your model); gemm: glu's work in the dX "
        "launch's epilogue (spills on sm_90). "
        "YAML's unquoted off/false and on/true read as off and glu. Unset: env SCATTERMOE_LIGHT_TAIL, else glu.",
    )

    scattermoe_cuda_graph: bool = Field(
        False,
        description="Replay each MoE block (router, experts, shared expert; forward and backward) as CUDA graphs "
        "captured once per token count: two replays instead of ~20 launches and their Python, for steps whose host "
        "enqueue is slower than the GPU. A block with forward hooks inside (e.g. output_router_logits' recorder) "
        "replays its experts call alone. Costs the first call of each shape a capture, and keeps each layer's "
        "activations, temporaries and three [tokens, hidden] buffers resident (graphs.py).",
    )
    scattermoe_fused_router: bool = Field(
        True,
        description="Run the MoE router (logits GEMM, softmax, top-k, renormalisation) of Qwen2/3-MoE, Qwen3-Next, "
        "Qwen3.5, OLMoE, Mixtral and gpt-oss as one autograd node: one kernel forward and one backward instead of ~23 "
        "small ones. The model's own math (a logit may round 1 ulp apart from cuBLAS's), checked against the model's "
        "router on each class's first call.",
    )
    scattermoe_backend: Literal["auto", "triton", "torch"] = Field(
        "auto", description="auto: Triton on CUDA, torch reference on CPU."
    )

    @field_validator("scattermoe_light_tail", mode="before")
    @classmethod
    def _light_tail_from_yaml_bool(cls, v):
        """YAML reads an unquoted ``off`` (or ``false``) as False and ``on``/``true`` as True: off and glu."""
        return ("glu" if v else "off") if isinstance(v, bool) else v


@hookimpl
def config_model():
    return ScatterMoEConfig


@hookimpl
def validate_config(cfg):
    impl = cfg.experts_implementation
    if impl not in (None, "scattermoe"):
        raise ConfigError(
            f"experts_implementation: {impl!r} conflicts with the scattermoe plugin, which sets it to 'scattermoe'. "
            "Remove experts_implementation (or set it to scattermoe), or drop scattermoe from plugins."
        )
    if cfg.adapter == "lora" and cfg.lora_target_parameters and cfg.lora_dropout:
        raise ConfigError(
            f"lora_dropout: {cfg.lora_dropout} is not supported with lora_target_parameters "
            f"{cfg.lora_target_parameters}. LoRA on expert parameters is computed as x·W_e + s·(x·A_eᵀ)·B_eᵀ from the "
            "same gathered x inside one kernel (and peft's ParamWrapper folds B·A into W), so the LoRA branch "
            "cannot see a dropped-out copy of x. Set lora_dropout: 0."
        )
    if cfg.scattermoe_backend == "triton":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("scattermoe_backend: 'triton' needs a CUDA GPU; use 'auto' to run the torch path on CPU.")
    return None


@hookimpl
def patched_targets(cfg):
    """The plugin computes every MoE layer's expert MLPs (as transformers' experts implementation) and, with
    ``scattermoe_fused_router``, the forward of the router classes it fuses."""
    targets = {"moe.experts.forward": ""}
    if cfg.scattermoe_fused_router:
        from host_plugin_scattermoe.router import SPECS

        targets.update({f"{path}.forward": "scattermoe_fused_router" for path in SPECS})
    return targets


@hookimpl
def pre_model_load(cfg):
    from host_plugin_scattermoe import experts, ops

    ops.SETTINGS.update(
        fused_lora=cfg.scattermoe_fused_lora,
        split_threshold=cfg.scattermoe_split_threshold,
        split_max_experts=cfg.scattermoe_split_max_experts,
        fused_tail=cfg.scattermoe_fused_tail,
        cuda_graph=cfg.scattermoe_cuda_graph,
        fused_router=cfg.scattermoe_fused_router,
        backend=cfg.scattermoe_backend,
    )
    if cfg.scattermoe_light_tail is not None:
        ops.SETTINGS["light_tail"] = "0" if cfg.scattermoe_light_tail == "off" else cfg.scattermoe_light_tail
    experts.register()
    if cfg.experts_implementation is None:
        cfg.experts_implementation = experts.NAME
    elif cfg.experts_implementation != experts.NAME:
        raise ConfigError(
            f"experts_implementation: {cfg.experts_implementation!r} conflicts with the scattermoe plugin; "
            "remove the key or set it to scattermoe."
        )


@hookimpl
def post_model_build(cfg, model):
    from host_plugin_scattermoe import graphs, lora, router

    lora.attach(model)
    router.install(model)
    graphs.install(model)
