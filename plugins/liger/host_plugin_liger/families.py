"""Which liger-kernel patch serves which model family, and which keys it can honour.

A static table (no liger or transformers import) so ``host validate`` stays light and exact.
``tests/test_liger_families.py`` checks it against the installed liger-kernel's
``MODEL_TYPE_TO_APPLY_LIGER_FN`` and the signatures of its ``apply_liger_kernel_to_*`` functions,
so an upgrade that changes what liger can do fails a test instead of drifting silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

#: config key -> the parameter of liger's ``apply_liger_kernel_to_*`` it drives
#: (``liger_glu_activation`` is ``swiglu`` or ``geglu`` depending on the family).
KEYS = (
    "liger_rope",
    "liger_rms_norm",
    "liger_glu_activation",
    "liger_layer_norm",
    "liger_cross_entropy",
    "liger_fused_linear_cross_entropy",
)

#: The shared patched-target name for an MoE layer's expert MLPs (see host.hookspecs.patched_targets).
MOE_EXPERTS = "moe.experts.forward"


@dataclass(frozen=True)
class Family:
    """One ``model_type``: liger's function, the modeling module(s) it patches, what each key replaces."""

    apply_fn: str
    module: str  # transformers.models.<x>.modeling_<x>
    causal_lm: tuple[str, ...]  # classes whose forward fused linear cross-entropy replaces
    glu_param: str | None = "swiglu"
    rms_norm: str | None = None  # the RMSNorm class name replaced
    glu_targets: tuple[str, ...] = ()  # classes the GLU patch replaces (MLP and/or experts)
    moe_experts: bool = False  # liger_glu_activation replaces the expert MLPs themselves
    layer_norm: tuple[str, ...] = ()  # module paths whose LayerNorm liger replaces
    extra_modules: tuple[str, ...] = ()
    #: dense MLP / shared-expert classes (SwiGLU) that ``liger_glu_activation`` replaces with liger's
    #: ``LigerQwen3MoeSwiGLUMLP`` on an MoE family, whoever computes the routed experts
    dense_glu: tuple[str, ...] = ()
    #: whether a model of this family has such a dense MLP, from its ``config.json`` (text part)
    has_dense: Callable[[dict], bool] | None = None
    #: key -> why liger-kernel has no kernel for it in this family (a warning; the key does nothing)
    unsupported: dict[str, str] = field(default_factory=dict)


_NO_LAYER_NORM = "its norms are all RMSNorm (use liger_rms_norm); liger-kernel patches no LayerNorm for it"
_CE_CLASS_UNUSED = ("liger-kernel replaces {what}, which this family's model no longer calls (its loss is "
                    "transformers' shared loss function), so the swap changes nothing; use "
                    "liger_fused_linear_cross_entropy")


def _m(name: str) -> str:
    return f"transformers.models.{name}.modeling_{name}"


FAMILIES: dict[str, Family] = {
    "llama": Family("apply_liger_kernel_to_llama", _m("llama"), ("LlamaForCausalLM",),
                    rms_norm="LlamaRMSNorm", glu_targets=("LlamaMLP",),
                    unsupported={"liger_layer_norm": _NO_LAYER_NORM}),
    "mistral": Family("apply_liger_kernel_to_mistral", _m("mistral"), ("MistralForCausalLM",),
                      rms_norm="MistralRMSNorm", glu_targets=("MistralMLP",),
                      unsupported={"liger_layer_norm": _NO_LAYER_NORM,
                                   "liger_cross_entropy": _CE_CLASS_UNUSED.format(what="modeling_mistral.CrossEntropyLoss")}),
    "mixtral": Family("apply_liger_kernel_to_mixtral", _m("mixtral"), ("MixtralForCausalLM",),
                      rms_norm="MixtralRMSNorm", glu_targets=("MixtralExperts",), moe_experts=True,
                      unsupported={"liger_layer_norm": _NO_LAYER_NORM}),
    "qwen3": Family("apply_liger_kernel_to_qwen3", _m("qwen3"), ("Qwen3ForCausalLM",),
                    rms_norm="Qwen3RMSNorm", glu_targets=("Qwen3MLP",),
                    unsupported={"liger_layer_norm": _NO_LAYER_NORM}),
    "qwen3_moe": Family("apply_liger_kernel_to_qwen3_moe", _m("qwen3_moe"), ("Qwen3MoeForCausalLM",),
                        rms_norm="Qwen3MoeRMSNorm", glu_targets=("Qwen3MoeExperts",), moe_experts=True,
                        dense_glu=("Qwen3MoeMLP",),  # the layers in mlp_only_layers / off decoder_sparse_step
                        has_dense=lambda c: bool(c.get("mlp_only_layers")) or (c.get("decoder_sparse_step") or 1) > 1,
                        unsupported={"liger_layer_norm": _NO_LAYER_NORM}),
    "gpt_oss": Family("apply_liger_kernel_to_gpt_oss", _m("gpt_oss"), ("GptOssForCausalLM",), glu_param=None,
                      rms_norm="GptOssRMSNorm",
                      unsupported={
                          "liger_glu_activation": "its experts use a clamped SwiGLU with biases that liger-kernel "
                          "does not implement (use the scattermoe plugin for the experts)",
                          "liger_layer_norm": _NO_LAYER_NORM,
                      }),
    "gemma3_text": Family("apply_liger_kernel_to_gemma3_text", _m("gemma3"), ("Gemma3ForCausalLM",),
                          glu_param="geglu", rms_norm="Gemma3RMSNorm", glu_targets=("Gemma3MLP",),
                          unsupported={"liger_layer_norm": _NO_LAYER_NORM}),
    "gemma3": Family("apply_liger_kernel_to_gemma3", _m("gemma3"), ("Gemma3ForConditionalGeneration",),
                     glu_param="geglu", rms_norm="Gemma3RMSNorm", glu_targets=("Gemma3MLP",),
                     layer_norm=("torch.nn.LayerNorm",), extra_modules=(_m("siglip"),),
                     unsupported={"liger_cross_entropy": _CE_CLASS_UNUSED.format(what="torch.nn.CrossEntropyLoss")}),
    "gemma4_text": Family("apply_liger_kernel_to_gemma4_text", _m("gemma4"), ("Gemma4ForCausalLM",),
                          glu_param="geglu", rms_norm="Gemma4RMSNorm", glu_targets=("Gemma4TextMLP",),
                          unsupported={
                              "liger_rope": "Gemma 4 applies RoPE to one tensor at a time, which liger's fused "
                              "(q, k) kernel cannot replace (liger-kernel makes it a no-op); the gemma4 plugin's "
                              "gemma4_fused_norm_rope fuses Gemma 4's norm + RoPE instead",
                              "liger_layer_norm": _NO_LAYER_NORM,
                          }),
    "gemma4": Family("apply_liger_kernel_to_gemma4", _m("gemma4"), ("Gemma4ForConditionalGeneration",),
                     glu_param="geglu", rms_norm="Gemma4RMSNorm", glu_targets=("Gemma4TextMLP",),
                     unsupported={
                         "liger_rope": "Gemma 4 applies RoPE to one tensor at a time, which liger's fused (q, k) "
                         "kernel cannot replace (liger-kernel makes it a no-op); the gemma4 plugin's "
                         "gemma4_fused_norm_rope fuses Gemma 4's norm + RoPE instead",
                         "liger_layer_norm": "liger-kernel accepts layer_norm for Gemma 4 but patches nothing "
                         "(its vision and audio towers are out of its scope)",
                     }),
    "qwen3_next": Family("apply_liger_kernel_to_qwen3_next", _m("qwen3_next"), ("Qwen3NextForCausalLM",),
                         rms_norm="Qwen3NextRMSNorm", glu_targets=("Qwen3NextExperts",), moe_experts=True,
                         unsupported={
                             "liger_rope": "its partial rotary embedding is not what liger's RoPE kernel computes "
                             "(liger-kernel leaves it off by default), so transformers' RoPE stays",
                             "liger_layer_norm": _NO_LAYER_NORM,
                         }),
}

_QWEN35_ROPE = ("liger-kernel has no kernel for Qwen3.5's partial, interleaved multimodal RoPE (it raises "
                "NotImplementedError), so transformers' RoPE stays")
for _t, _fn, _cls, _experts in (
    ("qwen3_5", "apply_liger_kernel_to_qwen3_5", ("Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration"), False),
    ("qwen3_5_moe", "apply_liger_kernel_to_qwen3_5_moe",
     ("Qwen3_5MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration"), True),
):
    _mod = _t
    _prefix = "Qwen3_5Moe" if _experts else "Qwen3_5"
    _fam = Family(_fn, _m(_mod), _cls, rms_norm=f"{_prefix}RMSNorm",
                  glu_targets=(f"{_prefix}Experts",) if _experts else (f"{_prefix}MLP",), moe_experts=_experts,
                  dense_glu=(f"{_prefix}MLP",) if _experts else (),  # the shared expert
                  has_dense=(lambda c: (c.get("shared_expert_intermediate_size") or 512) > 0) if _experts else None,
                  unsupported={"liger_rope": _QWEN35_ROPE, "liger_layer_norm": _NO_LAYER_NORM})
    FAMILIES[_t] = _fam
    FAMILIES[f"{_t}_text"] = _fam

#: Families the project targets (README table); others in the table work but are not benchmarked.
TARGETED = ("qwen3", "qwen3_moe", "qwen3_5_moe", "qwen3_5_moe_text", "gpt_oss", "mixtral", "gemma3", "gemma3_text", "gemma4",
            "gemma4_text", "llama", "mistral")


def supported_keys(family: Family) -> list[str]:
    return [k for k in KEYS if k not in family.unsupported]


def resolve(model_type: str, family: Family | None, on: dict[str, bool], model_config: dict | None,
            experts_owner: str | None) -> tuple[dict[str, bool], list[str]]:
    """The keys that patch something for this model, and one warning per key that does not.

    A key liger-kernel has no kernel for in the family is off with a warning naming the key, the
    family, why and the alternative (axolotl also warns and skips). ``experts_owner`` is whoever
    else computes the routed MoE experts (a plugin declaring ``moe.experts.forward``, or
    ``experts_implementation``): then ``liger_glu_activation`` covers only the dense MLPs and
    shared experts (``routed_glu`` below is false), and is off with a warning if there are none.
    """
    keys = [k for k, v in on.items() if v]
    if family is None:
        return dict.fromkeys(on, False), [
            f"liger: {', '.join(keys)}: liger-kernel has no kernels for model_type {model_type!r}, so these keys do "
            f"nothing (families with kernels: {', '.join(sorted(FAMILIES))}). Remove them, or liger from plugins."
        ]
    eff, notes = dict(on), []
    for key in keys:
        if key in family.unsupported:
            eff[key] = False
            notes.append(f"liger: {key} does nothing for model_type {model_type!r}: {family.unsupported[key]}.")
    if eff["liger_glu_activation"] and family.moe_experts and experts_owner:
        text = (model_config or {}).get("text_config") or model_config or {}
        if not (family.has_dense and family.has_dense(text)):
            eff["liger_glu_activation"] = False
            notes.append(
                f"liger: liger_glu_activation does nothing for model_type {model_type!r} here: {experts_owner} computes "
                "the routed experts and this model has no dense MLP or shared expert for liger's SwiGLU. Remove the key."
            )
    return eff, notes


def routed_glu(family: Family, enabled: dict[str, bool], experts_owner: str | None) -> bool:
    """Whether liger's fused MoE experts replace the routed experts (no other owner of them)."""
    return bool(enabled["liger_glu_activation"] and family.moe_experts and not experts_owner)


def liger_kwargs(family: Family, enabled: dict[str, bool], experts_owner: str | None = None) -> dict[str, bool]:
    """The keyword arguments for ``family.apply_fn``: every patch explicitly on or off.

    On an MoE family liger's GLU switch replaces the routed experts, so it is on only when nothing
    else owns them (the dense/shared MLPs are patched by the plugin itself: ``family.dense_glu``).
    """
    kw = {
        "rope": enabled["liger_rope"],
        "rms_norm": enabled["liger_rms_norm"],
        "cross_entropy": enabled["liger_cross_entropy"],
        "fused_linear_cross_entropy": enabled["liger_fused_linear_cross_entropy"],
    }
    if family.glu_param:
        glu = enabled["liger_glu_activation"]
        kw[family.glu_param] = routed_glu(family, enabled, experts_owner) if family.moe_experts else glu
    if family.layer_norm:
        kw["layer_norm"] = enabled["liger_layer_norm"]
    return kw


def targets(family: Family, enabled: dict[str, bool], experts_owner: str | None = None) -> dict[str, str]:
    """``{patched target: key}`` for ``host.hookspecs.patched_targets`` (``enabled``: from :func:`resolve`)."""
    out: dict[str, str] = {}
    m = family.module
    if enabled["liger_rope"]:
        out[f"{m}.apply_rotary_pos_emb"] = "liger_rope"
    if enabled["liger_rms_norm"] and family.rms_norm:
        out[f"{m}.{family.rms_norm}"] = "liger_rms_norm"
    if enabled["liger_glu_activation"]:
        if not family.moe_experts or routed_glu(family, enabled, experts_owner):
            for cls in family.glu_targets:
                out[f"{m}.{cls}"] = "liger_glu_activation"
            if family.moe_experts:
                out[MOE_EXPERTS] = "liger_glu_activation"
        for cls in family.dense_glu:
            out[f"{m}.{cls}"] = "liger_glu_activation"
    if enabled["liger_layer_norm"]:
        for path in family.layer_norm:
            out[path] = "liger_layer_norm"
    if enabled["liger_cross_entropy"]:
        out["torch.nn.functional.cross_entropy"] = "liger_cross_entropy"
    if enabled["liger_fused_linear_cross_entropy"]:
        for cls in family.causal_lm:
            out[f"{m}.{cls}.forward"] = "liger_fused_linear_cross_entropy"
    return out
