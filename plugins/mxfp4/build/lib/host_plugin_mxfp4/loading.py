"""Put expert weights into FP4 containers while the model loads, one parameter at a time.

Two sources:

* a bf16/fp32 checkpoint (Qwen3-MoE, Mixtral, OLMoE, ...): each experts parameter
  (``gate_up_proj``/``down_proj``, 3-D) is quantized the moment transformers assigns it to its
  module, then freed, so at most one layer's expert tensor exists in high precision at a time;
* a gpt-oss-format checkpoint (``*_blocks`` uint8 ``[E, N, K/32, 16]`` + ``*_scales`` uint8
  ``[E, N, K/32]``, ``quantization_config.quant_method == "mxfp4"``): the packed tensors go straight
  into the container; no bf16 expert tensor is ever built.

Both hook transformers' loader at points that exist in transformers 5.17 .. 5.23:
``core_model_loading.set_param_for_module`` (every parameter assignment),
``integrations.mxfp4.Mxfp4Dequantize.convert`` (gpt-oss blocks+scales -> one tensor) and
``modeling_utils.caching_allocator_warmup`` (skipped: it would reserve GPU memory for bf16 experts). The hooks do
nothing unless a load plan is active (set by ``pre_model_load``, cleared by ``post_model_build``).

A quantized experts module keeps, per quantized parameter ``p``:

* buffers ``p_fp4_packed``/``p_fp4_scales`` (+ ``p_fp4_tensor_scale`` for NVFP4), non-persistent,
  moved by ``.to()`` like any buffer;
* the parameter itself as a zero-memory placeholder (a 0-d tensor expanded to the logical shape,
  ``requires_grad=False``), so PEFT sees the right shape/dtype/device and attaches LoRA as usual.
  The module's class is swapped for a subclass whose ``_apply`` keeps placeholders zero-memory
  across ``.to(device)``/``.half()``.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field

import torch

from host_plugin_mxfp4.formats import FP4Weights, nvfp4_tensor_scale, quantize_mxfp4, quantize_nvfp4

log = logging.getLogger("host.mxfp4")

EXPERT_PARAMS = ("gate_up_proj", "down_proj")


@dataclass
class LoadPlan:
    fmt: str  # "mxfp4" | "nvfp4"
    source: str | None = None  # the base_model being loaded; other loads are left alone
    events: list = field(default_factory=list)  # (param name, live high-precision expert bytes) per quantization
    prequantized: int = 0
    quantized: int = 0


_PLAN: LoadPlan | None = None
_LAST_EVENTS: list = []  # (tensor, live high-precision expert bytes) of the last load, for reports/tests
_LAST_PLAN_COUNTS: tuple = (0, 0)  # (quantized at load, loaded packed)
_LOCK = threading.Lock()
_INSTALLED = False
_ENV_SAVED: dict = {}


def active_plan() -> LoadPlan | None:
    return _PLAN


def begin(fmt: str, source: str | None = None) -> LoadPlan:
    """Activate quantize-on-load for the next ``from_pretrained`` (of ``source`` when given, so a
    plan left behind by a failed load cannot touch another model; see module doc)."""
    global _PLAN
    _install_hooks()
    _PLAN = LoadPlan(fmt, None if source is None else str(source))
    # sequential loading: worker threads would otherwise materialise many layers ahead of the
    # main thread (transformers does the same for its own on-the-fly quantizers)
    _ENV_SAVED["HF_DEACTIVATE_ASYNC_LOAD"] = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    return _PLAN


def end() -> LoadPlan | None:
    global _PLAN
    plan, _PLAN = _PLAN, None
    if "HF_DEACTIVATE_ASYNC_LOAD" in _ENV_SAVED:
        old = _ENV_SAVED.pop("HF_DEACTIVATE_ASYNC_LOAD")
        if old is None:
            os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = old
    return plan


# --- module state ---------------------------------------------------------------------------


def is_experts_module(module) -> bool:
    return all(isinstance(getattr(module, n, None), torch.Tensor) and getattr(module, n).dim() == 3 for n in EXPERT_PARAMS)


def quantized_names(module) -> tuple[str, ...]:
    return tuple(getattr(module, "_fp4_names", ()))


def is_quantized(module) -> bool:
    return bool(quantized_names(module))


def get_weights(module, name: str) -> FP4Weights:
    """The container of ``module.<name>`` in ``[E, N, K]`` (out, in) layout, blocked along K."""
    meta = module._fp4_meta[name]
    return FP4Weights(
        getattr(module, f"{name}_fp4_packed"),
        getattr(module, f"{name}_fp4_scales"),
        meta["shape"],
        meta["block_size"],
        meta["scale_kind"],
        getattr(module, f"{name}_fp4_tensor_scale", None),
    )


def is_transposed(module) -> bool:
    """transformers stores some experts ``[E, in, out]`` (gpt-oss: ``is_transposed=True``)."""
    return bool(getattr(module, "is_transposed", False))


def _placeholder(shape, dtype, device) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.zeros((), dtype=dtype, device=device).expand(*shape), requires_grad=False)
    p._is_hf_initialized = True
    p._fp4_placeholder = True
    return p


def is_placeholder(t) -> bool:
    return bool(getattr(t, "_fp4_placeholder", False))


_SUBCLASSES: dict[type, type] = {}


def _fp4_subclass(cls: type) -> type:
    if getattr(cls, "_fp4_subclass", False):
        return cls
    if cls not in _SUBCLASSES:

        def _apply(self, fn, recurse=True):
            held = {}
            for n in quantized_names(self):
                p = self._parameters.get(n)
                if p is not None and is_placeholder(p):
                    held[n] = p
                    self._parameters[n] = None
            try:
                out = cls._apply(self, fn, recurse)
            finally:
                for n, p in held.items():
                    seed = fn(torch.zeros((), dtype=p.dtype, device=p.device))
                    self._parameters[n] = _placeholder(p.shape, seed.dtype, seed.device)
            return out

        _SUBCLASSES[cls] = type(f"FP4{cls.__name__}", (cls,), {"_apply": _apply, "_fp4_subclass": True})
    return _SUBCLASSES[cls]


def install_weights(module, name: str, w: FP4Weights, dtype: torch.dtype, pending: bool = False) -> None:
    """Make ``module.<name>`` a placeholder backed by ``w`` (``[E, N, K]``).

    ``pending=True`` (inside ``from_pretrained``) keeps ``w`` in a plain attribute: transformers
    re-creates every non-persistent buffer after loading, so buffers are registered by
    :func:`finalize` once the load returns."""
    logical = tuple(getattr(module, name).shape)
    want = (w.shape[0], w.shape[2], w.shape[1]) if is_transposed(module) else w.shape
    if tuple(want) != logical:
        raise ValueError(
            f"{type(module).__name__}.{name}: quantized weights {w.shape} (out, in) do not fit the parameter {logical}"
        )
    if pending:
        module.__dict__.setdefault("_fp4_pending", {})[name] = w
    else:
        _register(module, name, w)
    module._parameters[name] = _placeholder(logical, dtype, w.device)
    module.__class__ = _fp4_subclass(type(module))


def _register(module, name: str, w: FP4Weights) -> None:
    module.register_buffer(f"{name}_fp4_packed", w.packed, persistent=False)
    module.register_buffer(f"{name}_fp4_scales", w.scales, persistent=False)
    if w.tensor_scale is not None:
        module.register_buffer(f"{name}_fp4_tensor_scale", w.tensor_scale, persistent=False)
    meta = dict(getattr(module, "_fp4_meta", {}))
    meta[name] = {"shape": w.shape, "block_size": w.block_size, "scale_kind": w.scale_kind}
    module._fp4_meta = meta
    module._fp4_names = tuple(dict.fromkeys((*quantized_names(module), name)))


def finalize(model) -> int:
    """Register the containers collected during ``from_pretrained``; returns how many modules hold them."""
    n = 0
    for m in model.modules():
        pending = m.__dict__.pop("_fp4_pending", None)
        for name, w in (pending or {}).items():
            _register(m, name, w)
        n += bool(quantized_names(m))
    return n


def quantize_param(param: torch.Tensor, fmt: str, transposed: bool) -> FP4Weights:
    """Quantize one experts tensor expert by expert (bounded fp32 scratch)."""
    w = param.detach()
    w = w.transpose(1, 2) if transposed else w  # -> [E, N, K]
    E, N, K = w.shape
    packed = torch.empty(E, N, K // 2, dtype=torch.uint8, device=w.device)
    if fmt == "mxfp4":
        scales = torch.empty(E, N, K // 32, dtype=torch.uint8, device=w.device)
        for e in range(E):
            packed[e], scales[e] = quantize_mxfp4(w[e])
        return FP4Weights(packed, scales, (E, N, K), 32, "e8m0")
    if fmt == "nvfp4":
        ts = nvfp4_tensor_scale(w)
        scales = torch.empty(E, N, K // 16, dtype=torch.float8_e4m3fn, device=w.device)
        for e in range(E):
            packed[e], scales[e], _ = quantize_nvfp4(w[e], ts)
        return FP4Weights(packed, scales, (E, N, K), 16, "e4m3", ts)
    raise ValueError(f"quantize_moe_experts: unknown format {fmt!r}")


def quantize_module(module, fmt: str, names=EXPERT_PARAMS) -> int:
    """Quantize a built experts module in place (after-load path; used by tests and the bench)."""
    done = 0
    for n in names:
        p = getattr(module, n)
        if is_placeholder(p):
            continue
        w = quantize_param(p, fmt, is_transposed(module))
        install_weights(module, n, w, p.dtype)
        done += p.numel() * p.element_size()
    return done


def dequantize_module(module) -> None:
    """Turn placeholders back into real parameters (bf16/fp32 of the placeholder dtype)."""
    for n in quantized_names(module):
        w = get_weights(module, n)
        p = module._parameters[n]
        dense = w.dequantize(p.dtype)
        if is_transposed(module):
            dense = dense.transpose(1, 2).contiguous()
        module._parameters[n] = torch.nn.Parameter(dense, requires_grad=False)
        for suffix in ("packed", "scales", "tensor_scale"):
            module._buffers.pop(f"{n}_fp4_{suffix}", None)
    module._fp4_names = ()
    module._fp4_meta = {}


def high_precision_expert_bytes(model) -> int:
    """Bytes of expert tensors currently held in a float dtype (not meta, not placeholders)."""
    total = 0
    for m in model.modules():
        for n in EXPERT_PARAMS:
            t = m._parameters.get(n) if hasattr(m, "_parameters") else None
            if isinstance(t, torch.Tensor) and t.dim() == 3 and not is_placeholder(t) and t.device.type != "meta":
                total += t.numel() * t.element_size()
    return total


# --- transformers hooks ---------------------------------------------------------------------


def _plan_for(model) -> LoadPlan | None:
    plan = _PLAN
    if plan is None or plan.source is None:
        return plan
    cfg = getattr(model, "config", None)
    name = str(getattr(cfg, "_name_or_path", "") or getattr(model, "name_or_path", ""))
    return plan if name == plan.source else None


def _install_hooks() -> None:
    global _INSTALLED
    with _LOCK:
        if _INSTALLED:
            return
        from transformers import core_model_loading as cml

        original_set = cml.set_param_for_module

        def set_param_for_module(model, target_name, param_value, *args, **kwargs):
            plan = _plan_for(model)
            fp4 = getattr(param_value, "_fp4", None)
            module_path, _, name = target_name.rpartition(".")
            if plan is None or name not in EXPERT_PARAMS:
                return original_set(model, target_name, param_value, *args, **kwargs)
            module = model.get_submodule(module_path) if module_path else model
            if not is_experts_module(module):
                return original_set(model, target_name, param_value, *args, **kwargs)
            ref = getattr(module, name)
            dtype = ref.dtype if ref.dtype.is_floating_point else param_value.dtype
            if fp4 is not None:  # gpt-oss blocks/scales, already packed
                install_weights(module, name, fp4, dtype, pending=True)
                plan.prequantized += 1
            else:
                plan.events.append((target_name, high_precision_expert_bytes(model) + param_value.numel() * param_value.element_size()))
                w = quantize_param(param_value, plan.fmt, is_transposed(module))
                install_weights(module, name, w, dtype, pending=True)
                plan.quantized += 1
            loading_info = args[0] if args else kwargs.get("loading_info")
            if loading_info is not None:
                loading_info.missing_keys.discard(target_name)

        cml.set_param_for_module = set_param_for_module

        # transformers reserves GPU memory for the whole model up front, sized from the meta model,
        # i.e. with bf16 experts (~3.8x what the 4-bit experts need). It is only a speed-up for
        # many small allocations; skip it while a plan is active so the load's peak is the real one.
        from transformers import modeling_utils as mu

        original_warmup = mu.caching_allocator_warmup

        def caching_allocator_warmup(model, *args, **kwargs):
            if _plan_for(model) is not None:
                return None
            return original_warmup(model, *args, **kwargs)

        mu.caching_allocator_warmup = caching_allocator_warmup

        try:
            from transformers.integrations import mxfp4 as tmx
            from transformers.quantizers import quantizer_mxfp4 as qmx
        except ImportError:  # pragma: no cover - transformers without gpt-oss support
            _INSTALLED = True
            return

        original_convert = tmx.Mxfp4Dequantize.convert

        def convert(self, input_dict, model=None, full_layer_name=None, *args, **kwargs):
            if model is None or _plan_for(model) is None:
                return original_convert(self, input_dict, model=model, full_layer_name=full_layer_name, *args, **kwargs)
            proj = "gate_up_proj" if "gate_up_proj" in full_layer_name else "down_proj"

            def first(v):
                return v[0] if isinstance(v, list) else v

            blocks = first(input_dict[f"{proj}_blocks"])
            scales = first(input_dict[f"{proj}_scales"])
            fp4 = FP4Weights.from_gpt_oss(blocks.contiguous(), scales.contiguous())
            E, N, K = fp4.shape
            module_path = full_layer_name.rpartition(".")[0]
            module = model.get_submodule(module_path)
            ref = getattr(module, proj)
            stand_in = torch.zeros((), dtype=ref.dtype if ref.dtype.is_floating_point else torch.bfloat16).expand(*ref.shape)
            stand_in._fp4 = fp4
            return {full_layer_name: stand_in}

        tmx.Mxfp4Dequantize.convert = convert

        original_validate = qmx.Mxfp4HfQuantizer.validate_environment

        def validate_environment(self, *args, **kwargs):
            if _PLAN is not None:
                # our containers replace transformers' mxfp4 kernels: take its "dequantize" load path,
                # whose dequantize op is intercepted above (nothing is dequantized)
                self.quantization_config.dequantize = True
                return None
            return original_validate(self, *args, **kwargs)

        qmx.Mxfp4HfQuantizer.validate_environment = validate_environment
        _INSTALLED = True
