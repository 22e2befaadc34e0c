"""host plugin ``liger``: liger-kernel's fused RMSNorm, RoPE, SwiGLU/GeGLU, LayerNorm, cross-entropy
and fused linear cross-entropy, with axolotl's key names.

``validate_config`` reads the model's ``config.json`` (never the weights); a key liger-kernel has no
kernel for in that family is turned off with one warning naming the key, the family, why and what to
use instead (axolotl warns and skips too); combinations that would be wrong are errors. Routed MoE
experts that another plugin computes (scattermoe) stay its own: liger's GLU then covers dense MLPs
and shared experts only.
``pre_model_load`` runs liger-kernel's ``apply_liger_kernel_to_<family>`` before the model is built
and checks that every declared patch happened. ``post_model_build`` checks the built model uses
the kernels and points fused linear cross-entropy at the weight a peft-wrapped ``lm_head`` applies.
The patches are process-wide (that is how liger-kernel works) and are undone when training ends.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from pydantic import Field

from host import hookimpl
from host.config import StrictModel
from host.errors import ConfigError, HostError
from host_plugin_liger.families import FAMILIES, KEYS, MOE_EXPERTS, TARGETED, resolve, targets

log = logging.getLogger("host.liger")

#: the keys pre_model_load applied (after the family check), for post_model_build's checks
_APPLIED: dict[str, bool] = {}


class LigerConfig(StrictModel):
    """axolotl's liger keys; unset (null) means off."""

    liger_rope: bool | None = Field(None, description="Fused RoPE kernel (q and k in one launch).")
    liger_rms_norm: bool | None = Field(None, description="Fused RMSNorm kernel for every RMSNorm of the family.")
    liger_glu_activation: bool | None = Field(
        None, description="Fused SwiGLU/GeGLU MLP (dense families) or liger's fused MoE experts (Mixtral, Qwen3-MoE, Qwen3.5-MoE)."
    )
    liger_layer_norm: bool | None = Field(None, description="Fused LayerNorm (families that have LayerNorms: Gemma 3's vision tower).")
    liger_cross_entropy: bool | None = Field(None, description="Liger's cross-entropy kernel on materialised logits.")
    liger_fused_linear_cross_entropy: bool | None = Field(
        None, description="Loss computed chunk by chunk from the last hidden states: the [tokens, vocab] logits never exist."
    )
    liger_fused_linear_cross_entropy_chunk_rows: int | None = Field(
        None, ge=0,
        description="Tokens per chunk of liger's fused loss (the [rows, vocab] logits that exist at a time). Unset: "
        "1024 rows (fast GEMMs, ~0.3-0.5 GiB transient at 152k-262k vocabularies); 0: liger-kernel's own rule "
        "(about tokens x hidden / vocab rows: skinny GEMMs, slower).",
    )
    liger_rms_norm_gated: bool | None = Field(
        None, description="axolotl's fused gated RMSNorm (Qwen3.5 linear attention): liger-kernel has none; a warning."
    )


@hookimpl
def config_model():
    return LigerConfig


def enabled_keys(cfg) -> dict[str, bool]:
    return {k: bool(getattr(cfg, k, None)) for k in KEYS}


def read_model_config(base_model: str) -> dict | None:
    """``config.json`` of a local model dir or the hub cache (never the weights); None if neither has it."""
    path = Path(base_model) / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(base_model, "config.json")
        except Exception:  # not a repo id, no cache
            cached = None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_model_type(base_model: str) -> str | None:
    """``model_type`` from ``config.json`` of a local model dir or the hub cache; None if neither has it."""
    return (read_model_config(base_model) or {}).get("model_type")


def experts_owner(cfg) -> str | None:
    """Who computes the routed MoE experts instead of liger-kernel's fused experts, or None.

    Another enabled plugin that declares ``moe.experts.forward`` through ``patched_targets`` (e.g.
    scattermoe), or an explicit ``experts_implementation``. The order the plugins agree on: that
    owner keeps the routed experts and ``liger_glu_activation`` covers the dense MLPs and shared
    experts only, so the two never patch the same module.
    """
    from importlib.metadata import entry_points

    for name in cfg.plugins or []:
        if name == "liger":
            continue
        for ep in entry_points(group="host.plugins", name=name):
            declare = getattr(ep.load(), "patched_targets", None)
            if callable(declare) and MOE_EXPERTS in (declare(cfg) or {}):
                return f"plugin {name!r}"
    if getattr(cfg, "experts_implementation", None):
        return f"experts_implementation: {cfg.experts_implementation}"
    return None


def plan(cfg, model_type: str | None = None, model_config: dict | None = None):
    """``(family, model_type, keys that patch something, warnings, experts owner)`` for this config.

    ``model_type`` is read from ``config.json`` unless given; ``family`` and ``model_type`` are None
    when it cannot be read without loading (then the keys stay as set and the check runs later).
    """
    on = enabled_keys(cfg)
    if model_type is None:
        model_config = read_model_config(cfg.base_model)
        model_type = (model_config or {}).get("model_type")
    if model_type is None:
        return None, None, on, [], None
    owner = experts_owner(cfg)
    family = FAMILIES.get(model_type)
    eff, notes = resolve(model_type, family, on, model_config, owner)
    return family, model_type, eff, notes, owner


@hookimpl
def validate_config(cfg):
    on = enabled_keys(cfg)
    if not any(on.values()):
        return [
            "liger: the plugin is enabled but no liger_* key is true, so it patches nothing; set e.g. "
            "liger_fused_linear_cross_entropy: true, or remove liger from plugins."
        ]
    if on["liger_cross_entropy"] and on["liger_fused_linear_cross_entropy"]:
        raise ConfigError(
            "liger_cross_entropy and liger_fused_linear_cross_entropy: set one of them, not both (the fused loss "
            "never materialises the logits that liger_cross_entropy would read). Keep liger_fused_linear_cross_entropy."
        )
    import torch

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(
            f"{', '.join(k for k, v in on.items() if v)}: liger-kernel's kernels are Triton and need a CUDA GPU "
            "(or TRITON_INTERPRET=1 for tests); set the liger_* keys to false on this machine."
        )
    family, model_type, eff, warnings, _ = plan(cfg)
    if cfg.liger_rms_norm_gated:
        warnings.append(
            "liger: liger_rms_norm_gated does nothing: liger-kernel has no fused gated RMSNorm (axolotl's is a kernel of "
            "its own), so transformers' gated RMSNorm of Qwen3.5's linear-attention layers stays. Remove the key."
        )
    if model_type is None:
        warnings.append(
            f"liger: cannot read config.json of {cfg.base_model!r} without loading it; the family check runs "
            "when the model config is loaded."
        )
    elif family is not None and model_type not in TARGETED:
        warnings.append(f"liger: model_type {model_type!r} is supported by liger-kernel but not tested by this plugin.")
    if eff["liger_fused_linear_cross_entropy"] and cfg.adapter == "lora" and cfg.lora_dropout and _lm_head_has_lora(cfg):
        raise ConfigError(
            f"lora_dropout: {cfg.lora_dropout} with LoRA on lm_head and liger_fused_linear_cross_entropy: the fused loss "
            "reads lm_head's effective weight W + B·A, which a dropout on lm_head's input cannot be folded into. Set "
            "lora_dropout: 0, or remove lm_head from lora_target_modules."
        )
    return warnings


def _lm_head_has_lora(cfg) -> bool:
    targets_ = cfg.lora_target_modules
    if isinstance(targets_, str):
        return "lm_head" in targets_ and targets_ != "all-linear"
    return any(t == "lm_head" or t.endswith(".lm_head") for t in (targets_ or []))


@hookimpl
def patched_targets(cfg):
    family, _, eff, _, owner = plan(cfg)
    if family is None or not any(eff.values()):
        return {}
    return targets(family, eff, owner)


@hookimpl
def pre_model_load(cfg):
    from host_plugin_liger import patching

    _APPLIED.clear()
    if not any(enabled_keys(cfg).values()):
        return
    family, model_type, eff, notes, owner = plan(cfg)
    if model_type is None:  # a hub id not cached yet: its config is small, fetch it now (no weights)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(cfg.base_model, trust_remote_code=cfg.trust_remote_code)
        family, model_type, eff, notes, owner = plan(cfg, config.model_type, config.to_dict())
        for note in notes:  # validation could not say these yet
            log.warning("%s", note)
    _APPLIED.update(eff)
    patching.restore()  # a previous run in this process that did not reach on_train_end
    if family is None or not any(eff.values()):
        return
    changed = patching.apply(family, eff, owner)
    missing = [t for t in targets(family, eff, owner) if t.startswith(("transformers.", "torch.")) and t not in changed]
    if missing:
        patching.restore()
        raise HostError(
            f"liger: liger-kernel's {family.apply_fn} did not patch {', '.join(missing)} in this transformers version; "
            "refusing to train without the kernels you asked for. Turn those keys off."
        )
    if eff["liger_fused_linear_cross_entropy"]:
        rows = cfg.liger_fused_linear_cross_entropy_chunk_rows
        _tune_flce(patching, compile_=bool(cfg.torch_compile), rows=FLCE_CHUNK_ROWS if rows is None else rows)
    log.info("liger: %s patched %s", family.apply_fn, ", ".join(sorted(changed)))


#: default rows per chunk of the fused loss (measured on H200: see README, "GPU: training benchmark")
FLCE_CHUNK_ROWS = 1024


def chunk_mem_const(tokens: int, hidden: int, vocab: int, rows: int) -> int:
    """liger's ``chunk_mem_const`` for chunks of at least ``rows`` tokens (``rows`` 0: liger's default, 1).

    liger-kernel sizes a chunk as ``next_pow2(cdiv(tokens, cdiv(vocab, C * hidden)))``: with C = 1 the
    transient logits are about tokens x hidden elements, i.e. 128-row chunks at 8,192 tokens, H 2048
    and a 152k vocabulary, whose input-gradient GEMM (K = vocab, 128 x 2048 output) cannot fill the GPU.
    """
    if rows <= 0 or tokens <= rows:
        return max(1, -(-vocab // hidden)) if rows > 0 else 1  # one chunk of all tokens
    chunks = tokens // rows
    return max(1, -(-vocab // (hidden * chunks)))


def _tune_flce(patching, compile_: bool, rows: int) -> None:
    """Wrap liger's chunked loss: chunks of ``rows`` tokens, no host syncs on the Trainer's path
    (:mod:`host_plugin_liger.sync_free`), and kept out of Dynamo under ``torch_compile`` (it launches Triton
    kernels in a Python loop)."""
    import functools

    import torch
    from liger_kernel.ops import fused_linear_cross_entropy as ops

    from host_plugin_liger import sync_free

    original = sync_free.forward(ops.fused_linear_cross_entropy_forward)

    @functools.wraps(original)
    def forward(_input, weight, *args, **kwargs):
        if kwargs.get("chunk_mem_const", 1) == 1 and len(args) < 19:  # the caller left liger's default
            kwargs["chunk_mem_const"] = chunk_mem_const(_input.shape[0], _input.shape[1], weight.shape[0], rows)
        return original(_input, weight, *args, **kwargs)

    backward = sync_free.backward(ops.fused_linear_cross_entropy_backward)
    if compile_:
        forward, backward = torch.compiler.disable(forward), torch.compiler.disable(backward)
    patching.wrap(ops, "fused_linear_cross_entropy_forward", forward)
    patching.wrap(ops, "fused_linear_cross_entropy_backward", backward)


def _causal_lm(model):
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner


@hookimpl
def post_model_build(cfg, model):
    from host_plugin_liger import lm_head as lm_head_mod

    on = dict(_APPLIED)
    if not any(on.values()):
        return
    inner = _causal_lm(model)
    names = {type(m).__name__ for m in inner.modules()}
    liger_classes = {n for n in names if n.startswith("Liger")}
    if on["liger_rms_norm"] and not any("RMSNorm" in n for n in liger_classes):
        raise HostError("liger_rms_norm: the built model has no liger RMSNorm; was it built before the liger plugin ran?")
    if on["liger_glu_activation"] and not (liger_classes - {n for n in liger_classes if "Norm" in n}):
        raise HostError("liger_glu_activation: the built model has no liger MLP/experts module.")
    if on["liger_fused_linear_cross_entropy"]:
        forward = type(inner).forward
        if not getattr(forward, "__module__", "").startswith("liger_kernel."):
            raise HostError(
                f"liger_fused_linear_cross_entropy: {type(inner).__name__}.forward is not liger-kernel's fused loss "
                "forward (the model class was not patched); turn the key off for this model class."
            )
        from host_plugin_liger import patching

        if not getattr(forward, "_liger_unshards_head", False):
            wrapped = lm_head_mod.unsharding_head(forward)
            wrapped._liger_unshards_head = True
            patching.wrap(type(inner), "forward", wrapped)  # undone with liger's patches when training ends
        head = inner.get_output_embeddings()
        kind = lm_head_mod.expose_effective_weight(head)
        if kind != "plain":
            log.info("liger: fused linear cross-entropy reads lm_head's effective weight (%s)", kind)


@hookimpl
def trainer_callbacks(cfg):
    from transformers import TrainerCallback

    class RestoreLiger(TrainerCallback):
        """Undo liger-kernel's process-wide patches when training ends."""

        def on_train_end(self, args, state, control, **kw):
            from host_plugin_liger import patching

            patching.restore()

    return [RestoreLiger()]
