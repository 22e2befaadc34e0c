"""3-D MoE expert parameters next to a bitsandbytes-quantised model.

transformers' bitsandbytes integration swaps ``nn.Linear`` layers for ``Linear4bit``/``Linear8bitLt``;
experts stored as one ``[E, out, in]`` parameter per projection (Qwen3-MoE, Mixtral, OLMoE, gpt-oss,
... in transformers 5) are not linear layers, so they load unquantised. ``quantize_experts`` puts
them in 4 bits with bitsandbytes' own parametrization (the packed data becomes the parameter, and
reading ``module.gate_up_proj`` dequantises it), on which peft's ``target_parameters`` LoRA adds its
delta as a second parametrization.
"""

from __future__ import annotations

from typing import Any


def expert_params(model) -> list[tuple[Any, str, Any]]:
    """``(module, name, tensor)`` for every 3-D floating parameter of a module named ``*experts``."""
    found = []
    for mod_name, module in model.named_modules():
        if not mod_name.endswith("experts"):
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.ndim == 3 and param.is_floating_point():
                found.append((module, name, param))
    return found


def dense_expert_params(model) -> tuple[int, float]:
    """How many expert parameters stay unquantised, and their GiB."""
    params = expert_params(model)
    return len(params), sum(p.numel() * p.element_size() for _, _, p in params) / 2**30


def quantize_experts(model, quant_type: str = "nf4", double_quant: bool = True,
                     storage: str = "uint8") -> tuple[int, float]:
    """Quantise every expert parameter in place to 4 bits; returns (count, GiB they took before).

    ``storage`` is the dtype the packed bytes are viewed as (``bnb_4bit_quant_storage``): FSDP shards
    and gathers the packed parameter like any other only when it is a float tensor of the training
    dtype; the parametrization dequantises from its bytes whatever the view.
    """
    import torch
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    params = expert_params(model)
    gib = sum(p.numel() * p.element_size() for _, _, p in params) / 2**30
    dtype = getattr(torch, storage)
    for module, name, _ in params:
        replace_parameter_4bit(module, name, compress_statistics=double_quant, quant_type=quant_type)
        packed = module.parametrizations[name].original
        if dtype != torch.uint8:
            packed.data = packed.data.reshape(-1).view(dtype).unsqueeze(1)  # bnb's own layout for quant_storage
    del params
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return len(expert_params_quantized(model)), gib


def plain_state_dict_keys(model) -> int:
    """Remove bitsandbytes' state-dict hook from every module holding 4-bit experts; returns how many.

    The hook renames ``parametrizations.<p>.original`` to ``<p>`` and adds the quantisation state as
    extra keys (``<p>.absmax``, ...). torch's ``get_model_state_dict``, which accelerate uses to save
    under FSDP2, resolves each key as an attribute path and fails on those ("'Tensor' object has no
    attribute 'absmax'"), so the final save and every checkpoint would fail. Nothing reads the packed
    base from a saved state dict: adapters keep only the LoRA weights, and the base reloads from
    ``base_model``.
    """
    from bitsandbytes.nn.parametrize import _parametrized_state_dict_post_hook

    removed = 0
    for module in model.modules():
        hooks = getattr(module, "_state_dict_hooks", {})
        for key in [k for k, h in hooks.items() if getattr(h, "func", None) is _parametrized_state_dict_post_hook]:
            del hooks[key]
            removed += 1
    return removed


def expert_params_quantized(model) -> list[tuple[Any, str]]:
    """``(module, name)`` of every parameter held by a bitsandbytes 4-bit parametrization (under
    peft, the experts module is wrapped, so it is found by its parametrization, not its name)."""
    from bitsandbytes.nn.parametrize import Bnb4bitParametrization

    out = []
    for module in model.modules():
        if not hasattr(module, "parametrizations"):
            continue
        for name, plist in module.parametrizations.items():
            if any(isinstance(p, Bnb4bitParametrization) for p in plist):
                out.append((module, name))
    return out


def expand_targets(model, targets: list[str]) -> list[str]:
    """peft matches ``target_parameters`` on an already-parametrized module only by its full path
    (``model.layers.0.mlp.experts.gate_up_proj``), not by a suffix (``experts.gate_up_proj``): expand
    every suffix that names a quantised expert parameter to the full paths, in definition order."""
    from bitsandbytes.nn.parametrize import Bnb4bitParametrization

    out: list[str] = []
    for target in targets:
        hits = []
        for mod_name, module in model.named_modules():
            plists = getattr(module, "parametrizations", None)
            if plists is None:
                continue
            for name, plist in plists.items():
                full = f"{mod_name}.{name}"
                if any(isinstance(p, Bnb4bitParametrization) for p in plist) and (
                    full == target or full.endswith("." + target)
                ):
                    hits.append(full)
        out.extend(hits or [target])
    return out


def fix_lora_proxy_removal(model) -> int:
    """Make peft's expert LoRA remove its own parametrization after each forward when a bitsandbytes
    parametrization sits under it.

    peft (0.21.2) registers the LoRA delta as ``_LoraFactorsProxy`` (fp32 experts) or
    ``_LoraParameterProxy`` (bf16) for the forward and removes it afterwards; on a parameter that
    already carries another parametrization it removes only a ``_LoraParameterProxy``, so the factors
    proxy stays and a second one stacks on it in the next step ("only Tensors of floating point dtype
    can require gradients"). Patched per wrapper instance, only where bitsandbytes' parametrization
    is present; returns how many wrappers were patched.
    """
    import types

    from bitsandbytes.nn.parametrize import Bnb4bitParametrization

    def remove_lora_proxy(self):
        plist = self.get_base_layer().parametrizations[self.parameter_name]
        for i in reversed(range(len(plist))):
            if type(plist[i]).__name__ in ("_LoraParameterProxy", "_LoraFactorsProxy"):
                del plist[i]
                return
        raise RuntimeError(f"qlora: no LoRA parametrization to remove on {self.parameter_name}")

    patched = 0
    for module in model.modules():
        if type(module).__name__ != "ParamWrapper":
            continue
        plists = getattr(module.get_base_layer(), "parametrizations", {})
        plist = plists[module.parameter_name] if module.parameter_name in plists else []
        if any(isinstance(p, Bnb4bitParametrization) for p in plist):
            module._remove_parametrizations = types.MethodType(remove_lora_proxy, module)
            patched += 1
    return patched
