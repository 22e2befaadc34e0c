"""peft ``target_parameters`` LoRA on expert weights, in kernel layout (public, stable API).

peft (0.21) wraps each targeted 3-D expert parameter in a ``ParamWrapper`` (nested when several
parameters of one module are targeted) holding ``lora_A`` ``(r*E, in)`` and ``lora_B``
``(out, r*E)``, where ``in``/``out`` are the projection's real input/output features. The two
factors are flattened differently: ``lora_A`` is expert-major (row ``e*r + j``), ``lora_B`` is
rank-major (column ``j*E + e``); peft's own ``get_delta_weight`` reads them as
``A.reshape(E, r, in)`` and ``B.reshape(out, r, E)``. The kernel layout is therefore a pair of free
views::

    A_k = lora_A.weight.view(E, r, in)                      # [E, r, in]
    B_k = lora_B.weight.view(out, r, E).permute(2, 0, 1)    # [E, out, r]

so that ``ΔW_e = scaling · B_k[e] @ A_k[e]`` (``[out, in]``). peft itself folds ``W + ΔW`` on every
forward; the plugin instead consumes ``A_k``/``B_k`` in the kernels and never forms ``ΔW``.

Public API:

* ``expert_lora(module) -> dict | None``: ``{param_name: (A [E, r, in], B [E, out, r], scaling)}``
  for the active, unmerged, enabled adapter of a peft-wrapped experts module (either the outer
  ``ParamWrapper`` or the wrapped experts module itself), or ``None`` when not wrapped.
* ``attach(model) -> int``: link every wrapped experts module to its wrappers and make the
  wrappers skip peft's parametrisation while the module runs the ``scattermoe`` implementation
  (other implementations still get peft's behaviour). Returns the number of experts modules.
* ``weight_and_lora(module, name) -> (W, lora or None)``: the base parameter (never ``W + ΔW``)
  and its factors, used by the experts forward.
"""

from __future__ import annotations

import types

import torch
from torch.nn.utils import parametrize

_WRAPPERS_ATTR = "_scattermoe_wrappers"


def _param_wrapper_cls():
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except Exception:  # peft not installed / changed
        return None
    return ParamWrapper


def peft_factors(wrapper, adapter: str):
    """``(A [E, r, in], B [E, out, r], scaling)`` of one adapter of a peft ``ParamWrapper``."""
    E = int(wrapper.num_experts)
    wa = wrapper.lora_A[adapter].weight
    wb = wrapper.lora_B[adapter].weight
    if wa.shape[0] % E:
        raise ValueError(f"lora_A of {wrapper.parameter_name!r} has {wa.shape[0]} rows, not a multiple of E={E}")
    r = wa.shape[0] // E
    A = wa.view(E, r, wa.shape[1])
    B = wb.view(wb.shape[0], r, E).permute(2, 0, 1)
    return A, B, float(wrapper.scaling[adapter])


def _chain(wrapper) -> list:
    PW = _param_wrapper_cls()
    out = []
    m = wrapper
    while PW is not None and isinstance(m, PW):
        out.append(m)
        m = m.base_layer
    return out


def _active_factors(wrapper):
    if getattr(wrapper, "disable_adapters", False) or getattr(wrapper, "merged", False):
        return None
    active = [a for a in wrapper.active_adapters if a in wrapper.lora_A]
    if not active:
        return None
    if len(active) > 1:
        raise NotImplementedError(
            f"scattermoe: {len(active)} LoRA adapters are active on {wrapper.parameter_name!r}; the kernels "
            "take one adapter per expert parameter. Activate a single adapter (model.set_adapter)."
        )
    return peft_factors(wrapper, active[0])


def _from_proxies(module) -> dict:
    """Factors from peft's live parametrisations (when the wrappers were not attached)."""
    out = {}
    if not parametrize.is_parametrized(module):
        return out
    transposed = bool(getattr(module, "is_transposed", False))
    for name, plist in module.parametrizations.items():
        for p in plist:
            if type(p).__name__ == "_LoraFactorsProxy":
                if transposed:  # lhs = Aᵀ [E, in, r], rhs = Bᵀ [E, r, out]
                    A, B = p.lhs.transpose(1, 2), p.rhs.transpose(1, 2)
                else:  # lhs = B [E, out, r], rhs = A [E, r, in]
                    A, B = p.rhs, p.lhs
                out[name] = (A, B, float(p.scaling))
    return out


def expert_lora(module) -> dict | None:
    """See module docstring."""
    PW = _param_wrapper_cls()
    if PW is not None and isinstance(module, PW):
        wrappers = {w.parameter_name: w for w in _chain(module)}
    else:
        wrappers = getattr(module, _WRAPPERS_ATTR, None)
        if not wrappers:
            found = _from_proxies(module)
            return found or None
    out = {}
    for name, w in wrappers.items():
        f = _active_factors(w)
        if f is not None:
            out[name] = f
    return out or None


def _is_experts_module(m) -> bool:
    return hasattr(m, "has_gate") and hasattr(m, "down_proj") and hasattr(m, "num_experts")


def _bypass_forward(self, x, *args, **kwargs):
    base = self.get_base_layer()
    impl = getattr(getattr(base, "config", None), "_experts_implementation", None)
    if impl == "scattermoe" and not kwargs.get("adapter_names"):
        kwargs.pop("adapter_names", None)
        return base(x, *args, **kwargs)
    return type(self).forward(self, x, *args, **kwargs)


def attach(model) -> int:
    """See module docstring."""
    PW = _param_wrapper_cls()
    if PW is None:
        return 0
    count = 0
    for m in model.modules():
        if not isinstance(m, PW):
            continue
        chain = _chain(m)
        base = chain[-1].base_layer
        if not _is_experts_module(base):
            continue
        links = getattr(base, _WRAPPERS_ATTR, None)
        if links is None:
            links = {}
            base.__dict__[_WRAPPERS_ATTR] = links
            count += 1
        for w in chain:
            links[w.parameter_name] = w
            if "forward" not in w.__dict__:
                w.forward = types.MethodType(_bypass_forward, w)
    return count


def weight_and_lora(module, name: str):
    """``(W, (A, B, scaling) or None)`` for expert parameter ``name`` of ``module`` (see docstring)."""
    wrappers = getattr(module, _WRAPPERS_ATTR, None)
    if parametrize.is_parametrized(module, name):
        plist = module.parametrizations[name]
        proxies = [type(p).__name__ for p in plist]
        if proxies == ["_LoraFactorsProxy"]:
            return plist.original, _from_proxies(module).get(name)
        # peft materialised W + ΔW (several adapters / low-precision weights): use it as is.
        return getattr(module, name), None
    W = getattr(module, name)
    if wrappers and name in wrappers:
        return W, _active_factors(wrappers[name])
    return W, None


def transpose_for_kernel(W: torch.Tensor, transposed: bool) -> torch.Tensor:
    """transformers ``[E, out, in]`` (or ``[E, in, out]`` when ``transposed``) → kernel ``[E, in, out]`` view."""
    return W if transposed else W.transpose(1, 2)
